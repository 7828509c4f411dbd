"""nn.Linear layers computed from MKL's packed weights while decoding a fixed number of rows per step.

A decoding step multiplies a few rows (one per sequence) by every weight matrix. MKL can copy a weight once into
the layout its GEMM kernel reads (`cblas_sgemm_pack`, exposed by torch as `torch.ops.mkl._mkl_reorder_linear_weight`
and `torch.ops.mkl._mkl_linear`); the product then skips packing the weight at every call. Measured at 8 rows
(one thread, AVX-512, medians): 1536x384 85 us against 110 us for the transposed layout and 177 us for nn.Linear's,
the 8192x384 head 870 against 1,096 and 1,871 us; at 1 or 2 rows it gains nothing (docs/results/generate.md).

The packed copy serves one number of rows (`rows`): an input with any other count (a prompt's forward pass) is
computed by `_mkl_linear` from the plain weight, with nn.Linear's result. MKL reserves about 4.5x the weight's
bytes for the copy (`cblas_sgemm_pack_get_size`), but writes, and so makes resident, only about the weight's size:
packing every weight of benchmarks/generate.py's model (52.5 MiB) raised the process's RSS by 53.8 MiB.

The forward of the layer is replaced on the instance (`pack_linear`) and restored by `unpack_linear`, so the
module tree, its parameters, state_dict and hooks stay as they are.
"""
import torch
from torch import nn


def packing_available():
    """Whether this torch has MKL's packed sgemm (x86 builds with MKL; not ARM, not every build)."""
    mkl = getattr(torch.ops, "mkl", None)
    try:
        return torch.backends.mkl.is_available() and hasattr(mkl, "_mkl_reorder_linear_weight") and \
            hasattr(mkl, "_mkl_linear")
    except (AttributeError, RuntimeError):  # an op namespace that fails to resolve
        return False


def packable(module):
    """A plain fp32 nn.Linear on the CPU whose forward is nn.Linear's own (not already packed), MKL present."""
    return (type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"
            and (module.bias is None or module.bias.dtype == torch.float32) and "forward" not in vars(module)
            and module.weight.dim() == 2 and packing_available())


def pack_linear(module, rows):
    """Make `module` (packable) compute from a packed copy of its weight for inputs of `rows` rows (all the leading
    dimensions together); other inputs take the plain weight. The copy is made now, from the weight as it is."""
    packed = torch.ops.mkl._mkl_reorder_linear_weight(module.weight.detach(), rows)

    def forward(x):  # (..., in) -> (..., out)
        if torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad):
            return nn.functional.linear(x, module.weight, module.bias)  # the packed op has no gradient
        return torch.ops.mkl._mkl_linear(x, packed, module.weight, module.bias, rows)

    module.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's forward


def unpack_linear(module):
    """Undo `pack_linear` (and free the packed copy; `release_freed_memory` then gives its pages back)."""
    vars(module).pop("forward", None)


def release_freed_memory():
    """Give the pages of freed heap memory back to the operating system (glibc's `malloc_trim`; a no-op elsewhere).

    Once a large block has been freed, glibc serves later blocks of that size from its heap and keeps their pages
    when they are freed. A packed copy reserves about 4.5x its weight and writes about 1x, each time at another
    place of that reserve, so decoding after decoding the resident memory crept up towards the whole reserve
    (+42 MiB after one decode of benchmarks/generate.py's model, +199 MiB after 30); returning the freed pages
    after each decode keeps it at one copy.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
        except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl, Windows)
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None  # glibc's malloc_trim once looked up, False where there is none
