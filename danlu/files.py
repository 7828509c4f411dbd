"""Atomic file writes and pickle-free tensor files (safetensors + JSON metadata).

A crash mid-write never leaves a half-written file: everything goes to a temporary file in the same
folder and is moved into place with os.replace, which is atomic on POSIX and Windows. The file gets the
mode an ordinary `open(path, "w")` would (0666 less the umask): mkstemp's private 0600 would keep
teammates on a shared server from reading a run's reports and weights.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile

from safetensors.torch import load_file, safe_open, save_file

from danlu.registry import ConfigError


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yield a temporary path beside `path`; once the block has written it, it replaces `path` in one step
    with the mode open() would give under the umask. On an error the temporary file is removed.

    >>> with atomic_path("runs/x/model.safetensors") as tmp:   # doctest: +SKIP
    ...     save_file(tensors, tmp)
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_tensors(path, tensors: dict, metadata: dict | None = None):
    """Write tensors to a .safetensors file atomically. Tensors that share storage (tied weights) are
    written once and the aliases recorded in the metadata."""
    path = os.fspath(path)
    unique, aliases, seen = {}, {}, {}
    for name, t in tensors.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t.detach().to("cpu").contiguous()
    meta = {"danlu": json.dumps(metadata or {}, ensure_ascii=False), "aliases": json.dumps(aliases)}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(unique, tmp, metadata=meta)


def load_tensors(path):
    """Read a .safetensors file -> (tensors, metadata dict). Executes no code from the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"{path}: file not found")
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    for alias, source in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[source]
    return tensors, json.loads(meta.get("danlu", "{}"))


def load_weights(model, tensors, where="weights"):
    """Strict load: names every missing and unexpected key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"{where}: weights do not match the model"
            + (f"; missing: {', '.join(missing[:10])}" if missing else "")
            + (f"; unexpected: {', '.join(unexpected[:10])}" if unexpected else "")
        )
    for name, t in tensors.items():
        if own[name].shape != t.shape:
            raise ConfigError(f"{where}: {name} has shape {tuple(t.shape)}, the model expects {tuple(own[name].shape)}")
    model.load_state_dict(tensors, strict=True)
    return model


def save_weights(path, model, metadata=None):
    save_tensors(path, model.state_dict(), metadata)


