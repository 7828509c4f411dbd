"""Image preprocessing: one object from decoding to the model's input, fitted on the training split.

    decode (Pillow) -> channels (1 or 3; transparency composited on white) -> resize to `size`   [uint8, cached]
    -> scale to [0, 1] -> crop (random on training batches, centre otherwise) -> normalise -> flip (training)

The first three steps run once per image and their uint8 result is what a dataset keeps in memory, so an
epoch never decodes a file again; the rest runs in torch on whole batches. The fitted state (size, channels,
per-channel mean and standard deviation of the training split) saves as one JSON file, preprocess.json, and
the same object prepares images for training, predict, serve and the exported ONNX graph (which does the
crop and normalisation itself).

>>> pre = ImagePreprocess(size=(28, 28)).fit(shapes=[(28, 28)], channels=[1])       # doctest: +SKIP
>>> pre.fit_statistics(pixels)                                                      # doctest: +SKIP
>>> x = pre(torch.from_numpy(pre.decode("seven.png"))[None])  # (1, 1, 28, 28)      # doctest: +SKIP
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch

from danlu.data.sources import DataError
from danlu.files import atomic_write_json, read_json

FORMAT = "danlu-image-preprocess"
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")


class ImageError(DataError):
    """An image that cannot be read: the message names it and says why."""


class ImagePreprocess:
    """The image transform of a run. Learned state ends in `_` (scikit-learn's convention)."""

    def __init__(self, size=(), crop=(), pad_crop=0, flip=False, channels=0, normalize=True, pixel_max=0.0, max_size=64):
        self.size, self.crop, self.max_size = _pair(size), _pair(crop), int(max_size)
        self.pad_crop, self.flip, self.channels = int(pad_crop), bool(flip), int(channels)
        self.normalize, self.pixel_max = bool(normalize), float(pixel_max)

    @classmethod
    def from_config(cls, cfg):
        """From the `data.image` section (danlu.config.ImageConfig)."""
        return cls(cfg.size, cfg.crop, cfg.pad_crop, cfg.flip, cfg.channels, cfg.normalize, cfg.pixel_max, cfg.max_size)

    # -- fitting ---------------------------------------------------------------------------------------
    def fit(self, shapes, channels, pixel_max=0.0):
        """Size and channels from the training images' (height, width) and channel counts (1 or 3):
        their common size, or their median when they differ; grayscale only if every one is."""
        if not shapes:
            raise DataError("no training images to fit the image preprocessing on")
        if self.size:
            self.size_ = self.size
        else:
            heights, widths = zip(*shapes)
            H, W = float(np.median(heights)), float(np.median(widths))
            scale = min(1.0, self.max_size / max(H, W))  # large photos: the longer side down to max_size
            self.size_ = (max(1, round(H * scale)), max(1, round(W * scale)))
        self.channels_ = self.channels or (1 if all(c == 1 for c in channels) else 3)
        self.input_size_ = self.crop or self.size_
        if self.input_size_[0] > self.size_[0] + 2 * self.pad_crop or self.input_size_[1] > self.size_[1] + 2 * self.pad_crop:
            raise DataError(f"data.image.crop {list(self.input_size_)} is larger than the resized image "
                            f"{list(self.size_)}; crop to at most the size")
        self.pixel_max_ = self.pixel_max or _pixel_max(pixel_max)
        self.mean_, self.std_ = [0.0] * self.channels_, [1.0] * self.channels_
        return self

    def fit_statistics(self, pixels):
        """Per-channel mean and standard deviation of uint8 images (N, C, H, W), in [0, 1] units."""
        if self.normalize and len(pixels):
            total = torch.zeros(self.channels_, dtype=torch.float64)
            squares = torch.zeros(self.channels_, dtype=torch.float64)
            for chunk in pixels.split(4096):  # (n, C, H, W), in float64 a chunk at a time
                x = chunk.to(torch.float64) / 255
                total += x.sum((0, 2, 3))
                squares += (x * x).sum((0, 2, 3))
            count = pixels.shape[0] * pixels.shape[2] * pixels.shape[3]
            mean = total / count
            std = (squares / count - mean * mean).clamp(min=0).sqrt()
            self.mean_ = mean.tolist()
            self.std_ = [max(s, 1e-3) for s in std.tolist()]  # a constant channel is not divided by zero
        return self

    # -- decoding (once per image) ----------------------------------------------------------------------
    def decode(self, source, where=None):
        """A file path, bytes, a PIL image or an array (H, W[, C]) -> uint8 array (C, H, W) at `size_`.

        Raises ImageError naming `where` (default: the path) when the image cannot be read."""
        where = where or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "image")
        if isinstance(source, np.ndarray):
            return self._from_array(source, where)
        image = open_image(source, where)
        return self._from_pil(image, where)

    def _from_pil(self, image, where):
        from PIL import Image

        image = to_mode(image, self.channels_)
        H, W = self.size_
        if image.size != (W, H):
            image = image.resize((W, H), Image.Resampling.BILINEAR)  # Pillow antialiases when it shrinks
        array = np.array(image, dtype=np.uint8)  # a writable copy
        return np.ascontiguousarray(array.reshape(H, W, -1).transpose(2, 0, 1))  # (C, H, W)

    def _from_array(self, array, where):
        from PIL import Image

        if array.ndim == 2:
            array = array[:, :, None]  # (H, W, 1)
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ImageError(f"{where}: expected an image array (height, width[, 1, 3 or 4 channels]), got shape "
                             f"{list(array.shape)}")
        if array.dtype != np.uint8:
            if not np.isfinite(array).all():
                raise ImageError(f"{where}: the pixel values are not all finite numbers")
            array = np.clip(np.rint(array.astype(np.float64) * (255.0 / self.pixel_max_)), 0, 255).astype(np.uint8)
        if array.shape[2] == 1 and self.channels_ == 1 and tuple(array.shape[:2]) == tuple(self.size_):
            return array.transpose(2, 0, 1).copy()  # (1, H, W): nothing to convert
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[2]]
        return self._from_pil(Image.fromarray(array[:, :, 0] if mode == "L" else array, mode), where)

    # -- the torch part (whole batches) ---------------------------------------------------------------------
    def __call__(self, pixels):
        """uint8 (B, C, H, W) -> float (B, C, h, w): the evaluation transform (centre crop, normalise)."""
        x = self._scale(pixels)
        h, w = self.input_size_
        top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
        return x[:, :, top : top + h, left : left + w]  # (B, C, h, w)

    def augment(self, pixels, rng):
        """The training transform: normalise, pad by `pad_crop` (with the mean, 0 after normalising), crop at a
        random place, mirror half of the images when `flip`. `rng` is a numpy Generator: a batch's
        augmentation is a pure function of its seed, so a resumed run sees the same batches."""
        x = self._scale(pixels)  # (B, C, H, W)
        B = x.shape[0]
        h, w = self.input_size_
        p = self.pad_crop
        if p:
            x = torch.nn.functional.pad(x, (p, p, p, p))  # (B, C, H + 2p, W + 2p)
        if (h, w) != tuple(x.shape[2:]):
            top = torch.from_numpy(rng.integers(0, x.shape[2] - h + 1, B))  # (B,)
            left = torch.from_numpy(rng.integers(0, x.shape[3] - w + 1, B))  # (B,)
            rows = (top[:, None] + torch.arange(h))[:, :, None]  # (B, h, 1)
            cols = (left[:, None] + torch.arange(w))[:, None, :]  # (B, 1, w)
            x = x.permute(0, 2, 3, 1)[torch.arange(B)[:, None, None], rows, cols].permute(0, 3, 1, 2)  # (B, C, h, w)
        if self.flip:
            mirror = torch.from_numpy(rng.random(B) < 0.5)[:, None, None, None]  # (B, 1, 1, 1)
            x = torch.where(mirror, x.flip(-1), x)
        return x.contiguous()

    def random(self):
        """Whether the training transform differs from the evaluation one (padding, a random crop, flips)."""
        return bool(self.pad_crop or self.flip or tuple(self.input_size_) != tuple(self.size_))

    def fitted(self):
        """Whether `fit` (or `load`) has set the learned state."""
        return hasattr(self, "mean_")

    def _scale(self, pixels):
        x = pixels.float() / 255  # (B, C, H, W) in [0, 1]
        if self.normalize:
            mean = torch.tensor(self.mean_, dtype=x.dtype).view(1, -1, 1, 1)  # (1, C, 1, 1)
            std = torch.tensor(self.std_, dtype=x.dtype).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    # -- saving ---------------------------------------------------------------------------------------
    def to_dict(self):
        return {"format": FORMAT, "version": 1, "size": list(self.size_), "channels": self.channels_,
                "crop": list(self.crop), "input_size": list(self.input_size_), "resample": "bilinear",
                "scale": "pixel / 255", "normalize": self.normalize, "mean": self.mean_, "std": self.std_,
                "pad_crop": self.pad_crop, "flip": self.flip, "pixel_max": self.pixel_max_}

    def save(self, path):
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path):
        path = os.fspath(path)
        try:
            d = read_json(path)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the image preprocessing ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise DataError(f"{path}: not a danlu image preprocessing file (expected \"format\": \"{FORMAT}\")")
        try:
            pre = cls(d["size"], d["crop"], d["pad_crop"], d["flip"], d["channels"], d["normalize"], d["pixel_max"])
            pre.size_, pre.channels_, pre.input_size_ = pre.size, pre.channels, _pair(d["input_size"])
            pre.pixel_max_, pre.mean_, pre.std_ = float(d["pixel_max"]), list(d["mean"]), list(d["std"])
        except KeyError as e:
            raise DataError(f"{path}: the key {e.args[0]!r} is missing") from None
        if len(pre.mean_) != pre.channels_ or len(pre.std_) != pre.channels_:
            raise DataError(f"{path}: mean and std need one value per channel ({pre.channels_})")
        return pre


