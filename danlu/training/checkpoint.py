"""Checkpoints for exact resume: model, optimizer, scheduler, RNG and data-order state in one
safetensors file (tensors) with JSON metadata (everything else), written atomically. No pickle."""
from __future__ import annotations

import json
import os

import torch

from danlu.files import load_tensors, save_tensors


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
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {
        "state": state,
        "optimizer": opt_plain,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if _jsonable(v)},
    }
    save_tensors(path, tensors, meta)


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
