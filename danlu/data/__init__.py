"""Data: sources -> splits -> fitted tokenizer -> padded, length-bucketed batches, and the DataSpec.

>>> data = build_data(cfg.data, task="classification", seed=0)  # doctest: +SKIP
>>> data.spec.num_classes, len(data.train)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from danlu.data.batching import TextDataset, iterate, num_batches
from danlu.data.builtin import CLASSIFICATION_DATASETS
from danlu.data.sources import DataError, Examples, read_examples
from danlu.data.spec import DataSpec
from danlu.data.tokenizer import TextTokenizer

__all__ = ["DataBundle", "DataError", "DataSpec", "TextDataset", "TextTokenizer", "build_data", "encode_examples",
           "encode_splits", "label_set", "read_split", "read_splits", "iterate", "num_batches"]


@dataclass
class DataBundle:
    train: TextDataset
    val: TextDataset
    test: TextDataset
    examples: dict  # split name -> Examples (texts and where they came from)
    tokenizer: TextTokenizer
    labels: tuple
    spec: DataSpec
    skipped: int = 0


def build_data(cfg, task="classification", seed=0) -> DataBundle:
    """Read, split, fit the tokenizer on the training split, encode every split."""
    numeric = task == "regression"
    splits = read_splits(cfg, seed, numeric)
    tc = cfg.tokenizer
    tokenizer = TextTokenizer(tc.kind, tc.vocab_size, tc.min_frequency, tc.max_length, tc.lowercase).fit(splits["train"].texts)
    return encode_splits(splits, tokenizer, numeric)


def encode_splits(splits, tokenizer, numeric=False) -> DataBundle:
    """Splits (name -> Examples) encoded with `tokenizer`, the label map taken from the training split."""
    labels = () if numeric else label_set(splits["train"].labels)
    encoded = {name: encode_examples(ex, tokenizer, labels, numeric) for name, ex in splits.items()}
    spec = make_spec(tokenizer, labels, numeric)
    skipped = sum(ex.skipped for ex in splits.values())
    return DataBundle(encoded["train"], encoded.get("val"), encoded.get("test"), splits, tokenizer, labels, spec, skipped)


def make_spec(tokenizer, labels, numeric=False):
    return DataSpec(
        vocab_size=tokenizer.vocab_size_,
        pad_id=tokenizer.pad_id,
        num_classes=1 if numeric else len(labels),
        max_length=tokenizer.max_length or 512,
        labels=tuple(labels),
        mask_id=tokenizer.token_id("[MASK]"),
        bos_id=tokenizer.token_id("<s>"),
        eos_id=tokenizer.token_id("</s>"),
    )


def read_split(path, cfg, numeric=False, need_labels=True):
    return read_examples(path, cfg.text_column, cfg.label_column, cfg.on_bad_rows, need_labels=need_labels, numeric=numeric,
                         encoding=cfg.encoding)


def encode_examples(examples, tokenizer, labels, numeric=False) -> TextDataset:
    """Tokenize texts and map labels to class ids; a label unknown to training is an error naming its row."""
    ids = tokenizer.encode(examples.texts)
    for i, x in enumerate(ids):  # a text that normalizes to nothing still gets one (unknown) token
        if len(x) == 0:
            ids[i] = np.asarray([tokenizer.token_id("[UNK]")], dtype=np.int32)
    if examples.labels and examples.labels[0] is None:
        return TextDataset(ids, None, tokenizer.pad_id)
    if numeric:
        return TextDataset(ids, np.asarray(examples.labels, dtype=np.float32), tokenizer.pad_id)
    index = {label: i for i, label in enumerate(labels)}
    targets = np.empty(len(examples.labels), dtype=np.int64)
    for i, label in enumerate(examples.labels):
        if label not in index:
            raise DataError(
                f"{examples.origins[i]}: label {label!r} never appears in the training data; "
                f"known labels: {', '.join(labels)}"
            )
        targets[i] = index[label]
    return TextDataset(ids, targets, tokenizer.pad_id)


def read_splits(cfg, seed, numeric=False):
    """train / val / test Examples as `data.*` names them: a built-in set's own split, files, or a seeded
    split of `data.train`; the first `data.limit` examples of each when a limit is set."""
    builtin = cfg.train in CLASSIFICATION_DATASETS and not os.path.exists(cfg.train)
    if builtin:
        splits = CLASSIFICATION_DATASETS[cfg.train]()
    else:
        train = read_split(cfg.train, cfg, numeric)
        splits = {"train": train}
        missing = [name for name in ("val", "test") if not getattr(cfg, name)]
        if missing:
            splits.update(split_examples(train, seed, cfg.val_fraction if "val" in missing else 0.0,
                                 cfg.test_fraction if "test" in missing else 0.0))
    for name in ("val", "test"):
        if getattr(cfg, name):
            splits[name] = read_split(getattr(cfg, name), cfg, numeric)
    if cfg.limit:
        n = cfg.limit
        splits = {k: Examples(v.texts[:n], v.labels[:n], v.origins[:n], v.skipped) for k, v in splits.items()}
    return splits


def split_indices(n, origins, seed, val_fraction, test_fraction):
    """{split name: example indices}: a seeded shuffle cut into test, validation and training parts
    (a part with a fraction of 0 is left out)."""
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    if n - n_val - n_test < 1 or (val_fraction and n_val < 1) or (test_fraction and n_test < 1):
        raise DataError(f"{origins[0].rsplit(':', 1)[0]}: {n} examples are too few to split off validation and test sets; "
                        f"give data.val and data.test, or more data")
    order = np.random.default_rng(seed).permutation(n)
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {name: idx for name, idx in parts.items() if name == "train" or len(idx)}


def split_examples(ex, seed, val_fraction, test_fraction):
    """train / val / test Examples cut from `ex` by a seeded shuffle (a fraction of 0 leaves that split out)."""
    out = {}
    for name, idx in split_indices(len(ex.texts), ex.origins, seed, val_fraction, test_fraction).items():
        out[name] = Examples([ex.texts[i] for i in idx], [ex.labels[i] for i in idx], [ex.origins[i] for i in idx],
                             ex.skipped if name == "train" else 0)
    return out


def label_set(labels):
    """The class names of a training split, in class-id order (numeric names sorted as numbers)."""
    unique = set(labels)
    try:
        return tuple(sorted(unique, key=float))
    except ValueError:
        return tuple(sorted(unique))
