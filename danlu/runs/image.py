"""Image runs: a classifier of images (model.kind cnn, vit) and its preprocessing.

    runs/<name>/
      config.yaml  preprocess.json  labels.json  model.safetensors  metrics.json  history.jsonl  report.*

`preprocess.json` (danlu.data.image_transforms) takes the place of tokenizer.json, so predict, serve and
export prepare an image exactly as training did. Training them is danlu.jobs.images'.

>>> run = load_run("runs/cnn_digits")                    # doctest: +SKIP  (danlu.runs.load_run)
>>> run.predict(["seven.png"])[0]["label"]               # doctest: +SKIP
'7'
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from danlu import config as config_mod
from danlu.data.image_transforms import ImagePreprocess
from danlu.data.images import IMAGE_SUFFIXES, clip_text, encode_images, image_spec, read_images
from danlu.data.sources import DataError
from danlu.files import load_tensors, load_weights, read_json
from danlu.models import build_model
from danlu.registry import ConfigError
from danlu.runs import layout
from danlu.runs.compressed import load_compressed, read_record
from danlu.runs.run import Run

def is_image_run(path):
    """Whether a run directory holds an image classifier (it has preprocess.json)."""
    return os.path.exists(os.path.join(os.fspath(path), layout.PREPROCESS))


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
                raise DataError(f"{self.path} classifies images (model.kind {self.cfg.model.kind}); {clip_text(image)!r} "
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


def load_image_run(path, device="cpu") -> ImageRun:
    path = os.fspath(path)
    for name in (layout.CONFIG, layout.PREPROCESS, layout.LABELS, layout.WEIGHTS):
        if not os.path.exists(os.path.join(path, name)):
            raise ConfigError(f"{path}: not a finished run: {name} is missing"
                              + (" (an interrupted run resumes with: danlu train RUN --resume)"
                                 if name == "model.safetensors" else ""))
    cfg = config_mod.load(os.path.join(path, "config.yaml"))
    preprocess = ImagePreprocess.load(os.path.join(path, layout.PREPROCESS))
    labels = read_json(os.path.join(path, "labels.json"))
    model = build_model(cfg.model, image_spec(preprocess, labels))
    weights = os.path.join(path, "model.safetensors")
    tensors, _ = load_tensors(weights)
    if os.path.exists(os.path.join(path, layout.COMPRESSION)):  # a compressed run: its shapes and layers first
        model = load_compressed(model, read_record(path), tensors, where=weights)
    else:
        load_weights(model, tensors, where=weights)
    model.to(torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device))
    metrics_file = os.path.join(path, "metrics.json")
    metrics = read_json(metrics_file) if os.path.exists(metrics_file) else {}
    return ImageRun(path, cfg, model, preprocess, labels, metrics)
