"""Keep freed memory for reuse during CPU training (Linux, glibc).

By default glibc's malloc serves blocks above a threshold (128 KB, moved up as it sees larger blocks
freed) with their own mmap, gives them back to the kernel on free, and trims free memory off the heap's
top beyond twice that threshold. A training step that allocates the same few-MB activations, logits and
gradients again therefore pays a page fault for every 4 KB page of them, step after step: thousands a
step for a small GPT (tests/test_allocator.py), about a tenth of the step's time in bf16 on CPU
(benchmarks/gpt_train.py: 3,231 -> 3,595 tokens/s). Raising the mmap threshold to its 64-bit maximum
(32 MB) and the trim threshold to 1 GB keeps freed blocks in the heap, where the next step finds them:
the effect PyTorch's CPU performance guide gets by preloading jemalloc or tcmalloc. It applies to the
whole process, once; elsewhere (macOS, Windows, musl) nothing changes.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit systems
TRIM_THRESHOLD = 1 << 30  # free memory at the top of the heap kept before it is given back

_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed blocks up to 32 MB; True when in effect."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl has a mallopt that does nothing  # noqa: B018
    except (OSError, AttributeError):
        return False
    _applied = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _applied
