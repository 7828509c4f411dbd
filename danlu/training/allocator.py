"""Keep freed memory for reuse during CPU training (Linux, glibc), for the length of a `with` block.

By default glibc's malloc serves blocks above a threshold (128 KB, moved up as it sees larger blocks
freed) with their own mmap, gives them back to the kernel on free, and trims free memory off the heap's
top beyond twice that threshold. A training step that allocates the same few-MB activations, logits and
gradients again therefore pays a page fault for every 4 KB page of them, step after step: 81,601 faults in
ten steps of a small GPT against 2,050 with freed memory kept (tests/test_allocator.py's script), and about
a tenth of the step's time in bf16 on CPU (benchmarks/gpt_train.py: 3,231 -> 3,595 tokens/s on a quiet
machine, docs/pretraining.md; `--gpt-train-malloc glibc` runs it without). Hence the default
`train.keep_freed_memory: true`. Raising the mmap threshold to its 64-bit maximum
(32 MB) and the trim threshold to 1 GB keeps freed blocks in the heap, where the next step finds them:
the effect PyTorch's CPU performance guide gets by preloading jemalloc or tcmalloc. Elsewhere (macOS,
Windows, musl) nothing changes.

`Trainer.fit` holds the setting for the length of training (`train.keep_freed_memory`) and then puts the
values back. glibc has no call that reads them, so "back" means the values danlu set before (an enclosing
block, or `keep_freed_memory()` for the whole process), or else glibc's defaults (128 KB each, or those
given by MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / GLIBC_TUNABLES). One thing cannot be put back:
any mallopt of these two parameters switches off glibc's dynamic mmap threshold for the rest of the
process (glibc malloc/malloc.c, `mp_.no_dyn_threshold`), so after a fit the threshold stays at 128 KB
instead of rising to the size of the largest block freed. Blocks above it are mapped afresh each time, as
the defaults do for a process that never freed a large block; the heap's free memory goes back to the
kernel, which is what the restore is for. Measured with the same script: 1,025 faults in ten steps inside
the block, 134,754 after it (the fixed 128 KB threshold maps more than the dynamic one would).

>>> with kept_freed_memory():   # doctest: +SKIP
...     train()
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit systems
TRIM_THRESHOLD = 1 << 30  # free memory at the top of the heap kept before it is given back
KEEP = (MMAP_THRESHOLD, TRIM_THRESHOLD)
GLIBC_DEFAULTS = (128 << 10, 128 << 10)  # DEFAULT_MMAP_THRESHOLD_MIN and DEFAULT_TRIM_THRESHOLD in malloc.c

_current = None  # the (mmap, trim) thresholds danlu last set; None: glibc's own


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed blocks up to 32 MB, for the rest of the process; True when in effect."""
    global _current
    if _current == KEEP:
        return True
    if not _set(KEEP):
        return False
    _current = KEEP
    return True


@contextlib.contextmanager
def kept_freed_memory(enabled=True):
    """`keep_freed_memory` inside the block, and the thresholds of before it after it (see the module
    docstring for what glibc cannot restore). Yields whether the setting is in effect."""
    global _current
    before = _current
    changed = enabled and before != KEEP and _set(KEEP)
    if changed:
        _current = KEEP
    try:
        yield changed or (enabled and before == KEEP)
    finally:
        if changed:
            _set(before or _startup_values())
            _current = before


def _libc():
    """glibc, or None (another platform, or musl, whose mallopt does nothing)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def _set(values) -> bool:
    libc = _libc()
    if libc is None:
        return False
    mmap, trim = values
    return libc.mallopt(M_MMAP_THRESHOLD, mmap) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim) == 1


def _startup_values():
    """The thresholds glibc started the process with: its defaults, unless the environment set them."""
    mmap, trim = GLIBC_DEFAULTS
    tunables = dict(item.partition("=")[::2] for item in os.environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item)
    mmap = _size(os.environ.get("MALLOC_MMAP_THRESHOLD_") or tunables.get("glibc.malloc.mmap_threshold"), mmap)
    trim = _size(os.environ.get("MALLOC_TRIM_THRESHOLD_") or tunables.get("glibc.malloc.trim_threshold"), trim)
    return mmap, trim


def _size(text, default):
    try:
        return int(text, 0) if text else default
    except ValueError:
        return default
