"""LoRA (Hu et al. 2021): low-rank adapters added to a model by composition, for any model family.

`apply_lora(model, targets, r, alpha, dropout)` swaps each matching `nn.Linear` for a `LoRALinear`
that keeps the original layer frozen and adds `(alpha / r) * B(A(dropout(x)))`, with A (r, in) drawn
like a Linear's weight and B (out, r) zero, so that the adapted model starts equal to the base.
`merge_lora(model)` folds the adapters back into plain `nn.Linear`s (W + (alpha / r) * B @ A).

Targets are shell-style patterns over module names (`fnmatch`), e.g. `*.attn.qkv` or `blocks.*.ffn.*`.

>>> model = apply_lora(model, ["*.attn.qkv", "*.attn.out"], r=8, alpha=16)   # doctest: +SKIP
>>> adapter = lora_state_dict(model)          # lora_a / lora_b tensors only   # doctest: +SKIP
>>> plain = merge_lora(model)                                                 # doctest: +SKIP
"""
from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from danlu.registry import ConfigError

# The projections of danlu's attention and feed-forward blocks (GPT, BERT, transformer encoder).
DEFAULT_TARGETS = ("*.attn.qkv", "*.attn.out", "*.ffn.up", "*.ffn.down")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: y = base(x) + scale * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, r=8, alpha=16.0, dropout=0.0):
        super().__init__()
        if r < 1:
            raise ConfigError(f"finetune.lora_r: expected a rank >= 1, got {r}")
        self.base = base
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        for p in base.parameters():
            p.requires_grad_(False)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features, **factory))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, **factory))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout)

    @property
    def weight(self):  # read-only view for code that inspects layer.weight (shapes, dtype, device)
        return self.base.weight

    def forward(self, x):
        update = self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()  # (..., in) -> (..., r) -> (..., out)
        return self.base(x) + self.scale * update

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function."""
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.scale * (self.lora_b @ self.lora_a))
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}"


def apply_lora(model, targets=DEFAULT_TARGETS, r=8, alpha=16.0, dropout=0.0, trainable=()):
    """Freeze `model` and wrap every nn.Linear whose name matches a pattern in `targets`; modules whose
    name matches a pattern in `trainable` (e.g. a new classification head, `head`) stay trainable.
    Returns the model (changed in place). Raises if no layer matches."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    chosen = [name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in targets)]
    if not chosen:
        raise ConfigError(f"finetune.lora_targets: {list(targets)} match no linear layer; linear layers are named like: "
                          + ", ".join(names[:6]))
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(getattr(owner, child), r, alpha, dropout))
    set_trainable(model, trainable)
    return model


def set_trainable(model, patterns):
    """Unfreeze the parameters of modules whose name matches one of `patterns` (fnmatch)."""
    for name, module in model.named_modules():
        if name and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            for p in module.parameters():
                p.requires_grad_(True)
    return model


def merge_lora(model):
    """Replace every LoRALinear by the equivalent plain nn.Linear; returns the model (changed in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(model, extra=()):
    """The adapter: lora_a / lora_b tensors, plus the parameters under module names matching `extra`
    (what fine-tuning trained besides the adapters, e.g. a classification head)."""
    out = {}
    for name, tensor in model.state_dict().items():
        module = name.rpartition(".")[0]
        if name.endswith((".lora_a", ".lora_b")) or any(fnmatch.fnmatchcase(module, p) for p in extra):
            out[name] = tensor
    return out


def count_trainable(model):
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
