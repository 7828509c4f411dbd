"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

Image -> non-overlapping patches, each projected linearly (a convolution with stride = kernel = patch size)
-> a learned class token in front -> learned positions -> the same pre-norm Transformer blocks as the
text encoder (danlu.models.blocks) -> final norm -> the class token's state -> linear head.
Images whose sides are not a multiple of the patch size are zero-padded on the right and bottom.

Takes `pixel_values` (B, C, H, W), normalised, and returns logits (B, num_classes).
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from danlu.models.blocks import Block, init_weights, make_norm
from danlu.models.shapes import TransformerShape, image_input
from danlu.schema import Annotated, Literal, NonNegative, Positive, Range


@dataclass(frozen=True)
class ViTConfig(TransformerShape):
    """The shared Transformer fields (danlu.models.shapes), ViT's defaults for some, and ViT's own."""

    kind: str = "vit"
    embed_dim: Positive = 64
    norm_eps: Annotated[float, Range(gt=0)] = 1e-6
    size: str = ""
    """A preset of SIZE_PRESETS (tiny, small) under the keys given explicitly; empty: none."""
    patch_size: NonNegative = 0
    """Side of a square patch in pixels; 0: a grid of `grid` x `grid` patches (the longer side / grid, rounded up)."""
    grid: Positive = 4
    """Patches per side when patch_size is 0."""
    overlap: bool = False
    """Patch embedding with overlapping windows (kernel 2p - 1, stride p, as PVTv2's overlapping patch
    embedding, Wang et al. 2022): neighbouring patches share pixels, which helps on small datasets."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"


SIZE_PRESETS = {
    "tiny": {"embed_dim": 64, "num_heads": 4, "num_layers": 4},
    "small": {"embed_dim": 192, "num_heads": 3, "num_layers": 12},  # ViT-Ti/16 of Touvron et al. 2021 (DeiT)
}


class ViT(nn.Module):
    def __init__(self, config: ViTConfig, spec):
        super().__init__()
        self.config = config
        self.image_shape = image_input(config, spec)  # one input image (C, H, W)
        H, W = self.image_shape[1:]
        self.patch = config.patch_size or max(1, -(-max(H, W) // config.grid))
        self.grid = (-(-H // self.patch), -(-W // self.patch))  # (rows, columns) of patches
        C = config.embed_dim
        p = self.patch
        kernel, padding = (2 * p - 1, p - 1) if config.overlap and p > 1 else (p, 0)
        self.embed = nn.Conv2d(spec.channels, C, kernel, stride=p, padding=padding)  # (rows, cols) outputs either way
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.positions = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, C))
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(C, config.num_heads, None, config.ffn_dim, "gelu", config.norm, config.norm_eps, dropout=config.dropout)
            for _ in range(config.num_layers)
        )
        self.norm = make_norm(config.norm, C, config.norm_eps)
        self.head = nn.Linear(C, max(spec.num_classes, 1))
        init_weights(self, num_layers=config.num_layers)
        nn.init.normal_(self.positions, 0.0, 0.02)
        nn.init.normal_(self.cls_token, 0.0, 0.02)

    def forward(self, pixel_values):
        B, _, H, W = pixel_values.shape
        rows, cols = self.grid
        x = F.pad(pixel_values, (0, cols * self.patch - W, 0, rows * self.patch - H))  # (B, C_in, rows*p, cols*p)
        x = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, C) with N = rows * cols
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], 1) + self.positions  # (B, N + 1, C)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)  # (B, N + 1, C)
        return self.head(self.norm(x[:, 0]))  # (B, num_classes) from the class token
