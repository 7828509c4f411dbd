"""Convolutional image classifier: the guide's conv -> pool -> dense, and a small ResNet (He et al. 2016).

Two kinds of stage, chosen by `blocks`:
  - blocks 0 (plain): per width, conv -> ReLU -> 2x2 max-pool; then flatten -> dense -> head, as the
    guide's Keras CNN (Conv2D, MaxPooling2D, Flatten, Dense), initialised as Keras does. The layers run as
    conv -> max-pool -> ReLU: the same function and the same gradients (ReLU is monotone, so the max of the
    rectified window is the rectified max, and both orders route a window's gradient to its first largest
    input, tests/test_vision.py), with the ReLU on a map 4x smaller. The 2x2 pool of float32 CPU maps runs
    danlu.kernels.max_pool2d's C kernel: F.max_pool2d's results, about 10x faster on the guide's 8x8 maps.
  - blocks N (residual): a 3x3 stem, then per width N basic blocks (conv-BN-ReLU-conv-BN + shortcut,
    He et al. 2016, §3.3 and Fig. 2); every stage after the first halves height and width with a stride-2
    first block and a 1x1 projection shortcut. Global average pooling -> head, so any image size works.

Takes `pixel_values` (B, C, H, W), normalised, and returns logits (B, num_classes).
"""
from dataclasses import dataclass

import torch
from torch import nn

from danlu.kernels import max_pool2d
from danlu.models.shapes import image_input
from danlu.registry import ConfigError
from danlu.schema import Fraction, Literal, NonNegative, Positive


@dataclass(frozen=True)
class CNNConfig:
    kind: str = "cnn"
    size: str = ""
    """A preset of SIZE_PRESETS (guide, small, base) under the keys given explicitly; empty: none."""
    channels: tuple[Positive, ...] = (32, 64)
    """Width of each stage; in residual stages every stage after the first halves height and width."""
    blocks: NonNegative = 1
    """Residual blocks per stage; 0: plain stages conv -> ReLU -> max-pool (the guide's CNN)."""
    kernel_size: Positive = 3
    """Side of the square convolution windows (odd, so that "same" padding is symmetric)."""
    downsample: NonNegative = 0
    """Residual stacks: a patchify stem (a convolution with kernel = stride = this factor, as ConvNeXt's,
    Liu et al. 2022) shrinks the image before the stages; 1: none (a 3x3 stem at full size); 0: the largest
    power of 2 that leaves the shorter side at least 12 pixels (8x8 digits: 1, 28x28: 2, 64x64: 4)."""
    norm: Literal["batch", "none"] = "batch"
    """batch (batch normalisation, Ioffe & Szegedy 2015, after each convolution) or none."""
    pooling: Literal["avg", "flatten"] = "avg"
    """avg (global average pooling: any image size) or flatten (every position's features into the dense layer)."""
    hidden_dim: NonNegative = 0
    """A dense ReLU layer between the pooled features and the head (0: none)."""
    dropout: Fraction = 0.0
    """Dropout before the head (and after the hidden layer)."""

    def __post_init__(self):  # each width's, kind's and size's range is checked at load
        if not self.channels:
            raise ConfigError("model.channels: expected at least one stage width, e.g. [32, 64]")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"model.kernel_size: expected an odd number, got {self.kernel_size}")


# model.size: presets are data (under the keys a config gives explicitly)
SIZE_PRESETS = {
    "guide": {"channels": (32,), "blocks": 0, "norm": "none", "pooling": "flatten", "hidden_dim": 128},
    "small": {"channels": (32, 64), "blocks": 1},
    "base": {"channels": (64, 128, 256), "blocks": 2},
}


