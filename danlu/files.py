"""Atomic file writes and pickle-free tensor files (safetensors + JSON metadata).

A crash mid-write never leaves a half-written file: everything goes to a temporary file in the same
folder and is moved into place with os.replace, which is atomic on POSIX and Windows. The file gets the
mode an ordinary `open(path, "w")` would (0666 less the umask): mkstemp's private 0600 would keep
teammates on a shared server from reading a run's reports and weights.
"""
from __future__ import annotations

import json
import os
import tempfile

from safetensors.torch import load_file, safe_open, save_file

from danlu.registry import ConfigError


def atomic_write_text(path, text):
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        _open_mode(tmp)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _open_mode(path):
    """Give a temporary file the permissions open() would have given it under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


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
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(unique, tmp, metadata=meta)
        _open_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


