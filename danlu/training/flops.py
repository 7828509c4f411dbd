"""Model FLOPs utilisation: the FLOPs a training step needs over the FLOPs the hardware could do.

FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B): 6 N for the matmul weights N (forward 2 N,
backward 4 N; embedding lookups are not matmuls, a tied output head is) plus 12 L C T for attention
scores and values (L layers, width C, context T). The peak is measured once with a large matmul in the
training dtype, unless `train.peak_flops` gives it (e.g. a GPU's datasheet number).

>>> mfu = tokens_per_s * training_flops_per_token(model, 256) / measure_peak_flops(torch.device("cpu"))  # doctest: +SKIP
"""
from __future__ import annotations

import time

import torch
from torch import nn


def training_flops_per_token(model, seq_len):
    """6 N + 12 L C T, with N the weights of every nn.Linear (a tied head counted once)."""
    seen, weights = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            weights += module.weight.numel()
    config = getattr(model, "config", None)
    layers, width = getattr(config, "num_layers", 0), getattr(config, "embed_dim", 0)
    return 6 * weights + 12 * layers * width * seq_len


def measure_peak_flops(device, dtype=torch.float32, size=2048, repeats=10):
    """Best FLOP/s of a size x size matmul in `dtype` on `device` (the dense-math ceiling the model can reach)."""
    # a generator of its own: drawing from the global one would shift a resumed run's dropout masks
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up kernels and caches
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def bf16_supported(device):
    """bf16 with hardware support: a GPU that has it, or a CPU with AVX512-BF16 / AMX (oneDNN says)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:  # oneDNN also says yes for plain AVX512, where bf16 is emulated and slower: ask for the real thing
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                flags = next((line for line in f if line.startswith("flags")), "").split()
            return "avx512_bf16" in flags or "amx_bf16" in flags
        except OSError:
            return False
    return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
