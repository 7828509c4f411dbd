"""The main job: config -> data -> model -> training -> evaluation -> run directory (+ report).

>>> run = train("configs/seed_lstm.yaml", train={"epochs": 3}, run={"dir": "runs/mine"})  # doctest: +SKIP
>>> run.metrics["test"]["accuracy"]                                                      # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import os
import random
import sys
import time

import numpy as np
import torch

from danlu import config as config_mod
from danlu.data import TextTokenizer, build_data
from danlu.files import atomic_write_json
from danlu.models import build_model, count_parameters
from danlu.runs import Run, prepare_run_dir, save_run, save_tokenizer
from danlu.training import distributed as dist
from danlu.training.tasks import TASKS
from danlu.training.trainer import Trainer


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_config(config=None, overrides=(), resume=False, **sections):
    """A RunConfig from a path / run directory / dict / RunConfig, with dotted or keyword overrides."""
    if isinstance(config, config_mod.RunConfig):
        if not overrides and not sections:
            return config
        config = config_mod.to_dict(config)
    items = list(overrides) + [(k, v) for k, v in _flatten(sections).items()]
    if config is not None and not isinstance(config, dict) and os.path.isdir(os.fspath(config)):
        return config_mod.load(os.path.join(config, "config.yaml"), items)
    # resuming a run started from a config file: its directory is runs/<name>, not a fresh numbered one
    cfg = config_mod.load(config, items, fresh_dir=not resume)
    return cfg


def train(config=None, *overrides, resume=False, overwrite=False, loggers=(), **sections) -> Run:
    """Train, evaluate and save a run; return it. Keyword sections override the file:
    `train("configs/seed_lstm.yaml", train={"epochs": 3})` or dotted strings `"train.epochs=3"`."""
    resume = resume or dist.restart_count() > 0  # torchrun --max-restarts: continue from the last checkpoint
    # under torchrun every rank must name the same run directory: runs/<name>, not a fresh numbered one
    cfg = resolve_config(config, overrides, resume or dist.launched(), **sections)
    if cfg.task not in TASKS:
        from danlu.registry import ConfigError

        raise ConfigError(f"task: {cfg.task!r} runs with `danlu pretrain`; `danlu train` takes: {', '.join(TASKS)}")
    if cfg.task == "seq2seq":  # text to text: pairs, two-sided tokenizers, decoding and BLEU (danlu.seq2seq_job)
        from danlu.seq2seq_job import train_seq2seq

        return train_seq2seq(cfg, resume=resume, overwrite=overwrite, loggers=_loggers(cfg, loggers))
    main = dist.is_main()  # only rank 0 logs and writes the run directory
    run_dir = prepare_run_dir(cfg.run.dir, overwrite=overwrite, resume=resume) if main else cfg.run.dir
    seed_everything(cfg.run.seed)
    say = lambda m: main and print(m, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    data = build_data(cfg.data, cfg.task, cfg.run.seed)
    tokenizer_file = os.path.join(run_dir, "tokenizer.json")
    if resume and os.path.exists(tokenizer_file):
        data = _reencode(data, TextTokenizer.load(tokenizer_file), cfg)
    say(f"data: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test examples, "
        f"{data.spec.num_classes} classes, vocabulary {data.spec.vocab_size}"
        + (f", {data.skipped} bad rows skipped" if data.skipped else ""))
    # the config, tokenizer and labels go in first, so that an interrupted run can be resumed and inspected
    from danlu.files import atomic_write_text

    if main:
        atomic_write_text(os.path.join(run_dir, "config.yaml"), config_mod.dump(cfg))
        save_tokenizer(run_dir, data.tokenizer)
        atomic_write_json(os.path.join(run_dir, "labels.json"), list(data.labels))

    model = build_model(cfg.model, data.spec)
    say(f"model: {cfg.model.kind}, {count_parameters(model):,} parameters; run directory: {run_dir}")
    task = TASKS[cfg.task](data.labels)
    trainer = Trainer(model, task, cfg.train, run_dir=run_dir, seed=cfg.run.seed, loggers=_loggers(cfg, loggers))
    history = trainer.fit(data.train, data.val, resume=resume)
    model = trainer.model  # under FSDP, the gathered full model
    trainer.cfg = dataclasses.replace(trainer.cfg, eval_batches=0)  # the final numbers use every held-out example
    mistakes = _mistakes(cfg) if main else None  # the report's most confident mistakes, from the same pass
    started_eval = time.perf_counter()
    test = trainer.evaluate(data.test, on_batch=mistakes.update if mistakes else None)
    eval_seconds = time.perf_counter() - started_eval
    metrics = {
        "test": test,
        "val": trainer.evaluate(data.val),
        "best_epoch": trainer.best_epoch,
        "epochs_run": len(history),
        "parameters": count_parameters(model),
        "train_seconds": sum(r["seconds"] for r in history),
        "total_seconds": time.perf_counter() - started,
        "samples_per_s": _mean([r["samples_per_s"] for r in history]),
        "data": {"train": len(data.train), "val": len(data.val), "test": len(data.test), "skipped_rows": data.skipped},
    }
    run = Run(run_dir, cfg, model, data.tokenizer, data.labels, metrics)
    if main:
        save_run(run_dir, cfg, model, data.tokenizer, data.labels, metrics)
        _write_report(run, data, history, trainer, mistakes, eval_seconds)
    return run


def _mistakes(cfg):
    try:
        from danlu.evaluate.report import TOP_MISTAKES, ConfidentMistakes
    except ImportError:
        return None
    return ConfidentMistakes(TOP_MISTAKES, cfg.task == "regression")


def _write_report(run, data, history, trainer, mistakes, eval_seconds):
    try:
        from danlu.evaluate.report import write_run_report
    except ImportError:
        return
    write_run_report(run, data=data, history=history, trainer=trainer, mistakes=mistakes, eval_seconds=eval_seconds)


def _loggers(cfg, extra):
    loggers = list(extra)
    names = set(cfg.train.log)
    if names:
        from danlu.evaluate.tracking import LOGGERS
        from danlu.registry import resolve

        loggers += [resolve(name, LOGGERS, "train.log")(cfg.run.dir) for name in sorted(names)]
    return loggers


def _reencode(data, tokenizer, cfg):
    from danlu.data import encode_examples, make_spec

    numeric = cfg.task == "regression"
    enc = {k: encode_examples(ex, tokenizer, data.labels, numeric) for k, ex in data.examples.items()}
    data.train, data.val, data.test = enc["train"], enc["val"], enc["test"]
    data.tokenizer, data.spec = tokenizer, make_spec(tokenizer, data.labels, numeric)
    return data


def _flatten(d, prefix=""):
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _mean(xs):
    return sum(xs) / len(xs) if xs else 0.0
