"""The one skeleton behind `danlu train`, `pretrain` and `finetune` (and the compress recovery step):

    resolve config → read data, build model (job.plan) → run directory → config / tokenizer / labels
    → fit → final evaluation → save → report

A job says only what differs: how it reads its data and builds its model (`plan`), what it adds to
metrics.json (`summarize`) and how it saves its weights (`save`). The rest is written once, here: the
run directory is replaced only once the new run can start (danlu.runs.RunDirectory), under torchrun
only rank 0 writes, and the final numbers use every held-out example.

>>> run = run_job(TrainJob(), "configs/seed_lstm.yaml", ["train.epochs=1"])   # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from danlu import config as config_mod
from danlu.models import count_parameters
from danlu.registry import TASKS, ConfigError, tasks_for
from danlu.runs import Run, RunDirectory, layout, save_run, write_run_files
from danlu.training import distributed as dist
from danlu.training.trainer import Trainer


@dataclass
class Plan:
    """What a job has read and built before its run directory is committed to."""

    cfg: object
    """The config as the job resolved it (fine-tuning takes the base's model config)."""
    model: torch.nn.Module
    task: object
    train: object
    val: object = None
    test: object = None
    tokenizer: object = None
    labels: tuple = ()
    files: dict = field(default_factory=dict)
    """Extra text files of the run, written with the config (name -> text), e.g. a chat template."""
    checkpoints: bool = True
    """False: no checkpoints (a LoRA run over a frozen base would write the whole base every epoch)."""
    data: object = None
    """What the report shows of the data (a DataBundle, a corpus)."""


class Job:
    """A job's own steps; see the module docstring."""

    name = ""

    def plan(self, cfg, run_dir, resume, say) -> Plan:
        raise NotImplementedError

    def summarize(self, plan, history, trainer, metrics) -> dict:
        """Job-specific entries of metrics.json (`metrics`: the final test / validation numbers so far)."""
        return {}

    def save(self, run, plan, history):
        save_run(run.path, run.cfg, run.model, run.tokenizer, run.labels, run.metrics)

    def collector(self, cfg, plan):
        """What the report gathers during the final test pass (the most confident mistakes), or None."""
        try:
            from danlu.evaluate.report import mistakes_collector
        except ImportError:  # matplotlib missing: no report
            return None
        return mistakes_collector(cfg.task)

    def report(self, run, plan, history, trainer, collector, eval_seconds, command):
        try:
            from danlu.evaluate.report import write_run_report
        except ImportError:
            return
        write_run_report(run, plan.data, history, trainer, mistakes=collector, eval_seconds=eval_seconds,
                         command=command)

    def make_run(self, cfg, model, plan, metrics):
        """The Run the job returns (a job whose runs predict differently returns its own kind)."""
        return Run(cfg.run.dir, cfg, model, plan.tokenizer, plan.labels, metrics)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(threads=0, processes=1):
    """torch's CPU thread count for a job: `threads`, or when 0 the free cores (see train.threads); returns it."""
    if not threads:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        threads = free_cores() // max(processes, 1)
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def free_cores(limit=8):
    """Cores this process may run on, less those the 1-minute load average says other work keeps busy."""
    usable, load = _cores_and_load()
    return max(1, min(usable - round(load), limit))


def _cores_and_load():
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return usable, (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)


def _auto_reason():
    if os.environ.get("OMP_NUM_THREADS"):
        return "OMP_NUM_THREADS"
    usable, load = _cores_and_load()
    return f"{usable} cores, load {load:.1f}; set train.threads to choose"


def resolve_config(config=None, overrides=(), resume=False, **sections):
    """A RunConfig from a path / run directory / dict / RunConfig, with dotted or keyword overrides."""
    if isinstance(config, config_mod.RunConfig):
        if not overrides and not sections:
            return config
        config = config_mod.to_dict(config)
    items = list(overrides) + list(_flatten(sections).items())
    if config is not None and not isinstance(config, dict) and os.path.isdir(os.fspath(config)):
        return config_mod.load(os.path.join(config, "config.yaml"), items)
    # resuming a run started from a config file: its directory is runs/<name>, not a fresh numbered one
    return config_mod.load(config, items, fresh_dir=not resume)


def run_job(job, config=None, overrides=(), *, resume=False, overwrite=False, loggers=(), command=None,
            **sections) -> Run:
    """Run `job` (a Job, or a function from the config to one) on a config; save, report and return the Run."""
    resume = resume or dist.restart_count() > 0  # torchrun --max-restarts: continue from the last checkpoint
    # under torchrun every rank must name the same run directory: runs/<name>, not a fresh numbered one
    cfg = resolve_config(config, overrides, resume or dist.launched(), **sections)
    if not isinstance(job, Job):  # a function of the config that picks the job (danlu train: text or images)
        job = job(cfg)
    check_task(job.name, cfg.task)
    main = dist.is_main()  # only rank 0 logs and writes the run directory
    say = lambda m: main and print(m, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    directory = RunDirectory(cfg.run.dir, overwrite=overwrite, resume=resume) if main else None
    threads = set_threads(cfg.train.threads, dist.world_size())
    try:
        seed_everything(cfg.run.seed)
        plan = job.plan(cfg, cfg.run.dir, resume, say)
        cfg = plan.cfg
        if main:
            write_run_files(cfg.run.dir, cfg, plan.tokenizer, plan.labels, plan.files)
    except BaseException:
        if directory is not None:
            directory.abandon()  # nothing was trained: the old run (if any) comes back
        raise
    if directory is not None:
        directory.started()
    say(f"threads: {threads} ({'train.threads' if cfg.train.threads else _auto_reason()})")
    if resume and _finished(cfg):
        say(f"{cfg.run.dir} finished already: nothing is left to train, so it is only evaluated again "
            f"(raise train.epochs or train.max_steps to train further)")
    collector = job.collector(cfg, plan) if main else None
    trainer, history, metrics, eval_seconds = fit_and_evaluate(
        plan, cfg.train, run_dir=cfg.run.dir if plan.checkpoints else None, seed=cfg.run.seed,
        loggers=_loggers(cfg, loggers), resume=resume, on_test_batch=collector.update if collector else None)
    rows = list(history)
    unit = f"{plan.task.unit}_per_s"
    metrics.update({
        "parameters": count_parameters(trainer.model),
        "train_seconds": sum(r["seconds"] for r in rows),
        "total_seconds": time.perf_counter() - started,
        unit: _mean([r.get(unit) for r in rows]),
        **job.summarize(plan, history, trainer, metrics),
    })
    run = job.make_run(cfg, trainer.model, plan, metrics)
    if main:
        job.save(run, plan, rows)
        job.report(run, plan, rows, trainer, collector, eval_seconds, command)
    return run


def record_tokenizer_kind(cfg, tokenizer, say):
    """The config with `data.tokenizer.kind: auto` replaced by the kind the tokenizer was fitted as, so that
    config.yaml, `danlu info` and the report name what the run really uses."""
    if cfg.data.tokenizer.kind != "auto":
        return cfg
    say(f"tokenizer: {tokenizer.kind_} ({tokenizer.choice_ or 'auto: the kind the run was first trained with'})")
    kind = dataclasses.replace(cfg.data.tokenizer, kind=tokenizer.kind_)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=kind))


