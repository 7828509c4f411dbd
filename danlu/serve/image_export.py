"""ONNX export of an image run, preprocessing included, checked against PyTorch in onnxruntime.

    danlu export runs/cnn_digits --format onnx

The graph takes what decoding leaves: `pixels`, uint8 (B, C, H, W) at the run's resized size (Pillow:
channels converted, transparency on white, bilinear resize; preprocess.json says how), and does the
rest itself (scale to [0, 1], centre crop, normalise with the training split's statistics) before the
model, returning `logits` (B, num_classes). The exported folder holds model.onnx, preprocess.json,
labels.json, config.yaml and export.json; OnnxImageModel runs it with onnxruntime, Pillow and numpy.

Parity is checked twice: on random uint8 batches of several sizes, and end to end on images encoded as
PNG files, decoded once by OnnxImageModel and once by the run itself (Run.predict).

>>> report = export_image_onnx(load_run("runs/cnn_digits"))                          # doctest: +SKIP
>>> OnnxImageModel("runs/cnn_digits/export/onnx").predict(["seven.png"])[0]["label"]  # doctest: +SKIP
"""
from __future__ import annotations

import io
import json
import os
import shutil
import time

import numpy as np
import torch
from torch import nn

COPIED = ("preprocess.json", "labels.json", "config.yaml")


class ImageGraph(nn.Module):
    """uint8 pixels (B, C, H, W) -> logits (B, num_classes): the run's evaluation transform, then its model."""

    def __init__(self, model, preprocess):
        super().__init__()
        self.model = model
        C = preprocess.channels_
        self.register_buffer("mean", torch.tensor(preprocess.mean_ if preprocess.normalize else [0.0] * C).view(1, C, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std_ if preprocess.normalize else [1.0] * C).view(1, C, 1, 1))
        H, W = preprocess.size_
        h, w = preprocess.input_size_
        self.top, self.left, self.height, self.width = (H - h) // 2, (W - w) // 2, h, w

    def forward(self, pixels):
        x = pixels.float() / 255  # (B, C, H, W)
        x = x[:, :, self.top : self.top + self.height, self.left : self.left + self.width]  # (B, C, h, w)
        return self.model((x - self.mean) / self.std)  # (B, num_classes)


