"""2x2 max-pool (stride 2, no padding, floor mode) of float32 CPU tensors in a few lines of C.

torch's CPU kernel spends 264-340 µs on the (32, 32, 8, 8) map of the guide's CNN, about a fifth of its
training step; maxpool2x2.c takes 26 µs (docs/results/cnn.md). The C file ships in the package and is
compiled on first use with the system C compiler (`cc -O3 -fno-trapping-math -shared -fPIC`, about a second;
$CC chooses another) into a per-user cache ($XDG_CACHE_HOME/danlu or ~/.cache/danlu), named by the hash of
the source and the command, written atomically (two processes compiling at once each rename a whole file
into place), and loaded with ctypes. Results are bit for bit F.max_pool2d's, values and gradients, ties
and NaNs included (tests/test_maxpool.py).

F.max_pool2d runs instead, with the same results: for any other pool, dtype, device or layout; under ONNX
export, tracing, torch.export and torch.compile; for inputs under 8,192 elements
(MAXPOOL_NATIVE_MIN_ELEMENTS); when torch runs on more than 4 threads (the C loop is single-threaded:
MAXPOOL_NATIVE_MAX_THREADS); when no compiler works (one warning); and when DANLU_NATIVE_KERNELS=0.
"""
import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import threading
import warnings
from pathlib import Path

import torch
from torch.nn import functional as F

SOURCE = Path(__file__).with_name("maxpool2x2.c")
COMPILE = ["-O3", "-fno-trapping-math", "-shared", "-fPIC"]  # no FP-exception flags to keep: selects vectorise
# The C loop runs on one core; torch's pool runs on all of torch's threads. Forward and backward, torch's
# takes 5-9x as long on one thread (4.5 against 0.51 ms on (32, 32, 28, 28)) and 2.6-3.5x on two
# (docs/results/cnn.md): with a perfect speed-up it would catch up at about 5 threads. Beyond 4, torch's.
MAXPOOL_NATIVE_MAX_THREADS = 4
# Below this many input elements the Python around the C call (about 10 µs forward and backward) costs more
# than torch's pool takes: (32, 32, 2, 2) 47 against 39 µs, (32, 32, 4, 4) 61 against 95 µs.
MAXPOOL_NATIVE_MIN_ELEMENTS = 8192

_LOCK = threading.Lock()
_LIBRARY = {}  # "lib": the loaded ctypes library, or None once loading failed (warned once)


def native_kernels_enabled():
    """False when the environment sets DANLU_NATIVE_KERNELS to 0 (or false/no/off): every pool is torch's."""
    return os.environ.get("DANLU_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir():
    """Where compiled kernels are kept: $XDG_CACHE_HOME/danlu, or ~/.cache/danlu."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "danlu"


def _compile(source, compiler):
    """The path of `source` compiled into a shared library, compiling it unless the cache holds it already."""
    from danlu.files import atomic_path

    text = source.read_bytes()
    command = [*compiler, *COMPILE]
    key = hashlib.sha256(text + repr((command, platform.machine(), platform.system())).encode()).hexdigest()[:16]
    path = cache_dir() / f"{source.stem}-{key}.so"
    if not path.exists():
        with atomic_path(path, suffix=".so") as tmp:  # compiled under a temporary name, renamed in one step
            done = subprocess.run([*command, "-o", tmp, str(source)], capture_output=True, text=True, timeout=120,
                                  check=False)
            if done.returncode != 0:
                raise OSError(f"{shlex.join(command)} failed: {done.stderr.strip()[-500:]}")
    return path


def _library():
    """The compiled kernels, or None where they cannot be built (warned once)."""
    if "lib" in _LIBRARY:
        return _LIBRARY["lib"]
    with _LOCK:  # one thread compiles and loads; the others wait for it
        if "lib" not in _LIBRARY:
            lib = None
            try:
                lib = ctypes.CDLL(str(_compile(SOURCE, shlex.split(os.environ.get("CC") or "cc"))))
                pointers = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
                for name in ("danlu_maxpool2x2_forward", "danlu_maxpool2x2_backward"):
                    getattr(lib, name).argtypes = pointers
                    getattr(lib, name).restype = None
            except (OSError, subprocess.SubprocessError) as e:
                lib = None
                warnings.warn(f"danlu: the native 2x2 max-pool is not available, torch's is used ({e})", stacklevel=3)
            _LIBRARY["lib"] = lib
    return _LIBRARY["lib"]


_TWO, _ZERO, _ONE = (2, (2, 2), [2, 2]), (0, (0, 0), [0, 0]), (1, (1, 1), [1, 1])


def _native(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    """Whether this call can take the C kernel (graph capture first, then the cheapest tests)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if (type(x) is not torch.Tensor or x.dtype != torch.float32 or x.device.type != "cpu" or return_indices
            or ceil_mode or x.dim() not in (3, 4) or x.shape[-1] < 2 or x.shape[-2] < 2 or not x.is_contiguous()):
        return False
    if kernel_size not in _TWO or (stride not in _TWO and stride is not None and stride != []) \
            or padding not in _ZERO or dilation not in _ONE:
        return False
    if x.numel() < MAXPOOL_NATIVE_MIN_ELEMENTS or torch.get_num_threads() > MAXPOOL_NATIVE_MAX_THREADS:
        return False
    return native_kernels_enabled() and not torch.onnx.is_in_onnx_export() and _library() is not None


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """F.max_pool2d, with the same results; a 2x2, stride-2 pool of a contiguous float32 CPU tensor runs
    the C kernel of maxpool2x2.c.

    >>> y = max_pool2d(torch.randn(32, 32, 8, 8), 2)  # (32, 32, 4, 4)
    """
    if not _native(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                            return_indices=return_indices)
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaxPool2x2.apply(x)
    return _forward(x)[0]


def _forward(x):
    """(output, where): the pooled x and each window's winner as its place in the window, row * 2 + column."""
    *lead, H, W = x.shape
    planes = x.numel() // (H * W)
    out = torch.empty((*lead, H // 2, W // 2), dtype=x.dtype)
    where = torch.empty(out.shape, dtype=torch.uint8)
    _library().danlu_maxpool2x2_forward(x.data_ptr(), out.data_ptr(), where.data_ptr(), planes, H, W)
    return out, where


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out, where = _forward(x)
        ctx.save_for_backward(where)
        ctx.input_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        (where,) = ctx.saved_tensors
        H, W = ctx.input_shape[-2:]
        if torch.is_grad_enabled():  # a graph of the backward is wanted (double backward): torch's own op
            return _torch_backward(grad, where, ctx.input_shape)
        grad = grad.contiguous()  # float32, as the output
        grad_in = torch.empty(ctx.input_shape, dtype=torch.float32)
        _library().danlu_maxpool2x2_backward(grad.data_ptr(), where.data_ptr(), grad_in.data_ptr(),
                                             grad_in.numel() // (H * W), H, W)
        return grad_in


def _torch_backward(grad, where, input_shape):
    """The same gradient from aten's max-pool backward, which is differentiable: the winners' places become
    torch's flat indices into each (H, W) plane."""
    W = input_shape[-1]
    OH, OW = where.shape[-2:]
    rows = torch.arange(OH).mul_(2).view(OH, 1) + (where // 2).long()  # (..., OH, OW)
    cols = torch.arange(OW).mul_(2).view(1, OW) + (where % 2).long()
    indices = rows * W + cols
    shell = torch.empty(input_shape)  # only its shape and layout are read
    return torch.ops.aten.max_pool2d_with_indices_backward(grad, shell, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)
