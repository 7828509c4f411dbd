"""Image runs: the training job, the run directory and prediction for image classifiers (model.kind cnn, vit).

    runs/<name>/
      config.yaml  preprocess.json  labels.json  model.safetensors  metrics.json  history.jsonl
      report.md  report.html  plots/  checkpoints/{last,best}.safetensors

The same Trainer, checkpoints and resume as text runs; `preprocess.json` (danlu.data.image_transforms) takes
the place of tokenizer.json, so predict, serve and export prepare an image exactly as training did.

>>> run = load_run("runs/cnn_digits")                    # doctest: +SKIP  (danlu.runs.load_run)
>>> run.predict(["seven.png"])[0]["label"]               # doctest: +SKIP
'7'
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
import torch

from danlu import config as config_mod
from danlu.data.image_transforms import ImageError, ImagePreprocess
from danlu.data.images import IMAGE_SUFFIXES, ImageExamples, build_image_data, encode_images, image_spec, read_images
from danlu.data.sources import DataError
from danlu.files import atomic_write_json, atomic_write_text, load_tensors, load_weights, read_json, save_weights
from danlu.models import build_model, count_parameters
from danlu.registry import ConfigError
from danlu.runs import Run, prepare_run_dir
from danlu.training import distributed as dist
from danlu.training.tasks import TASKS
from danlu.training.trainer import Trainer, pick_device

PREPROCESS_FILE = "preprocess.json"


def is_image_run(path):
    """Whether a run directory holds an image classifier (it has preprocess.json)."""
    return os.path.exists(os.path.join(os.fspath(path), PREPROCESS_FILE))


def looks_like_image_file(text):
    return isinstance(text, str) and text.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(text)


def train_images(cfg, resume=False, overwrite=False, loggers=()):
    """The image job behind `danlu train` when model.kind is an image model: data -> model -> Trainer ->
    evaluation -> run directory and report."""
    from danlu.pipeline import _loggers, _mean, seed_everything

    if cfg.task != "classification":
        raise ConfigError(f"task: image models ({cfg.model.kind}) classify; task {cfg.task!r} is not available for images")
    main = dist.is_main()
    run_dir = prepare_run_dir(cfg.run.dir, overwrite=overwrite, resume=resume) if main else cfg.run.dir
    seed_everything(cfg.run.seed)
    say = lambda m: main and print(m, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    data = build_image_data(cfg.data, cfg.run.seed)
    pre = data.preprocess
    say(f"data: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images, {len(data.labels)} "
        f"classes, {pre.channels_} channel(s), resized to {pre.size_[0]}x{pre.size_[1]}, model input "
        f"{pre.input_size_[0]}x{pre.input_size_[1]}" + (f", {data.skipped} bad images skipped" if data.skipped else ""))
    if main:  # first, so that an interrupted run can be resumed and inspected
        atomic_write_text(os.path.join(run_dir, "config.yaml"), config_mod.dump(cfg))
        pre.save(os.path.join(run_dir, PREPROCESS_FILE))
        atomic_write_json(os.path.join(run_dir, "labels.json"), list(data.labels))
    model = build_model(cfg.model, data.spec)
    say(f"model: {cfg.model.kind}, {count_parameters(model):,} parameters; run directory: {run_dir}")
    task = TASKS[cfg.task](data.labels)
    trainer = Trainer(model, task, cfg.train, run_dir=run_dir, seed=cfg.run.seed, loggers=_loggers(cfg, loggers))
    history = trainer.fit(data.train, data.val, resume=resume)
    model = trainer.model
    trainer.cfg = dataclasses.replace(trainer.cfg, eval_batches=0)  # the final numbers use every held-out image
    from danlu.evaluate.image_report import ImagePredictions

    predictions = ImagePredictions(len(data.test)) if main else None
    started_eval = time.perf_counter()
    test = trainer.evaluate(data.test, on_batch=predictions.update if predictions else None)
    eval_seconds = time.perf_counter() - started_eval
    metrics = {
        "test": test,
        "val": trainer.evaluate(data.val),
        "best_epoch": trainer.best_epoch,
        "epochs_run": len(history),
        "parameters": count_parameters(model),
        "train_seconds": sum(r["seconds"] for r in history),
        "total_seconds": time.perf_counter() - started,
        "samples_per_s": _mean([r["samples_per_s"] for r in history]),
        "data": {"train": len(data.train), "val": len(data.val), "test": len(data.test), "skipped_rows": data.skipped},
    }
    run = ImageRun(run_dir, cfg, model, pre, data.labels, metrics)
    if main:
        save_weights(os.path.join(run_dir, "model.safetensors"), model, {"kind": cfg.model.kind})
        atomic_write_json(os.path.join(run_dir, "metrics.json"), metrics)
        from danlu.evaluate.image_report import write_image_run_report

        write_image_run_report(run, data, history, predictions, eval_seconds)
    return run


class ImageRun(Run):
    """A trained image classifier: `run.predict(["a.png", image_bytes, pil_image, array])`."""

    def __init__(self, path, cfg, model, preprocess, labels, metrics=None):
        super().__init__(path, cfg, model, None, labels, metrics)
        self.preprocess = preprocess

    @property
    def spec(self):
        return image_spec(self.preprocess, self.labels)

    def pixels(self, images):
        """Decode images (paths, bytes, PIL images or arrays (H, W[, C])) -> uint8 (N, C, H, W); an image that
        cannot be read is a DataError naming it (its path, or its position in the list)."""
        arrays = []
        for i, image in enumerate(images):
            if isinstance(image, str) and not os.path.exists(image):
                if image.lower().endswith(IMAGE_SUFFIXES):
                    raise DataError(f"{image}: file not found")
                raise DataError(f"{self.path} classifies images (model.kind {self.cfg.model.kind}); {_clip(image)!r} "
                                f"is not an image file. Give image files (PNG, JPEG, BMP, GIF ...)")
            where = image if isinstance(image, (str, os.PathLike)) else f"image {i + 1}"
            arrays.append(torch.from_numpy(self.preprocess.decode(image, where)))
        C, (H, W) = self.preprocess.channels_, self.preprocess.size_
        return torch.stack(arrays) if arrays else torch.empty((0, C, H, W), dtype=torch.uint8)

    def dataset(self, images, labels=None):
        from danlu.data.images import ImageDataset

        targets = None
        if labels is not None:
            index = {label: i for i, label in enumerate(self.labels)}
            targets = np.asarray([index[str(label)] for label in labels], dtype=np.int64)
        return ImageDataset(self.pixels(images), targets, self.preprocess)

    @torch.inference_mode()
    def predict_proba(self, images, batch_size=64):
        """(N, C) class probabilities, in the order of `images`; uint8 tensors (C, H, W) at the run's size
        (what `preprocess.decode` returns, as the server queues them) are taken as already decoded."""
        if images and all(isinstance(x, torch.Tensor) and x.dtype == torch.uint8 for x in images):
            return self.predict_pixels(torch.stack(list(images)), batch_size)
        return self.predict_pixels(self.pixels(images), batch_size)

    @torch.inference_mode()
    def predict_pixels(self, pixels, batch_size=64):
        """(N, C) class probabilities of decoded uint8 images (N, C, H, W) at the run's size."""
        device = next(self.model.parameters()).device
        self.model.eval()
        out = torch.empty(len(pixels), len(self.labels))
        for start in range(0, len(pixels), batch_size):
            x = self.preprocess(pixels[start : start + batch_size]).to(device)  # (B, C, h, w)
            out[start : start + len(x)] = self.model(x).float().softmax(-1).cpu()
        return out

    def read(self, path, **data_overrides):
        """Labelled images from a folder or table, decoded with the run's preprocessing -> (dataset, examples)."""
        data_cfg = dataclasses.replace(self.cfg.data, **data_overrides)
        examples = read_images(path, data_cfg)
        return encode_images(examples, self.preprocess, self.labels, data_cfg.on_bad_rows)

    def evaluate(self, path, **data_overrides):
        """Streaming metrics on a labelled folder or table of images."""
        dataset, _ = self.read(path, **data_overrides)
        return self.trainer().evaluate(dataset)