def check_task(verb, task):
    """Refuse, before anything is read, a task that `danlu VERB` does not train, naming the verb that does."""
    allowed = tasks_for(verb)
    if task not in allowed:
        other = TASKS[task].verb if task in TASKS else None
        raise ConfigError(f"task: `danlu {verb}` takes {' or '.join(allowed)}, got {task!r}"
                          + (f" (use `danlu {other}`)" if other and other != verb else ""))


def _finished(cfg):
    """Whether the run directory holds a run that trained as far as cfg asks."""
    path = os.path.join(cfg.run.dir, layout.METRICS)
    if not os.path.exists(path):
        return False
    from danlu.files import read_json

    done = read_json(path)
    if cfg.train.max_steps:
        return done.get("steps", 0) >= cfg.train.max_steps
    return done.get("epochs_run", 0) >= cfg.train.epochs


def fit_and_evaluate(plan, train_cfg, *, run_dir=None, seed=0, loggers=(), resume=False, on_test_batch=None,
                     after_fit=None):
    """Fit the plan's model, then evaluate it on every test and validation example (`after_fit(model)` runs in
    between). Returns (trainer, history, {"test": ..., "val": ...}, seconds the test evaluation took)."""
    trainer = Trainer(plan.model, plan.task, train_cfg, run_dir=run_dir, seed=seed, loggers=loggers)
    history = trainer.fit(plan.train, plan.val, resume=resume)
    if after_fit is not None:
        after_fit(trainer.model)
    metrics, eval_seconds = {}, 0.0
    if plan.test is not None:
        started = time.perf_counter()
        metrics["test"] = trainer.evaluate(plan.test, on_batch=on_test_batch)
        eval_seconds = time.perf_counter() - started
    if plan.val is not None:
        metrics["val"] = trainer.evaluate(plan.val)
    return trainer, history, metrics, eval_seconds


def _loggers(cfg, extra):
    loggers = list(extra)
    if cfg.train.log:
        from danlu.evaluate.tracking import LOGGERS
        from danlu.registry import resolve

        loggers += [resolve(name, LOGGERS, "train.log")(cfg.run.dir) for name in sorted(set(cfg.train.log))]
    return loggers


def _flatten(d, prefix=""):
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else 0.0
