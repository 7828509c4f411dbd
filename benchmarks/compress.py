"""Compression of a Transformer classifier trained on zh_sentiment, and weight-only quantization of a GPT:
each experiment is one `compress_run` whose scorecard (before/after, measured in this process on this
machine) lands in benchmarks/results/compress/<experiment>/scorecard.md, and one row of the table.

- int8: dynamic int8 (torch.ao) -- targets: >= 1.8x lower latency at batch 32, >= 3.5x smaller linear
  weights, <= 0.5 accuracy points lost.
- prune-50: structured pruning of 50% of the heads and feed-forward neurons + 1 epoch of recovery
  fine-tuning -- targets: a measured speed-up, <= 1 point lost.
- distill: a 1-layer, 32-wide Transformer student (>= 4x fewer parameters) distilled from the teacher,
  against the same student trained without it (alpha = 1) -- targets: >= 97% of the teacher's
  accuracy, and above the student trained alone.
- static-int8: post-training static int8 of a TextCNN's convolutions, calibrated on 512 training
  examples (`--compress-cnn`, or configs/textcnn_zh_sentiment.yaml trained here for 2 epochs).
- woq-int8 / woq-int4: weight-only int8 / int4 (group 32) of a pretrained GPT run (`--compress-gpt`,
  default runs/pretrain_gpt_zh) -- targets: perplexity within 2% / 10% of fp32. Without a finished GPT
  run, a randomly initialised small GPT is quantized and its logits compared instead.

The teacher is `--compress-teacher` (a run directory), or trained here from
configs/transformer_zh_sentiment.yaml with train.epochs=3 (with --quick: 2,000 examples, 1 epoch).

    python benchmarks/run.py --only compress --threads 1
    python benchmarks/run.py --only compress --quick
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

NAME = "compress"
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "transformer_zh_sentiment.yaml"
CNN_CONFIG = ROOT / "configs" / "textcnn_zh_sentiment.yaml"
EXPERIMENTS = ("int8", "prune-50", "distill", "static-int8", "woq-int8", "woq-int4")


def add_arguments(parser):
    group = parser.add_argument_group(NAME)
    group.add_argument("--compress-teacher", help="a trained zh_sentiment classifier run (default: train one)")
    group.add_argument("--compress-cnn", help="a trained zh_sentiment TextCNN run for static int8 (default: train one)")
    group.add_argument("--compress-gpt", default=str(ROOT / "runs" / "pretrain_gpt_zh"),
                       help="a pretrained GPT run for weight-only quantization (default: runs/pretrain_gpt_zh)")
    group.add_argument("--compress-only", help=f"comma-separated experiments among {', '.join(EXPERIMENTS)}")
    group.add_argument("--compress-epochs", type=int, default=0,
                       help="student epochs for distillation (default 6; 1 with --quick)")


def run(args):
    out_root = os.path.join(getattr(args, "results", str(ROOT / "benchmarks" / "results")), "compress")
    os.makedirs(out_root, exist_ok=True)
    only = set((args.compress_only or ",".join(EXPERIMENTS)).split(","))
    teacher = args.compress_teacher or _train_teacher(out_root, args.quick)
    epochs = args.compress_epochs or (1 if args.quick else 6)
    rows = []
    if "int8" in only:
        rows.append(_classifier_row("int8", teacher, "int8", out_root, args.quick,
                                    "b32 speed-up >= 1.8x, linear weights >= 3.5x smaller, <= 0.5 points lost",
                                    lambda r: r["b32_speedup"] >= 1.8 and r["linear_weights_ratio"] >= 3.5 and r["points_lost"] <= 0.5))
    if "prune-50" in only:
        rows.append(_classifier_row("prune-50", teacher, "prune-50", out_root, args.quick,
                                    "measured speed-up, <= 1 point lost after recovery",
                                    lambda r: r["b32_speedup"] > 1.0 and r["points_lost"] <= 1.0))
    if "distill" in only:
        rows += _distill_rows(teacher, out_root, args.quick, epochs)
    if "static-int8" in only:
        cnn = args.compress_cnn or _train_teacher(out_root, args.quick, CNN_CONFIG, "textcnn", 2)
        rows.append(_classifier_row("static-int8", cnn, "static-int8", out_root, args.quick,
                                    "(no target in the issue) measured speed-up, <= 1 point lost",
                                    lambda r: r["b32_speedup"] > 1.0 and r["points_lost"] <= 1.0))
    for bits in (8, 4):
        if f"woq-int{bits}" in only:
            rows.append(_gpt_row(bits, args, out_root))
    return rows


def _train_teacher(out_root, quick, config=CONFIG, name="teacher", epochs=3):
    import danlu

    path = os.path.join(out_root, f"{name}-quick" if quick else name)
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    overrides = ["train.epochs=1", "data.limit=2000"] if quick else [f"train.epochs={epochs}"]
    danlu.train(str(config), *overrides, f"run.dir={path}", overwrite=True)
    return path


def _compress(teacher, recipe, out, quick):
    from danlu.jobs.compress import compress_run

    return compress_run(teacher, recipe, out=out, quick=quick, overwrite=True)


def _rows(card):
    return {r["key"]: r for r in card["rows"]}


def _classifier_row(name, teacher, recipe, out_root, quick, target, passed):
    out = os.path.join(out_root, name)
    card = _compress(teacher, recipe, out, quick).scorecard
    row = _summary(name, recipe, card)
    row["target"] = target
    row["pass"] = bool(passed(row))
    return row


def _summary(name, recipe, card):
    r = _rows(card)
    metric = "perplexity" if "perplexity" in r else "accuracy"
    before, after = r[metric]["before"], r[metric]["after"]
    return {
        "experiment": name,
        "recipe": recipe,
        "parameters": f"{r['parameters']['before']:,} -> {r['parameters']['after']:,}",
        "size_ratio": r["size_mb"]["better_by"],
        "linear_weights_ratio": r["linear_weights_mb"]["better_by"],
        "b1_speedup": r["latency_b1_p50_ms"]["better_by"],
        "b32_speedup": r["latency_b32_p50_ms"]["better_by"],
        "peak_memory_mb": f"{_num(r['peak_memory_mb']['before'])} -> {_num(r['peak_memory_mb']['after'])}",
        "metric": metric,
        "before": before,
        "after": after,
        "points_lost": 100 * (before - after) if metric == "accuracy" else None,
        "ratio": after / before,
        "scorecard": os.path.relpath(os.path.join(card["run"], "scorecard.md"), ROOT),
    }


def _num(v):
    return "n/a" if v is None else f"{v:.0f}"


def _distill_rows(teacher, out_root, quick, epochs):
    student = {"kind": "distill", "student": "transformer", "epochs": epochs, "temperature": 2.0, "lr": 0.002}
    rows = []
    for name, alpha in (("distill", 0.5), ("student-alone", 1.0)):
        out = os.path.join(out_root, name)
        card = _compress(teacher, [dict(student, alpha=alpha)], out, quick).scorecard
        rows.append(_summary(name, f"distill-transformer alpha={alpha} T=2 lr=0.002 epochs={epochs}", card))
    distilled, alone = rows
    smaller = int(distilled["parameters"].split(" -> ")[0].replace(",", "")) / int(distilled["parameters"].split(" -> ")[1].replace(",", ""))
    distilled["target"] = ">= 4x smaller, >= 97% of teacher accuracy, beats the student trained alone"
    distilled["pass"] = bool(smaller >= 4 and distilled["ratio"] >= 0.97 and distilled["after"] > alone["after"])
    alone["target"] = "reference: the same student without the teacher"
    alone["pass"] = None
    return rows


def _gpt_row(bits, args, out_root):
    gpt = args.compress_gpt
    tolerance = 0.02 if bits == 8 else 0.10
    target = f"perplexity within {tolerance:.0%} of fp32"
    if gpt and os.path.exists(os.path.join(gpt, "model.safetensors")):
        card = _compress(gpt, f"woq-int{bits}", os.path.join(out_root, f"woq-int{bits}"), args.quick).scorecard
        row = _summary(f"woq-int{bits}", f"woq-int{bits}", card)
        row.update(target=target, points_lost=None)
        row["pass"] = bool(row["ratio"] <= 1 + tolerance)
        return row
    return _random_gpt_row(bits, target)


def _random_gpt_row(bits, target):
    """No pretrained GPT run: logits of a randomly initialised GPT (the configs/pretrain_gpt_zh shape)."""
    import torch

    from danlu.compress.quantize import quantize_weights
    from danlu.compress.scorecard import model_stats
    from danlu.data.spec import DataSpec
    from danlu.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    spec = DataSpec(vocab_size=6000, pad_id=0, num_classes=0, max_length=128)
    model = GPT(GPTConfig(embed_dim=256, num_heads=4, num_layers=4, max_positions=128, mlp="gelu_tanh"), spec).eval()
    q = quantize_weights(model, bits=bits, group_size=64 if bits == 8 else 32)
    ids = torch.randint(0, 6000, (4, 128))
    with torch.no_grad():
        ref, out = model(ids), q(ids)
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()
    return {"experiment": f"woq-int{bits}", "recipe": f"woq-int{bits} (random GPT, no pretrained run)",
            "parameters": f"{model_stats(model)['parameters']:,} -> {model_stats(q)['parameters']:,}",
            "linear_weights_ratio": model_stats(model)["linear_weights_mb"] / model_stats(q)["linear_weights_mb"],
            "metric": "max |logit diff| / max |logit|", "after": ((out - ref).abs().max() / ref.abs().max()).item(),
            "ratio": kl, "target": target + " (not measurable without a pretrained run; ratio = KL per token)",
            "pass": None}


if __name__ == "__main__":  # the same as: python benchmarks/run.py --only NAME [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run as harness

    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
