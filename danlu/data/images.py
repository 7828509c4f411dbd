"""Image data: sources -> splits -> fitted preprocessing -> cached uint8 tensors -> batches, and the DataSpec.

Sources (`data.train`, `data.val`, `data.test`, `danlu evaluate --data`):
  - a folder with one sub-folder of images per class (the sub-folder's name is the label);
  - a CSV / TSV / JSONL table with an image-path column (`data.image_column`, paths relative to the table)
    and a label column;
  - a CSV of pixel columns, one image a row (`data.image.pixel_shape`; a header of numbers only means the
    file has no header and the label is the first column);
  - the built-in `digits`: scikit-learn's 1,797 8x8 handwritten digits, split 80/10/10 with a fixed seed.

An image that cannot be read is a bad row, named with its file and the reason; `data.on_bad_rows=skip`
skips it. Images are decoded once (in a few threads: Pillow releases the GIL while decoding) into one
uint8 tensor per split; batches are cropped, normalised and augmented from it in torch.

>>> data = build_image_data(cfg.data, seed=0)     # doctest: +SKIP
>>> data.spec.channels, data.spec.image_size     # doctest: +SKIP
(1, (8, 8))
"""
from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from danlu.data.builtin import SPLIT_SEED
from danlu.data.image_transforms import ImageError, ImagePreprocess, source_shape
from danlu.data.sources import DataError, decode
from danlu.data.spec import DataSpec

