"""Explanations on a set whose answer is known: how often the deciding character comes out on top, and the time.

Each model family is trained on danlu.testing.decisive_reviews (neutral Chinese characters with one of 好 / 差
deciding the label 正面 / 负面, or neither: 中性) for every seed of --explain-seeds, then explains 50 held-out texts
that hold a deciding character, with each method. A hit is a text predicted right whose highest-scored token is
its deciding character. Times are milliseconds per text on the benchmark's threads (one text at a time, as
`danlu predict --explain` does); auto is integrated gradients unless the all-padding baseline already favours
the predicted label (the `auto used IG` column counts the texts it explained with them).

    python benchmarks/run.py --only explain --threads 1
    python benchmarks/run.py --only explain --threads 1 --quick      # one seed
"""
from __future__ import annotations

import os
import tempfile
import time

NAME = "explain"
KINDS = ("lstm", "textcnn", "transformer", "mlp")
METHODS = ("auto", "integrated_gradients", "occlusion")


def add_arguments(parser):
    parser.add_argument("--explain-seeds", default="0,1,2,3", help="explain: training seeds (default 0,1,2,3)")


def run(args):
    from danlu.evaluate.explain import explain
    from danlu.testing import DECISIVE, NEUTRAL, classifier_run, decisive_reviews

    seeds = [0] if args.quick else [int(s) for s in args.explain_seeds.split(",")]
    checks = [r for r in decisive_reviews(75, seed=99) if r[1] != NEUTRAL]  # 50 texts with a deciding character
    texts = [t for t, _ in checks]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for kind in KINDS:
            totals = {m: [0, 0.0] for m in METHODS}  # hits, seconds
            used_ig = 0
            for seed in seeds:
                extra = {"num_heads": 2, "num_layers": 1} if kind == "transformer" else {}
                trained = classifier_run(os.path.join(folder, f"{kind}-{seed}"), kind=kind,
                                         rows=decisive_reviews(300, seed=seed), epochs=6, seed=seed,
                                         train_options={"device": args.device if args.device != "auto" else "cpu"},
                                         **extra)
                for method in METHODS:
                    started = time.perf_counter()
                    results = explain(trained, texts, method=method)
                    totals[method][1] += time.perf_counter() - started
                    for (text, label), r in zip(checks, results):
                        top = max(r["tokens"], key=lambda t: t["score"])
                        totals[method][0] += r["label"] == label and text[top["start"]:top["end"]] in DECISIVE
                    if method == "auto":
                        used_ig += sum(r["method"] == "integrated_gradients" for r in results)
            n = len(texts) * len(seeds)
            row = {"kind": kind, "runs": len(seeds), "texts": n}
            for method in METHODS:
                row[f"{method} on top"] = f"{totals[method][0]}/{n}"
            row["auto used IG"] = f"{used_ig}/{n}"
            for method in METHODS:
                row[f"{method} ms/text"] = 1000 * totals[method][1] / n
            rows.append(row)
    return rows