def conv_norm(in_ch, out_ch, kernel_size, stride, norm):
    """A convolution (no bias when a norm follows) and its norm."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=norm == "none")
    return nn.Sequential(conv, nn.BatchNorm2d(out_ch) if norm == "batch" else nn.Identity())


def stem_factor(height, width, smallest=12):
    """The largest power of 2 that leaves the shorter side at least `smallest` pixels (1 for small images)."""
    factor = 1
    while min(height, width) // (factor * 2) >= smallest:
        factor *= 2
    return factor


def keras_init(layer):
    """Keras's defaults for Conv2D and Dense: glorot_uniform weights (Glorot & Bengio 2010: U(+-sqrt(6 /
    (fan_in + fan_out)))) and zero biases, instead of torch's kaiming_uniform(a=sqrt(5)) and uniform biases.
    On the guide CNN over seeds 0-4 (docs/results/cnn.md) mean test accuracy 0.9733 with torch's, 0.9778
    with these, Keras 0.9800."""
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d computed by danlu.kernels.max_pool2d: the same results, a C kernel for 2x2 float32 CPU pools."""

    def forward(self, x):
        return max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                          self.return_indices)  # (B, C, H // 2, W // 2)


class BasicBlock(nn.Module):
    """relu(x + F(x)) with F = conv-norm-ReLU-conv-norm (He et al. 2016, Fig. 2)."""

    def __init__(self, in_ch, out_ch, kernel_size, stride, norm):
        super().__init__()
        self.conv1 = conv_norm(in_ch, out_ch, kernel_size, stride, norm)
        self.conv2 = conv_norm(out_ch, out_ch, kernel_size, 1, norm)
        # option B of the paper: a 1x1 projection where the shape changes, identity elsewhere
        self.shortcut = conv_norm(in_ch, out_ch, 1, stride, norm) if stride != 1 or in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = torch.relu_(self.conv1(x))  # (B, out, H / stride, W / stride); in place: no backward reads it
        return torch.relu_(self.conv2(h) + self.shortcut(x))


class CNN(nn.Module):
    def __init__(self, config: CNNConfig, spec):
        super().__init__()
        self.config = config
        self.image_shape = image_input(config, spec)  # one input image (C, H, W)
        widths, k, norm = [int(c) for c in config.channels], config.kernel_size, config.norm
        H, W = self.image_shape[1:]
        layers = []
        if config.blocks == 0:
            in_ch = spec.channels
            for width in widths:
                layers.append(conv_norm(in_ch, width, k, 1, norm))
                if min(H, W) >= 2:  # a 1-pixel map is not pooled further
                    layers.append(MaxPool2d(2))  # before the ReLU: see the module docstring
                    H, W = H // 2, W // 2
                layers.append(nn.ReLU(inplace=True))  # nothing saved for backward reads the pool's output
                in_ch = width
        else:
            factor = config.downsample or stem_factor(H, W)
            if factor > 1:  # patchify: each factor x factor patch -> one position
                stem = nn.Conv2d(spec.channels, widths[0], factor, factor, bias=norm == "none")
                layers += [nn.Sequential(stem, nn.BatchNorm2d(widths[0]) if norm == "batch" else nn.Identity()), nn.ReLU(inplace=True)]
                H, W = H // factor, W // factor
            else:
                layers += [conv_norm(spec.channels, widths[0], k, 1, norm), nn.ReLU(inplace=True)]  # the stem
            in_ch = widths[0]
            for s, width in enumerate(widths):
                for b in range(config.blocks):
                    stride = 2 if s > 0 and b == 0 and min(H, W) >= 2 else 1
                    layers.append(BasicBlock(in_ch, width, k, stride, norm))
                    H, W = -(-H // stride), -(-W // stride)
                    in_ch = width
        self.features = nn.Sequential(*layers)
        features = in_ch * H * W if config.pooling == "flatten" else in_ch
        self.hidden = nn.Linear(features, config.hidden_dim) if config.hidden_dim else None
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_dim or features, max(spec.num_classes, 1))
        if config.blocks == 0:  # the guide's Keras CNN, with Keras's initialisation (below)
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    keras_init(m)

    def forward(self, pixel_values):
        x = self.features(pixel_values)  # (B, C', H', W')
        x = x.flatten(1) if self.config.pooling == "flatten" else x.mean((2, 3))  # (B, C' H' W') or (B, C')
        if self.hidden is not None:
            x = self.dropout(torch.relu_(self.hidden(x)))  # (B, hidden_dim)
        return self.head(self.dropout(x))  # (B, num_classes)
