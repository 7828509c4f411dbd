"""GELU (Hendrycks & Gimpel 2016) whose tanh approximation of 16-bit CPU tensors is a table lookup.

torch's CPU kernel computes an exact fp32 `tanh` per element, which cost about 8 ms a layer (forward and
backward) of benchmarks/gpt_train.py's GPT and was the largest piece of its step after the matmuls. A
16-bit input has 65,536 possible values, so the output and the fp32 slope come from two tables filled
once by torch's own kernels: values and gradients are bit for bit torch's. In-process A/B of whole
training steps (docs/pretraining.md): +1.7-2.0% for the table, then +3.0% for looking up in chunks.
"""
import torch
from torch.nn import functional as F

TABLE_GELU_MIN_SIZE = 1 << 16  # smaller inputs (a decode step) are not worth the lookup's set-up
TABLE_GELU_CHUNK = 1 << 17  # elements looked up at a time: their int64 indices (1 MB) stay in cache


def gelu(x, approximate="none"):
    """`F.gelu`, with the same results. On CPU the tanh approximation of a 16-bit float tensor (bf16
    autocast) is looked up in a table of all 65,536 inputs instead of computed; the table is filled by
    torch's own kernel, so the values are bit for bit the same.

    >>> y = gelu(x.bfloat16(), approximate="tanh")  # doctest: +SKIP
    """
    if (approximate != "tanh" or x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16)
            or x.numel() < TABLE_GELU_MIN_SIZE):
        return F.gelu(x, approximate=approximate)
    return _TableGELU.apply(x)


_GELU_TABLES = {}  # dtype -> (values, slopes), each indexed by an input's 16 bits read as an unsigned integer


def _gelu_tables(dtype):
    if dtype not in _GELU_TABLES:
        inputs = torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16).view(dtype)  # every 16-bit value
        values = F.gelu(inputs, approximate="tanh")
        # torch's backward for 16-bit inputs is float(grad) * slope(float(x)), rounded once: keep slopes in fp32
        slopes = torch.ops.aten.gelu_backward(torch.ones(inputs.shape), inputs.float(), approximate="tanh")
        _GELU_TABLES[dtype] = values, slopes
    return _GELU_TABLES[dtype]


def _bits(x):
    return x.reshape(-1).view(torch.uint16)  # each value's 16 bits: its row in the tables


def _chunks(x, *others):
    """(index, pieces): x's elements and the same elements of `others` (all flat), a chunk at a time, with
    each chunk's 16-bit patterns as int64 indices (index_select takes int32 or int64, and is faster with int64)."""
    bits = _bits(x)
    index = torch.empty(min(bits.numel(), TABLE_GELU_CHUNK), dtype=torch.long, device=x.device)
    for start in range(0, bits.numel(), TABLE_GELU_CHUNK):
        end = min(start + TABLE_GELU_CHUNK, bits.numel())
        yield index[: end - start].copy_(bits[start:end]), [t[start:end] for t in others]


class _TableGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        values, _ = _gelu_tables(x.dtype)
        if torch.compiler.is_compiling():  # one gather, which the compiler fuses with computing its indices
            return values.index_select(0, _bits(x).long()).view(x.shape)
        out = torch.empty(x.shape, dtype=x.dtype)
        for index, (piece,) in _chunks(x, out.view(-1)):
            torch.index_select(values, 0, index, out=piece)
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        _, slopes = _gelu_tables(x.dtype)
        if torch.compiler.is_compiling():
            return (slopes.index_select(0, _bits(x).long()).view(x.shape) * grad).to(grad.dtype)
        out = torch.empty(x.shape, dtype=grad.dtype)
        slope = torch.empty(min(x.numel(), TABLE_GELU_CHUNK))  # fp32
        for index, (g, piece) in _chunks(x, grad.reshape(-1), out.view(-1)):
            s = torch.index_select(slopes, 0, index, out=slope[: index.numel()])
            torch.mul(s, g, out=piece)  # computed in fp32, rounded once
        return out