TABLES = (".csv", ".tsv", ".txt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
RECORDS = (".jsonl", ".json", ".ndjson")


@dataclass
class ImageExamples:
    sources: list  # file paths, or arrays (H, W[, C]) for pixel tables and built-in sets
    labels: list  # strings, or None when unlabelled
    origins: list  # "file" or "file:line" per example
    skipped: int = 0
    largest_pixel: float = 0.0  # pixel tables: the largest value read (to guess the full-intensity value)


@dataclass
class ImageBundle:
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    examples: dict  # split name -> ImageExamples (their origins, in dataset order)
    preprocess: ImagePreprocess
    labels: tuple
    spec: DataSpec
    skipped: int = 0


INPUTS_CACHE_BYTES = 256 << 20
"""A split whose float model inputs take at most this many bytes keeps them whole, prepared once (while the
preprocessing is unchanged): a batch without random augmentation is then one index into them instead of a
gather, a conversion to float and a normalisation per batch, the same values either way. 28x28 grayscale
images fit 85,000 to a split; larger splits prepare every batch from the uint8 pixels."""


class ImageDataset:
    """Decoded images (N, C, H, W) uint8 and their class ids; yields normalised batches, augmented ones only
    for training (`augment` and shuffled). The order of an epoch is a pure function of (seed, epoch)."""

    def __init__(self, pixels, targets, preprocess, augment=False, origins=None):
        self.pixels, self.targets, self.preprocess, self.augment = pixels, targets, preprocess, augment
        self.origins = origins or []
        self._inputs = self._inputs_key = None  # the prepared split (see INPUTS_CACHE_BYTES) and what it was made from

    def __len__(self):
        return len(self.pixels)

    def num_batches(self, batch_size):
        return -(-len(self) // batch_size)

    def batches(self, batch_size, *, epoch=0, seed=0, skip=0, shuffle=True):
        n = len(self)
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n, dtype=np.int64)
        random = shuffle and self.augment and self.preprocess.random()
        inputs = None if random else self.prepared()
        for i, start in enumerate(range(0, n, batch_size)):
            if i < skip:
                continue
            rows = order[start : start + batch_size]
            index = torch.from_numpy(rows)  # (B,) int64
            if inputs is not None:
                x = inputs[index]  # (B, C, h, w)
            elif random:
                x = self.preprocess.augment(self.pixels[index], np.random.default_rng([seed, epoch, i]))
            else:
                x = self.preprocess(self.pixels[index])
            batch = {"pixel_values": x, "index": index}
            if self.targets is not None:
                batch["labels"] = torch.from_numpy(self.targets[rows])
            yield batch

    def prepared(self):
        """The whole split as the model's float inputs (N, C, h, w), made once per preprocessing state; None
        when it would take more than INPUTS_CACHE_BYTES."""
        if not self.preprocess.fitted() or not len(self):
            return None
        key = (self.pixels, self.preprocess.to_dict())
        if self._inputs_key is None or self._inputs_key[0] is not key[0] or self._inputs_key[1] != key[1]:
            C, (h, w) = self.pixels.shape[1], self.preprocess.input_size_
            if len(self) * C * h * w * 4 > INPUTS_CACHE_BYTES:
                return None
            inputs = torch.empty(len(self), C, h, w)
            for start in range(0, len(self), 4096):  # a chunk at a time: no full-size temporaries
                inputs[start : start + 4096] = self.preprocess(self.pixels[start : start + 4096])
            self._inputs, self._inputs_key = inputs, key
        return self._inputs


# ---------------------------------------------------------------------------------------------
# building


def build_image_data(cfg, seed=0) -> ImageBundle:
    """Read the splits, fit the preprocessing on the training split, decode every split once."""
    from danlu.data import label_set

    splits = read_image_splits(cfg, seed)
    if cfg.limit:
        splits = {k: ImageExamples(v.sources[: cfg.limit], v.labels[: cfg.limit], v.origins[: cfg.limit], v.skipped,
                                   v.largest_pixel) for k, v in splits.items()}
    train = splits["train"]
    labels = label_set(train.labels)
    preprocess = ImagePreprocess.from_config(cfg.image)
    shapes = [s for s in (source_shape(src, o) for src, o in zip(train.sources, train.origins)) if s]
    preprocess.fit([s for s, _ in shapes], [c for _, c in shapes], train.largest_pixel)
    datasets, skipped = {}, 0
    for name in ("train", "val", "test"):
        datasets[name], splits[name] = encode_images(splits[name], preprocess, labels, cfg.on_bad_rows, name == "train")
        skipped += splits[name].skipped
        if name == "train":
            preprocess.fit_statistics(datasets[name].pixels)
    spec = image_spec(preprocess, labels)
    return ImageBundle(datasets["train"], datasets["val"], datasets["test"], splits, preprocess, labels, spec, skipped)


def image_spec(preprocess, labels):
    return DataSpec(vocab_size=0, num_classes=len(labels), labels=tuple(labels), channels=preprocess.channels_,
                    image_size=tuple(preprocess.input_size_))


def encode_images(examples, preprocess, labels, on_bad_rows="error", augment=False, threads=4):
    """Decode every image once -> (ImageDataset, the examples that were kept). A label unknown to training
    is an error naming its row; an unreadable image is a bad row."""
    index = {label: i for i, label in enumerate(labels)}
    for label, origin in zip(examples.labels, examples.origins):
        if label is not None and label not in index:
            raise DataError(f"{origin}: label {label!r} never appears in the training data; "
                            f"known labels: {', '.join(labels)}")

    def one(item):
        source, origin = item
        try:
            return preprocess.decode(source, origin)
        except ImageError as e:
            return e

    items = list(zip(examples.sources, examples.origins))
    with ThreadPoolExecutor(max(1, min(threads, os.cpu_count() or 1))) as pool:
        decoded = list(pool.map(one, items, chunksize=64)) if len(items) > 64 else [one(i) for i in items]
    keep = []
    for i, result in enumerate(decoded):
        if isinstance(result, ImageError):
            if on_bad_rows != "skip":
                raise DataError(f"{result}. Remove or fix the image, or set data.on_bad_rows=skip to skip bad images.")
            continue
        keep.append(i)
    if not keep:
        raise DataError(f"{examples.origins[0] if examples.origins else 'data'}: no readable images")
    C, (H, W) = preprocess.channels_, preprocess.size_
    pixels = torch.empty((len(keep), C, H, W), dtype=torch.uint8)  # (N, C, H, W)
    for row, i in enumerate(keep):
        pixels[row] = torch.from_numpy(decoded[i])
    kept = ImageExamples([examples.sources[i] for i in keep], [examples.labels[i] for i in keep],
                         [examples.origins[i] for i in keep], examples.skipped + len(decoded) - len(keep),
                         examples.largest_pixel)
    targets = None
    if kept.labels and kept.labels[0] is not None:
        targets = np.asarray([index[label] for label in kept.labels], dtype=np.int64)
    return ImageDataset(pixels, targets, preprocess, augment, kept.origins), kept


def read_image_splits(cfg, seed):
    from danlu.data import split_indices

    if cfg.train in IMAGE_DATASETS and not os.path.exists(cfg.train):
        splits = IMAGE_DATASETS[cfg.train]()
    else:
        train = read_images(cfg.train, cfg)
        splits = {"train": train}
        missing = [name for name in ("val", "test") if not getattr(cfg, name)]
        if missing:
            parts = split_indices(len(train.sources), train.origins, seed, cfg.val_fraction if "val" in missing else 0.0,
                                   cfg.test_fraction if "test" in missing else 0.0)
            for name, idx in parts.items():
                splits[name] = ImageExamples([train.sources[i] for i in idx], [train.labels[i] for i in idx],
                                             [train.origins[i] for i in idx], train.skipped if name == "train" else 0,
                                             train.largest_pixel)
    for name in ("val", "test"):
        if getattr(cfg, name):
            splits[name] = read_images(getattr(cfg, name), cfg)
    return splits


# ---------------------------------------------------------------------------------------------
# sources


def read_images(path, cfg, need_labels=True) -> ImageExamples:
    """Labelled (or, with need_labels=False, possibly unlabelled) images from a folder or a table.

    >>> ex = read_images("photos/", cfg.data)    # doctest: +SKIP
    """
    if cfg.on_bad_rows not in ("error", "skip"):
        raise DataError(f"data.on_bad_rows: unknown value {cfg.on_bad_rows!r}; expected one of: error, skip")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path):
        out = _read_folder(path, need_labels)
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext in TABLES:
            out = _read_table(path, cfg, need_labels)
        elif ext in RECORDS:
            out = _read_records(path, cfg, need_labels)
        else:
            raise DataError(f"{path}: unknown file type {ext or '(none)'!r} for images; expected a folder of class "
                            f"sub-folders, or a table: {', '.join(TABLES + RECORDS)}")
    if not out.sources:
        nested = os.path.isdir(path) and any(os.path.isdir(os.path.join(path, d, e)) for d in os.listdir(path)
                                             if os.path.isdir(os.path.join(path, d)) for e in os.listdir(os.path.join(path, d)))
        hint = (" (its sub-folders hold folders, not images: split folders such as train/ and test/ go to "
                "data.train and data.test one each)") if nested else ""
        raise DataError(f"{path}: no images found" + (f" ({out.skipped} bad rows skipped)" if out.skipped else "") + hint)
    return out


