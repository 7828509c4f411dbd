"""ONNX Runtime vs PyTorch: inference latency of exported danlu runs, after the parity check.

Each model is trained for a moment (latency does not depend on accuracy), exported with
`danlu.serve.export.export` (the same as `danlu export RUN --format onnx`), checked against PyTorch on
batches of several shapes (max |difference| must stay under 1e-4 in fp32), then timed: the median of many
calls at batch 1 and 16, sequence length 32 (no padding), PyTorch eager under inference_mode against an
onnxruntime CPU session, same inputs, same process, the two alternating.

Models: the guide's seed LSTM (embedding 128, LSTM 128), TextCNN, a 2-layer Transformer encoder
classifier (width 128), and a 4-layer GPT decoder (width 128; logits for every position, no KV cache).

    python benchmarks/run.py --only onnx_export [--quick]
    python benchmarks/onnx_export.py --quick
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

NAME = "onnx_export"

MODELS = {  # name -> (kind, model options); classifiers unless kind is "gpt"
    "seed lstm": ("lstm", {"embed_dim": 128, "hidden_dim": 128}),
    "textcnn": ("textcnn", {"embed_dim": 128}),
    "transformer": ("transformer", {"embed_dim": 128, "num_heads": 4, "num_layers": 2}),
    "gpt decoder": ("gpt", {"embed_dim": 128, "num_heads": 4, "num_layers": 4}),
}
QUICK = ("seed lstm", "gpt decoder")


def add_arguments(parser):
    group = parser.add_argument_group(NAME)
    group.add_argument("--onnx-repeats", type=int, help="timed calls per measurement (default 50; 10 with --quick)")


def run(args):
    from danlu.serve.export import export
    from danlu.testing import classifier_run, language_model_run

    quick = getattr(args, "quick", False)
    repeats = getattr(args, "onnx_repeats", None) or (10 if quick else 50)
    threads = getattr(args, "threads", 0) or 1  # both runtimes measured with the same, stated thread count
    rows = []
    with tempfile.TemporaryDirectory(prefix="danlu-bench-onnx-") as tmp:
        for name in QUICK if quick else MODELS:
            kind, options = MODELS[name]
            run_dir = os.path.join(tmp, kind)
            if kind == "gpt":
                run_obj = language_model_run(run_dir, steps=5, **options)
            else:
                run_obj = classifier_run(run_dir, kind=kind, rows=100, max_length=128, **options)
            report = export(run_obj, out=os.path.join(tmp, kind + "-onnx"), repeats=repeats, threads=threads)
            for r in report["latency"]:
                rows.append({
                    "model": name, "batch": r["batch"], "length": r["length"],
                    "threads": threads, "pytorch_ms": r["torch_ms"], "onnxruntime_ms": r["onnxruntime_ms"], "speedup": r["speedup"],
                    "max_abs_diff": f"{report['parity']['max_abs_diff']:.1e}",
                    "fixed_length": report["fixed_length"] or "dynamic", "export_s": report["export_seconds"],
                })
    return rows


if __name__ == "__main__":  # the same as: python benchmarks/run.py --only NAME [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run as harness

    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
