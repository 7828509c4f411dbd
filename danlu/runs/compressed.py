"""Compressed runs: an ordinary run plus compression.json, the steps a rebuild needs (new sizes after
structured pruning, quantization settings), applied to the model built from config.yaml before the
weights load. Making them is the compress job's (danlu.jobs.compress); reading them is here.
"""
from __future__ import annotations

import os

import torch

from danlu.files import atomic_write_json, read_json, save_tensors
from danlu.runs import layout
from danlu.runs.run import write_run_files


def read_record(path):
    """compression.json of a run (None for a run that was not compressed)."""
    file = os.path.join(os.fspath(path), layout.COMPRESSION)
    return read_json(file) if os.path.exists(file) else None


def load_compressed(model, record, tensors, where="weights"):
    """Rebuild the compressed structure named by `record` on a model freshly built from the run's config,
    then load the weights (strictly)."""
    from danlu.compress.prune import resize
    from danlu.compress.quantize import (
        load_quantized_state,
        quantize_dynamic_int8,
        quantize_static_int8,
        quantize_weights,
    )

    for step in record["steps"]:
        if step["kind"] == "prune" and step.get("sizes"):
            model = resize(model, step["sizes"])
        elif step["kind"] == "quantize" and step.get("method") == "dynamic_int8":
            model = quantize_dynamic_int8(model, tuple(step["layers"]), tuple(step["skip"]), inplace=True,
                                          scheme=step.get("scheme", "per_channel"))
        elif step["kind"] == "quantize" and step.get("method") == "static_int8":  # scales come with the weights
            ids = torch.full((1, 8), 7, dtype=torch.long)
            example = (torch.zeros(1, *model.image_shape),) if hasattr(model, "image_shape") else (
                ids, torch.ones_like(ids, dtype=torch.bool))  # image models take pixels (B, C, H, W)
            model = quantize_static_int8(model, [example], tuple(step["skip"]))
        elif step["kind"] == "quantize":
            model = quantize_weights(model, int(step["bits"]), int(step["group_size"]), tuple(step["skip"]), inplace=True)
    return load_quantized_state(model, tensors, where)


def save_compressed(path, cfg, model, tokenizer, labels, record, metrics=None, extra=None):
    """A run directory for a compressed model: what save_run writes, plus compression.json."""
    from danlu.compress.quantize import quantized_state_dict

    os.makedirs(path, exist_ok=True)
    write_run_files(path, cfg, tokenizer, labels, extra)
    atomic_write_json(os.path.join(path, layout.COMPRESSION), record)
    save_tensors(os.path.join(path, layout.WEIGHTS), quantized_state_dict(model), {"kind": cfg.model.kind, "compressed": True})
    if metrics is not None:
        atomic_write_json(os.path.join(path, layout.METRICS), metrics)


__all__ = ["load_compressed", "read_record", "save_compressed"]