def _read_folder(path, need_labels):
    out = ImageExamples([], [], [])
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    if not classes:
        if need_labels:
            raise DataError(f"{path}: a folder of images needs one sub-folder per class (its name is the label); "
                            f"found none")
        classes = [None]
    for label in classes:
        folder = os.path.join(path, label) if label is not None else path
        for name in sorted(os.listdir(folder)):
            file = os.path.join(folder, name)
            if name.startswith(".") or not os.path.isfile(file):
                continue
            out.sources.append(file)  # any file is tried: Pillow knows a format by its content
            out.labels.append(label)
            out.origins.append(file)
    return out


def _bad(path, cfg, out, where, message):
    if cfg.on_bad_rows != "skip":
        raise DataError(f"{where}: {message}. Fix the row, or set data.on_bad_rows=skip to skip bad rows.")
    out.skipped += 1


def _table_rows(path, cfg):
    with open(path, "rb") as f:
        text, _ = decode(f.read(), cfg.encoding)
    lines = text.splitlines()
    sample = lines[0] if lines else ""
    delimiter = "\t" if path.lower().endswith((".tsv", ".txt")) or sample.count("\t") > sample.count(",") else ","
    return list(csv.reader(lines, delimiter=delimiter))


def _read_table(path, cfg, need_labels):
    rows = _table_rows(path, cfg)
    if not rows:
        raise DataError(f"{path}: the file is empty")
    header, body, first_line = [h.strip() for h in rows[0]], rows[1:], 2
    if all(_is_number(h) for h in header):  # no header: the label first, then the pixels
        header = [cfg.label_column] + [f"pixel{i}" for i in range(len(header) - 1)]
        body, first_line = rows, 1
    if cfg.image_column in header:
        return _path_rows(path, cfg, header, body, first_line, need_labels)
    return _pixel_rows(path, cfg, header, body, first_line, need_labels)