def load_image_run(path, device="cpu") -> ImageRun:
    path = os.fspath(path)
    for name in ("config.yaml", PREPROCESS_FILE, "labels.json", "model.safetensors"):
        if not os.path.exists(os.path.join(path, name)):
            raise ConfigError(f"{path}: not a finished run: {name} is missing"
                              + (" (an interrupted run resumes with: danlu train RUN --resume)"
                                 if name == "model.safetensors" else ""))
    cfg = config_mod.load(os.path.join(path, "config.yaml"))
    preprocess = ImagePreprocess.load(os.path.join(path, PREPROCESS_FILE))
    labels = read_json(os.path.join(path, "labels.json"))
    model = build_model(cfg.model, image_spec(preprocess, labels))
    weights = os.path.join(path, "model.safetensors")
    tensors, _ = load_tensors(weights)
    if os.path.exists(os.path.join(path, "compression.json")):  # a compressed run: its shapes and layers first
        from danlu.compress import load_compressed, read_record

        model = load_compressed(model, read_record(path), tensors, where=weights)
    else:
        load_weights(model, tensors, where=weights)
    model.to(pick_device(device) if device == "auto" else torch.device(device))
    metrics_file = os.path.join(path, "metrics.json")
    metrics = read_json(metrics_file) if os.path.exists(metrics_file) else {}
    return ImageRun(path, cfg, model, preprocess, labels, metrics)


