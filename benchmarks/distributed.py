"""Data-parallel scaling: training throughput of the same run on 1 and 2 processes (torchrun, DDP;
gloo on CPU, nccl on GPU), with scaling efficiency = samples/s(N) / (N x samples/s(1)).

The run is `danlu train` on synthetic two-class reviews with a small Transformer encoder, the global
batch fixed (so 2 processes take half of it each). Throughput is the mean samples/s of the history rows
after the first (warm-up) epoch, as rank 0 logs it (global examples per second). On CPU each process gets
`--dist-threads` torch threads, so 2 processes use twice the cores of 1: the speedup measures the
parallelism the machine has to spare, not the framework alone.

    python benchmarks/run.py --only distributed [--quick] [--device cpu|cuda]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

NAME = "distributed"
ROOT = Path(__file__).resolve().parents[1]


def add_arguments(parser):
    group = parser.add_argument_group(NAME)
    group.add_argument("--dist-procs", default="1,2", help="process counts to compare (default 1,2)")
    group.add_argument("--dist-threads", type=int, default=1, help="torch threads per process on CPU (default 1)")


def _reviews(path, n):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_reviews, write_csv

    return write_csv(path, make_reviews(n))


def _config(root, data, quick, device):
    import yaml

    cfg = {
        "run": {"seed": 0},
        "data": {"train": data, "tokenizer": {"kind": "char", "vocab_size": 500, "max_length": 64}},
        "model": {"kind": "transformer", "embed_dim": 64, "num_heads": 4, "num_layers": 2, "ffn_dim": 128}
        if not quick else {"kind": "lstm", "embed_dim": 32, "hidden_dim": 32},
        "train": {"epochs": 3, "batch_size": 32 if quick else 64, "lr": 0.002, "device": device, "restore_best": False},
    }
    path = os.path.join(root, "config.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, allow_unicode=True)
    return path, cfg


def _launch(procs, config, run_dir, threads, device):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               "-m", "danlu", "train", config, f"run.dir={run_dir}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(run_dir, "history.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    timed = rows[1:] or rows
    return sum(r["samples_per_s"] for r in timed) / len(timed), rows[-1]["train_loss"]


def run(args):
    import torch

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    counts = [int(n) for n in args.dist_procs.split(",")]
    if device == "cuda":
        counts = [n for n in counts if n <= torch.cuda.device_count()]
    rows, base = [], None
    with tempfile.TemporaryDirectory() as root:
        data = _reviews(os.path.join(root, "reviews.csv"), 1200 if args.quick else 6000)
        config, cfg = _config(root, data, args.quick, device)
        for n in counts:
            speed, loss = _launch(n, config, os.path.join(root, f"run{n}"), args.dist_threads, device)
            base = base or speed / n
            rows.append({"processes": n, "device": device, "model": cfg["model"]["kind"],
                         "global_batch": cfg["train"]["batch_size"], "samples_per_s": speed,
                         "speedup": speed / base, "scaling_efficiency": speed / (n * base),
                         "final_train_loss": loss})
    return rows


if __name__ == "__main__":  # the same as: python benchmarks/run.py --only NAME [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run as harness

    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