def _path_rows(path, cfg, header, body, first_line, need_labels):
    image_at = header.index(cfg.image_column)
    label_at = header.index(cfg.label_column) if cfg.label_column in header else None
    if label_at is None and need_labels:
        raise DataError(f"{path}: no {cfg.label_column!r} column (data.label_column); columns: {', '.join(header)}")
    records = []
    for n, row in enumerate(body, first_line):
        if not any(cell.strip() for cell in row):
            continue
        record = {cfg.image_column: row[image_at] if image_at < len(row) else ""}
        if label_at is not None:
            record[cfg.label_column] = row[label_at] if label_at < len(row) else ""
        records.append((n, record))
    return _path_records(path, cfg, records, label_at is not None)


def _read_records(path, cfg, need_labels):
    with open(path, "rb") as f:
        text, _ = decode(f.read(), cfg.encoding)
    records, out = [], ImageExamples([], [], [])
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            _bad(path, cfg, out, f"{path}, line {n}", f"not valid JSON ({e})")
            continue
        if not isinstance(record, dict):
            _bad(path, cfg, out, f"{path}, line {n}", "expected a JSON object")
            continue
        records.append((n, record))
    labelled = need_labels or any(cfg.label_column in r for _, r in records)
    result = _path_records(path, cfg, records, labelled)
    result.skipped += out.skipped
    return result


def _path_records(path, cfg, records, labelled):
    out = ImageExamples([], [], [])
    base = os.path.dirname(os.path.abspath(path))
    for n, record in records:
        where = f"{path}, line {n}"
        image = record.get(cfg.image_column)
        if not isinstance(image, str) or not image.strip():
            _bad(path, cfg, out, where, f"no image path in {cfg.image_column!r} (data.image_column)")
            continue
        label = record.get(cfg.label_column) if labelled else None
        if labelled and (label is None or str(label).strip() == ""):
            _bad(path, cfg, out, where, f"no label in {cfg.label_column!r} (data.label_column)")
            continue
        file = image.strip()
        out.sources.append(file if os.path.isabs(file) else os.path.join(base, file))
        out.labels.append(_label(label) if labelled else None)
        out.origins.append(f"{where} ({file})")
    return out


