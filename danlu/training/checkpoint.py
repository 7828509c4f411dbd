"""Checkpoints for exact resume: model, optimizer, scheduler, RNG and data-order state, written atomically.
No pickle.

One process and DDP write one safetensors file (tensors) with JSON metadata (everything else). Under FSDP
every rank writes its own shards of the model and optimizer state with torch.distributed.checkpoint (DCP),
and rank 0 writes the rest (RNG tensors; loop state, optimizer param groups and scheduler as JSON):

    checkpoints/last.safetensors                                       one process, DDP
    checkpoints/last/state.safetensors                                 FSDP: RNG, loop state (JSON)
    checkpoints/last/shards/shard-0000N-model-00001-of-00001.safetensors   FSDP: rank N-1's shards

DCP's default FileSystemWriter pickles its `.metadata` file (and torch.saves the tensors); the shards are
written with DCP's HuggingFaceStorageWriter instead: plain safetensors files whose JSON headers give each
shard's offsets, from which HuggingFaceStorageReader rebuilds the metadata. DCP reshards on load, so a
sharded checkpoint resumes on any number of processes, or on one without a process group.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import torch

from danlu.files import load_tensors, save_tensors
from danlu.training import distributed as dist

LAST_FILE, LAST_FOLDER, STATE = "last.safetensors", "last", "state.safetensors"


def save_checkpoint(path, model, optimizer, scheduler, state):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    opt_plain = {"param_groups": opt["param_groups"], "state": {}}
    for pid, values in opt["state"].items():
        opt_plain["state"][str(pid)] = {}
        for name, v in values.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{name}"] = v
                opt_plain["state"][str(pid)][name] = "__tensor__"
            else:
                opt_plain["state"][str(pid)][name] = v
    save_tensors(path, {**tensors, **_rng_state()}, _meta(state, opt_plain, scheduler))


def load_checkpoint(path, model, optimizer=None, scheduler=None):
    """Restore everything saved by `save_checkpoint`; returns the loop state dict."""
    from danlu.files import load_weights

    tensors, meta = load_tensors(path)
    load_weights(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, where=os.fspath(path))
    if optimizer is not None:
        plain = meta["optimizer"]
        state = {}
        for pid, values in plain["state"].items():
            state[int(pid)] = {
                name: tensors[f"optim.{pid}.{name}"] if v == "__tensor__" else v for name, v in values.items()
            }
        optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})
    return _restore(tensors, meta, scheduler)


def save_sharded(folder, model, optimizer, scheduler, state):
    """The FSDP checkpoint (collective: call it on every rank). Everything goes to folder.tmp, which rank 0
    renames to `folder` once every rank has written its shards."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = folder + ".tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    save(_tensors(model_state, optim_state, model),
         storage_writer=HuggingFaceStorageWriter(os.path.join(tmp, "shards"), save_distributed=True))
    if dist.is_main():
        plain = {"param_groups": optim_state["param_groups"],
                 "state": {p: {k: v for k, v in values.items() if not torch.is_tensor(v)}
                           for p, values in optim_state["state"].items()}}
        save_tensors(os.path.join(tmp, STATE), _rng_state(), _meta(state, plain, scheduler))
    dist.barrier()
    if dist.is_main():
        _replace_folder(tmp, folder)


def load_sharded(folder, model, optimizer, scheduler):
    """Restore a checkpoint written by `save_sharded` on this run's processes (FSDP on any number of ranks,
    DDP, or one process without a process group); returns the loop state dict."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    tensors, meta = load_tensors(os.path.join(folder, STATE))
    model_state, optim_state = get_state_dict(model, optimizer)  # this run's layout, filled in place
    with warnings.catch_warnings():  # one process: DCP says that it loads without a process group
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        load(_tensors(model_state, optim_state, model),
             storage_reader=HuggingFaceStorageReader(os.path.join(folder, "shards")))
    for p, values in meta["optimizer"]["state"].items():
        optim_state["state"][p].update(values)
    optim_state["param_groups"] = meta["optimizer"]["param_groups"]
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    return _restore(tensors, meta, scheduler)


def last_checkpoint(folder):
    """The newest checkpoint in a run's checkpoints folder (a file, or a sharded folder), or None."""
    paths = [os.path.join(folder, LAST_FILE), os.path.join(folder, LAST_FOLDER, STATE),
             os.path.join(folder, LAST_FOLDER + ".old", STATE)]  # .old: see _replace_folder
    paths = [p for p in paths if os.path.exists(p)]
    if not paths:
        return None
    newest = max(paths, key=os.path.getmtime)
    return newest if newest.endswith(LAST_FILE) else os.path.dirname(newest)


def remove_other(folder, sharded):
    """After a checkpoint in one format, delete the other (a run resumed with or without FSDP)."""
    if sharded and os.path.exists(os.path.join(folder, LAST_FILE)):
        os.remove(os.path.join(folder, LAST_FILE))
    elif not sharded:
        shutil.rmtree(os.path.join(folder, LAST_FOLDER), ignore_errors=True)


def _tensors(model_state, optim_state, model):
    """The tensors DCP writes or fills, flat; a tied weight once, under its first name. Under FSDP the two
    names of a tied weight get two DTensors over the same shard, so ties are found in the model itself
    (the same on every rank, as DCP's plan needs)."""
    module = getattr(model, "module", model)  # DDP
    first, aliases = {}, set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases.add(name)
        else:
            first[id(param)] = name
    flat = {f"model.{k}": v for k, v in model_state.items() if k not in aliases}
    flat.update((f"optim.{p}.{k}", v) for p, values in optim_state["state"].items() if p not in aliases
                for k, v in values.items() if torch.is_tensor(v))
    return flat


def _replace_folder(tmp, folder):
    """Put a finished folder in place of the old one. A crash between the two renames leaves folder.old,
    which `last_checkpoint` still finds."""
    old = folder + ".old"
    if os.path.exists(folder):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _rng_state():
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


def _meta(state, optimizer, scheduler):
    return {"state": state, "optimizer": optimizer,
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if _jsonable(v)}}


def _restore(tensors, meta, scheduler):
    """Scheduler and RNG state; returns the loop state."""
    if scheduler is not None:
        scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return meta["state"]


def _jsonable(v):
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False
