"""The before/after scorecard every compression ends with: size, speed, memory and the task metric.

Both models are measured in the same process on the same inputs, their latency runs interleaved
(before, after, before, after, ...), so that load from elsewhere on the machine falls on both alike.

- size_mb: the model.safetensors of each run on disk; parameters: stored weight elements (int8/int4
  elements of quantized layers count once each); linear_weights_mb: bytes of the linear layers'
  weights in memory (int8 = 1 byte, packed int4 = half, scales included; an output head tied to the
  embedding is the embedding, and is not counted).
- latency: CPU milliseconds per forward call at batch 1 and batch 32 of real test inputs (batches of
  similar length, as predict and evaluate form them), p50 and p95;
  throughput: examples per second at batch 32 (tokens for language models).
- peak_memory_mb: growth of the peak resident memory (Linux VmHWM, reset after imports) of a fresh
  process that loads the run and runs one batch of 32 (torch's CPU allocator keeps no statistics).
- the task metric on the test split (accuracy and macro F1), or perplexity on held-out text.

>>> card = measure_pair(before, after, batches, evaluate, runs=("runs/a", "runs/b"))  # doctest: +SKIP
>>> write_scorecard("runs/b", card)                                                 # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
from torch import nn

ROWS = [  # key, label, which way is better
    ("size_mb", "size on disk (MB)", "lower"),
    ("parameters", "parameters", "lower"),
    ("linear_weights_mb", "linear weights (MB)", "lower"),
    *((f"latency_b{b}_{q}_ms", f"latency batch {b} {q} (ms)", "lower") for b in (1, 32) for q in ("p50", "p95")),
    ("throughput_b32", "throughput batch 32 (/s)", "higher"),
    ("peak_memory_mb", "peak memory (MB)", "lower"),
    ("accuracy", "accuracy", "higher"),
    ("macro_f1", "macro F1", "higher"),
    ("perplexity", "perplexity", "lower"),
]


def model_stats(model):
    """parameters (stored weight elements) and linear_weights_mb, for float and quantized models alike."""
    from danlu.compress.quantize import QuantLinear, ao_modules, dynamic_modules, static_modules, weights_and_biases

    count = sum(p.numel() for p in model.parameters())
    linear_bytes = 0
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}  # a tied head is the embedding
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in tied:
            linear_bytes += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, QuantLinear):
            count += m.in_features * m.out_features
            linear_bytes += m.qweight.numel() * m.qweight.element_size() + m.scales.numel() * m.scales.element_size()
    for name, m in static_modules(model):  # static int8 (convolutions): 1 byte a weight
        count += sum(t.numel() for t in weights_and_biases(m).values())
    _, qdynamic = ao_modules()
    for name, m in dynamic_modules(model):
        if isinstance(m, qdynamic.Linear):
            parts = weights_and_biases(m)
            w = parts["weight"]
            count += sum(t.numel() for t in parts.values())
            per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
            scales = w.q_per_channel_scales().numel() if per_channel else 1
            linear_bytes += w.numel() + 8 * scales  # int8 values + a scale and zero point per channel
        else:  # LSTM
            count += sum(t.numel() for t in weights_and_biases(m).values())
    return {"parameters": count, "linear_weights_mb": linear_bytes / 1e6}


@torch.no_grad()
def time_models(models, inputs, repeats):
    """{name: [seconds per call]} for each model over `inputs` (a list of argument tuples), `repeats`
    times each, models interleaved call by call."""
    times = {name: [] for name in models}
    for model in models.values():
        model.eval()
        model(*inputs[0])  # warm-up: first-call allocations and kernel choice
    for _ in range(repeats):
        for args in inputs:
            for name, model in models.items():
                start = time.perf_counter()
                model(*args)
                times[name].append(time.perf_counter() - start)
    return times


def _percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))] if xs else float("nan")


def latency_rows(models, batch1, batch32, repeats=3):
    """Latency p50/p95 at batch 1 and 32 and throughput at batch 32, per model name."""
    out = {name: {} for name in models}
    for label, inputs in (("b1", batch1), ("b32", batch32)):
        times = time_models(models, inputs, repeats)
        for name, ts in times.items():
            out[name][f"latency_{label}_p50_ms"] = 1000 * _percentile(ts, 50)
            out[name][f"latency_{label}_p95_ms"] = 1000 * _percentile(ts, 95)
            if label == "b32":
                units = sum(_units(args) for args in inputs) * repeats
                out[name]["throughput_b32"] = units / sum(ts)
    return out


def _units(args):
    ids = args[0]
    if ids.dim() == 4:  # images (B, C, H, W): examples
        return ids.shape[0]
    return ids.shape[0] if len(args) > 1 and args[1] is not None else ids.numel()


def peak_memory_mb(run_dir, length, timeout=300):
    """Peak RSS growth (MB) of a fresh process loading `run_dir` and running one batch of 32 x `length`."""
    code = (
        "import os, sys, torch; torch.set_num_threads(1)\n"
        "from danlu.runs import load_run\n"
        "def status(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key): return int(line.split()[1]) / 1024\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"  # reset the high-water mark to the current RSS
        "base = status('VmRSS')\n"
        "run = load_run(sys.argv[1])\n"
        "n = int(sys.argv[2])\n"
        "if hasattr(run.model, 'image_shape'): args = (torch.zeros(32, *run.model.image_shape),)\n"  # images
        "else: ids = torch.randint(7, run.model.embed.num_embeddings, (32, n)); args = (ids, torch.ones(32, n, dtype=torch.bool))\n"
        "with torch.no_grad(): run.model(*args)\n"
        "print(status('VmHWM') - base)\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code, run_dir, str(length)], capture_output=True, text=True,
                              check=False, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def metric_values(metrics):
    """The task metric fields of an evaluation."""
    out = {}
    if "perplexity" in metrics:
        out["perplexity"] = metrics["perplexity"]
    elif "accuracy" in metrics:
        out["accuracy"] = metrics["accuracy"]
        if "macro" in metrics:
            out["macro_f1"] = metrics["macro"]["f1"]
    return out


def build_scorecard(before, after, steps, source, target, notes=None):
    """The scorecard dict from two measurement dicts (keys of ROWS)."""
    rows = []
    for key, label, better in ROWS:
        b, a = before.get(key), after.get(key)
        if b is None and a is None:
            continue
        ratio = (b / a if better == "lower" else a / b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a and b else None
        rows.append({"key": key, "metric": label, "before": b, "after": a, "better_by": ratio, "better": better})
    return {"source": source, "run": target, "steps": steps, "threads": torch.get_num_threads(),
            "device": "cpu", "rows": rows, "before": before, "after": after, **({"notes": notes} if notes else {})}


def markdown(card):
    lines = [f"# Compression scorecard: {card['source']} -> {card['run']}", "",
             "steps: " + " -> ".join(s["kind"] for s in card["steps"]) + f"  (CPU, {card['threads']} torch threads)", "",
             "| metric | before | after | improvement |", "|---|---:|---:|---:|"]
    for r in card["rows"]:
        ratio = f"{r['better_by']:.2f}x" if r["better_by"] is not None else ""
        lines.append(f"| {r['metric']} | {_fmt(r['before'])} | {_fmt(r['after'])} | {ratio} |")
    lines += ["", ("improvement: before / after for lower-is-better rows, after / before otherwise "
                   "(above 1 is better).")]
    for note in card.get("notes") or []:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"


def write_scorecard(run_dir, card):
    """scorecard.md, scorecard.json and plots/scorecard.png in the run directory; returns the md path."""
    from danlu.files import atomic_write_json, atomic_write_text

    atomic_write_json(os.path.join(run_dir, "scorecard.json"), card)
    atomic_write_text(os.path.join(run_dir, "scorecard.md"), markdown(card))
    plot_scorecard(card, os.path.join(run_dir, "plots", "scorecard.png"))
    return os.path.join(run_dir, "scorecard.md")


def plot_scorecard(card, path):
    """One small bar pair (before, after) per scorecard row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in card["rows"] if r["before"] is not None and r["after"] is not None]
    cols = 4
    nrows = max(1, -(-len(rows) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, rows):
        bars = ax.bar(["before", "after"], [r["before"], r["after"]], color=["#8c8c8c", "#d9541a"])
        ax.set_title(r["metric"], fontsize=9)
        ax.tick_params(labelsize=8)
        for bar, v in zip(bars, (r["before"], r["after"])):
            ax.annotate(_fmt(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(" -> ".join(s["kind"] for s in card["steps"]), fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":  # python -m danlu.compress.scorecard RUN LENGTH: peak memory of one run
    print(json.dumps(peak_memory_mb(sys.argv[1], int(sys.argv[2]))))