def _pixel_rows(path, cfg, header, body, first_line, need_labels):
    label_at = header.index(cfg.label_column) if cfg.label_column in header else None
    if label_at is None and need_labels:
        raise DataError(f"{path}: a table of images needs an image-path column {cfg.image_column!r} "
                        f"(data.image_column) or pixel columns and a label column {cfg.label_column!r} "
                        f"(data.label_column); columns: {', '.join(header[:8])}{' ...' if len(header) > 8 else ''}")
    pixel_at = [i for i in range(len(header)) if i != label_at]
    first = next((row for row in body if any(cell.strip() for cell in row)), [])
    for i in pixel_at:  # a table of paths whose column is not data.image_column
        if i < len(first) and first[i].strip().lower().endswith(IMAGE_SUFFIXES):
            raise DataError(f"{path}: the column {header[i]!r} holds image paths; set data.image_column={header[i]} "
                            f"(it is {cfg.image_column!r})")
    shape = _pixel_shape(path, cfg, len(pixel_at))
    out = ImageExamples([], [], [])
    for n, row in enumerate(body, first_line):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}, line {n}"
        if len(row) != len(header):
            _bad(path, cfg, out, where, f"expected {len(header)} columns, got {len(row)}")
            continue
        try:
            values = np.asarray([float(row[i]) for i in pixel_at], dtype=np.float32)
        except ValueError:
            cell = next(header[i] for i in pixel_at if not _is_number(row[i]))
            _bad(path, cfg, out, where, f"the pixel column {cell!r} is not a number")
            continue
        if not np.isfinite(values).all() or values.min() < 0:
            _bad(path, cfg, out, where, "pixel values must be finite and not negative")
            continue
        label = row[label_at] if label_at is not None else None
        if label is not None and not label.strip():
            _bad(path, cfg, out, where, f"no label in {cfg.label_column!r}")
            continue
        out.sources.append(values.reshape(shape))  # (H, W, C)
        out.labels.append(_label(label) if label is not None else None)
        out.origins.append(where)
        out.largest_pixel = max(out.largest_pixel, float(values.max()))
    return out


def _pixel_shape(path, cfg, count):
    shape = tuple(int(v) for v in cfg.image.pixel_shape)
    if shape:
        shape = shape if len(shape) == 3 else shape + (1,)
        if int(np.prod(shape)) != count:
            raise DataError(f"{path}: data.image.pixel_shape {list(shape)} holds {int(np.prod(shape))} pixels, "
                            f"but the table has {count} pixel columns")
        return shape
    side = round(count ** 0.5)
    if side * side != count:
        raise DataError(f"{path}: {count} pixel columns are not a square image; give data.image.pixel_shape "
                        f"(height, width) or (height, width, channels)")
    return side, side, 1


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _label(label):
    if isinstance(label, float) and label.is_integer():
        return str(int(label))
    return str(label).strip()


# ---------------------------------------------------------------------------------------------
# built-in


def digits():
    """scikit-learn's 1,797 8x8 handwritten digits (UCI optical recognition set; values 0..16), split
    80/10/10 with a fixed seed, independent of run.seed, so every run sees the same test images."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the built-in dataset 'digits' needs scikit-learn; install it with: pip install scikit-learn") from None
    data = load_digits()
    images = np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    n = len(order)
    cuts = {"train": order[: int(0.8 * n)], "val": order[int(0.8 * n) : int(0.9 * n)], "test": order[int(0.9 * n) :]}
    return {name: ImageExamples([images[i] for i in idx], [str(data.target[i]) for i in idx],
                                [f"digits/{name}:{k + 1}" for k in range(len(idx))], 0, 255.0)
            for name, idx in cuts.items()}


# name -> function returning {"train": ImageExamples, "val": ImageExamples, "test": ImageExamples}
IMAGE_DATASETS = {"digits": digits}


def looks_like_image_file(text):
    return isinstance(text, str) and text.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(text)


def refuse_images_for_text_run(run, items):
    """A text run given image files (or bytes): a clear error instead of classifying a file name as text."""
    images = [x for x in items if not isinstance(x, str) or looks_like_image_file(x)]
    if images:
        first = images[0] if isinstance(images[0], str) else "image data"
        raise DataError(f"{run.path} classifies text (model.kind {run.cfg.model.kind}); {first} is an image. "
                        f"Images need an image run (model.kind cnn or vit)")


def clip_text(text, limit=60):
    return text if len(text) <= limit else text[: limit - 1] + "…"