def open_image(source, where):
    """Open with Pillow and load the first frame (GIF, TIFF): ImageError with the reason when it fails."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(source)))
        else:
            image = Image.open(os.fspath(source))
        image.seek(0)
        image.load()
        return image
    except FileNotFoundError:
        raise ImageError(f"{where}: file not found") from None
    except UnidentifiedImageError:
        raise ImageError(f"{where}: not an image Pillow can read (PNG, JPEG, BMP, GIF, WebP, TIFF ...)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{where}: too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise ImageError(f"{where}: the image data is corrupt or truncated ({e})") from None


def to_mode(image, channels):
    """1 channel ("L") or 3 ("RGB"). Transparent pixels are composited on white; 16-bit and float grayscale
    are scaled to 8 bits by their range."""
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0) if image.mode == "I" else 1.0
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def source_shape(source, where):
    """((height, width), channels 1 or 3) of an image without decoding its pixels (a header read)."""
    if isinstance(source, np.ndarray):
        return tuple(source.shape[:2]), 1 if source.ndim == 2 or source.shape[2] == 1 else 3
    from PIL import Image

    if isinstance(source, Image.Image):
        W, H = source.size
        return (H, W), 1 if source.mode in GRAY_MODES else 3
    try:
        with Image.open(io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else os.fspath(source)) as image:
            W, H = image.size
            return (H, W), 1 if image.mode in GRAY_MODES else 3
    except Exception:  # noqa: BLE001 - the decode that follows names the reason
        return None


def _pair(value):
    value = tuple(int(v) for v in (value or ()))
    return (value[0], value[0]) if len(value) == 1 else value


def _pixel_max(largest):
    """The full-intensity value of a pixel table: 1, 16 (scikit-learn's digits) or 255."""
    for top in (1.0, 16.0, 255.0):
        if largest <= top:
            return top
    return float(largest)