def export_image_onnx(run, out=None, opset=18, check=True, batch_sizes=(1, 16), repeats=20) -> dict:
    from danlu.serve.onnx_runtime import TOLERANCE, ExportError, finish_report, median_ms_alternating, ort_session, quiet

    out = os.fspath(out or os.path.join(run.path, "export", "onnx"))
    os.makedirs(out, exist_ok=True)
    pre = run.preprocess
    graph = ImageGraph(run.model.eval().to("cpu"), pre).eval()
    C, (H, W) = pre.channels_, pre.size_
    example = (torch.randint(0, 256, (3, C, H, W), dtype=torch.uint8),)
    path = os.path.join(out, "model.onnx")
    started = time.perf_counter()
    with quiet():
        try:
            program = torch.onnx.export(graph, example, input_names=["pixels"], output_names=["logits"],
                                        dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}}, opset_version=opset,
                                        dynamo=True, verbose=False, optimize=True)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"torch.export could not capture {type(run.model).__name__}: {str(e).strip()[:300]}") from None
    program.save(path)
    seconds = time.perf_counter() - started
    for name in COPIED:
        shutil.copyfile(os.path.join(run.path, name), os.path.join(out, name))
    report = {"format": "onnx", "opset": opset, "run": os.path.abspath(run.path), "task": run.cfg.task,
              "kind": "image_classifier", "model": run.cfg.model.kind, "inputs": ["pixels"], "outputs": ["logits"],
              "pixels": {"dtype": "uint8", "shape": ["batch", C, H, W],
                         "decode": "preprocess.json: Pillow, channels, transparency on white, bilinear resize"},
              "export_seconds": round(seconds, 2), "torch_version": torch.__version__}
    if check:
        session = ort_session(path)
        worst, cases = 0.0, []
        g = torch.Generator().manual_seed(0)
        for batch in (1, 5, 16):
            pixels = torch.randint(0, 256, (batch, C, H, W), dtype=torch.uint8, generator=g)
            with torch.inference_mode():
                expected = run.model(pre(pixels)).float().numpy()  # the run's own path: preprocess, then model
            got = session.run(None, {"pixels": pixels.numpy()})[0]
            diff = float(np.abs(got - expected).max())
            worst = max(worst, diff)
            cases.append({"batch": batch, "input": "random uint8", "max_abs_diff": diff})
        files = _png_files(pre, 4)  # end to end: image files decoded by the exported folder's reader and by the run
        with open(os.path.join(out, "export.json"), "w", encoding="utf-8") as f:
            json.dump(report, f)
        onnx_probs = OnnxImageModel(out).predict_proba(files)
        run_probs = run.predict_proba(files).numpy()
        diff = float(np.abs(onnx_probs - run_probs).max())
        worst = max(worst, diff)
        cases.append({"batch": len(files), "input": "PNG files, decoded", "max_abs_diff_probabilities": diff})
        report["parity"] = {"max_abs_diff": worst, "tolerance": TOLERANCE, "passed": worst <= TOLERANCE, "cases": cases}
        rows = []
        for batch in batch_sizes:
            pixels = torch.randint(0, 256, (batch, C, H, W), dtype=torch.uint8, generator=g)
            feed = {"pixels": pixels.numpy()}
            timed = ort_session(path, threads=torch.get_num_threads())

            def run_torch(pixels=pixels):
                with torch.inference_mode():
                    graph(pixels)

            torch_ms, ort_ms = median_ms_alternating(run_torch, lambda feed=feed, s=timed: s.run(None, feed), repeats)
            rows.append({"batch": batch, "length": f"{H}x{W}", "torch_ms": round(torch_ms, 3),
                         "onnxruntime_ms": round(ort_ms, 3), "speedup": round(torch_ms / ort_ms, 2) if ort_ms else None})
        report["latency"] = rows
    return finish_report(report, out, path, check)


def _png_files(pre, n):
    """n PNG files' bytes of random images at twice the run's size (so the resize is exercised)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    H, W = pre.size_
    out = []
    for _ in range(n):
        array = rng.integers(0, 256, (2 * H, 2 * W, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array, "RGB").save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


class OnnxImageModel:
    """An exported image folder, run with onnxruntime, Pillow and numpy (no danlu model code).

    >>> m = OnnxImageModel("exported/cnn_digits")           # doctest: +SKIP
    >>> m.predict(["seven.png"])[0]["label"]                # doctest: +SKIP
    """

    def __init__(self, path):
        from danlu.data.image_transforms import ImagePreprocess
        from danlu.serve.onnx_runtime import ort_session

        self.path = os.fspath(path)
        self.preprocess = ImagePreprocess.load(os.path.join(self.path, "preprocess.json"))
        with open(os.path.join(self.path, "labels.json"), encoding="utf-8") as f:
            self.labels = tuple(json.load(f))
        self.session = ort_session(os.path.join(self.path, "model.onnx"))

    def pixels(self, images):
        """Files, bytes or PIL images -> uint8 (B, C, H, W), decoded as the run decodes them."""
        return np.stack([self.preprocess.decode(image) for image in images])

    def predict_proba(self, images):
        logits = self.session.run(None, {"pixels": self.pixels(images)})[0]  # (B, C)
        z = np.exp(logits - logits.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    def predict(self, images):
        """[{label, score, probabilities}] per image, as Run.predict returns them."""
        out = []
        for row in self.predict_proba(images).tolist():
            best = int(np.argmax(row))
            pairs = sorted(zip(self.labels, row), key=lambda p: -p[1])
            out.append({"label": self.labels[best], "score": row[best], "probabilities": dict(pairs)})
        return out
