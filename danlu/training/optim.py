"""Optimizers (the guide's SGD, momentum, Adam; plus AdamW) and learning-rate schedules."""
from __future__ import annotations

import math

import torch

from danlu.registry import resolve


def param_groups(model, weight_decay):
    """Decay matrices only; biases, norms and 1-d parameters are not decayed (as in GPT-2 / BERT)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, cfg):
    make = resolve(cfg.optimizer, OPTIMIZERS, "train.optimizer")
    return make(model, cfg)


OPTIMIZERS = {
    "sgd": lambda m, c: torch.optim.SGD(param_groups(m, c.weight_decay), lr=c.lr),
    "momentum": lambda m, c: torch.optim.SGD(param_groups(m, c.weight_decay), lr=c.lr, momentum=c.momentum),
    "adam": lambda m, c: torch.optim.Adam(param_groups(m, c.weight_decay), lr=c.lr, fused=_fused(c)),
    "adamw": lambda m, c: torch.optim.AdamW(param_groups(m, c.weight_decay), lr=c.lr, fused=_fused(c)),
}


def _fused(cfg):
    """torch's fused Adam kernel (one pass over all parameters) unless train.fused_optimizer is false, which
    leaves the choice to torch (on CPU a slow loop over the tensors)."""
    return True if getattr(cfg, "fused_optimizer", True) else None


def lr_factor(kind, step, warmup, total):
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind in ("constant", "warmup"):
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine (Loshchilov & Hutter 2017)


SCHEDULES = ("constant", "warmup", "linear", "cosine")


def build_schedule(optimizer, cfg, total_steps):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg.schedule, step, cfg.warmup_steps, total_steps)
    )