def refuse_images_for_text_run(run, items):
    """A text run given image files (or bytes): a clear error instead of classifying a file name as text."""
    images = [x for x in items if not isinstance(x, str) or looks_like_image_file(x)]
    if images:
        first = images[0] if isinstance(images[0], str) else "image data"
        raise DataError(f"{run.path} classifies text (model.kind {run.cfg.model.kind}); {first} is an image. "
                        f"Images need an image run (model.kind cnn or vit)")


def _clip(text, limit=60):
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = ["ImageRun", "ImageExamples", "ImageError", "is_image_run", "load_image_run", "train_images"]


def predict_images(run, images=(), file=None, out=None, top_k=None):
    """`danlu predict RUN a.png b.jpg` and `--file`: a text file of image paths (one a line, relative to the
    list or to the working directory), a CSV / JSONL table with the run's image column, or a folder.
    Prints `label<TAB>score<TAB>image` per image, or JSON lines with --file (into `out` when given)."""
    import json

    if not images and not file:
        raise ConfigError("predict: give image files to classify, or --file FILE (a list of image paths, a table "
                          "with an image column, or a folder)")
    paths = list(images)
    if file:
        paths += _image_list(run, file)
    results = run.predict(paths, top_k=top_k)
    if not file:
        for path, result in zip(paths, results):
            print(f"{result['label']}\t{result['score']:.4f}\t{path}")
        return
    lines = [json.dumps({"image": p, **r}, ensure_ascii=False) for p, r in zip(paths, results)]
    if out:
        atomic_write_text(out, "\n".join(lines) + "\n")
        print(f"{len(lines)} predictions written to {out}")
    else:
        print("\n".join(lines))


def _image_list(run, file):
    if not os.path.exists(file):
        raise DataError(f"{file}: file not found")
    suffix = os.path.splitext(file)[1].lower()
    if os.path.isdir(file) or suffix in (".csv", ".tsv", ".jsonl", ".json", ".ndjson"):
        return list(read_images(file, dataclasses.replace(run.cfg.data, on_bad_rows="error"), need_labels=False).sources)
    base = os.path.dirname(os.path.abspath(file))
    paths = []
    with open(file, encoding="utf-8-sig") as f:
        for line in f:
            name = line.strip()
            if name and not name.startswith("#"):
                beside = os.path.join(base, name)
                paths.append(name if os.path.isabs(name) or not os.path.exists(beside) else beside)
    if not paths:
        raise DataError(f"{file}: no image paths in the list (one path a line)")
    return paths


def image_splits(run, limit=0):
    """(train, val, test) ImageDatasets of a run's own data, decoded with its saved preprocessing (not
    refitted): what compression's fine-tuning, calibration and scorecard measure on."""
    from danlu.data.images import read_image_splits

    cfg = run.cfg.data
    splits = read_image_splits(cfg, run.cfg.run.seed)
    out = []
    for name in ("train", "val", "test"):
        ex = splits[name]
        if limit:
            ex = ImageExamples(ex.sources[:limit], ex.labels[:limit], ex.origins[:limit], ex.skipped, ex.largest_pixel)
        out.append(encode_images(ex, run.preprocess, run.labels, cfg.on_bad_rows, augment=name == "train")[0])
    return out
