"""Model FLOPs utilisation: the FLOPs a training step does over the FLOPs the hardware could do.

FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B), counted for what backpropagation actually
computes. A matmul weight W with n entries costs 2 n in the forward pass; in the backward pass 2 n more for
the gradient of its input, done only when something before it trains (else nothing upstream needs it),
and 2 n for its own gradient, done only when W trains. Fully trained that is PaLM's 6 N; with LoRA the
frozen base weights cost 4 n (2 n for the first adapted layer's input side, which nothing before it needs)
and only the adapters add their weight gradients; training the head alone costs about 2 N. Matmul weights
are those of every nn.Linear (a tied head counted once; embedding lookups are not matmuls) and LoRA's A
and B. Attention scores and values add 4 C T per layer forward (C the width, T the context) and 8 C T
backward when the layer's queries, keys or values need gradients (PaLM's 12 L C T when all do).
"Before" is registration order, which in danlu's models is the order of the forward pass.

The peak is measured once with a large matmul in the dtype the matmuls run in (bf16 under bf16 autocast,
else fp32), unless `train.peak_flops` gives it (e.g. a GPU's datasheet number for that dtype); with
several processes it is multiplied by their number, as the tokens are counted over all of them.

>>> mfu = tokens_per_s * training_flops_per_token(model, 256) / measure_peak_flops(torch.device("cpu"))  # doctest: +SKIP
"""
from __future__ import annotations

import time

import torch
from torch import nn


def training_flops_per_token(model, seq_len):
    """FLOPs of one token's forward and backward pass through `model` (see the module docstring): the weight
    gradients only of weights that train, the input gradients only where something before trains."""
    from danlu.models.blocks import Attention
    from danlu.models.lora import LoRALinear

    seen, flops, upstream = set(), 0, False  # upstream: a parameter before this point trains
    for module in model.modules():
        if isinstance(module, LoRALinear):  # the frozen base (its child) and the adapters both read x
            base, a, b = module.base.weight, module.lora_a, module.lora_b
            seen.add(id(base))
            flops += _matmul(base.numel(), upstream, base.requires_grad) + _matmul(a.numel(), upstream, a.requires_grad)
            flops += _matmul(b.numel(), upstream or a.requires_grad, b.requires_grad)
            upstream |= a.requires_grad or b.requires_grad or base.requires_grad
            continue
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            flops += _matmul(module.weight.numel(), upstream, module.weight.requires_grad)
        elif isinstance(module, Attention):
            width = module.num_heads * module.head_dim
            flops += 4 * width * seq_len  # q k^T and the weighted sum of v, 2 C T each
            if upstream or any(p.requires_grad for p in module.qkv.parameters()):
                flops += 8 * width * seq_len
        upstream |= any(p.requires_grad for p in module.parameters(recurse=False))
    return flops


def _matmul(n, input_grad, weight_grad):
    """Per token: 2 n forward, 2 n for the input's gradient, 2 n for the weight's."""
    return 2 * n + 2 * n * bool(input_grad) + 2 * n * bool(weight_grad)


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
