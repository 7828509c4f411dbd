"""`danlu pretrain`: raw corpus -> tokenizer + memory-mapped tokens -> GPT (causal LM) or BERT (masked LM)
from scratch -> run directory with curves, samples and a report.

The same skeleton and training loop as `danlu train`, driven by optimizer steps: a history row (train /
validation loss and perplexity, tokens/s, MFU) every `train.eval_every` steps.

    danlu pretrain configs/pretrain_gpt_zh.yaml train.max_steps=2000 run.dir=runs/gpt_zh

>>> run = pretrain("configs/pretrain_gpt_en.yaml", "train.max_steps=50")   # doctest: +SKIP
>>> run.metrics["val"]["perplexity"]                                       # doctest: +SKIP
"""
from __future__ import annotations

import os

import torch

from danlu.data.corpus import build_corpus
from danlu.data.tokenizer import TextTokenizer
from danlu.jobs.skeleton import Job, Plan, record_tokenizer_kind, run_job
from danlu.models import build_model, count_parameters
from danlu.registry import ConfigError
from danlu.runs import layout
from danlu.training import distributed as dist
from danlu.training.tasks import TASKS, MaskedLMTask
from danlu.training.trainer import autocast_dtype, pick_device


class PretrainJob(Job):
    name = "pretrain"

    def plan(self, cfg, run_dir, resume, say):
        if not cfg.train.max_steps and not cfg.train.epochs:
            raise ConfigError("train.max_steps: give the number of optimizer steps (or train.epochs) to pretrain for")
        main = dist.is_main()
        tokenizer_file = os.path.join(run_dir, layout.TOKENIZER)
        # under torchrun rank 0 fits the tokenizer and writes the token files; the others then read them
        dist.setup(cfg.train.distributed, dist.local_device(pick_device(cfg.train.device)))
        if not main:
            dist.barrier()
        reuse = (resume or not main) and os.path.exists(tokenizer_file)
        tokenizer = TextTokenizer.load(tokenizer_file) if reuse else None
        corpus = build_corpus(cfg.data, os.path.join(run_dir, "data"), cfg.task, tokenizer, say)
        if main:
            dist.barrier()
        cfg = record_tokenizer_kind(cfg, corpus.tokenizer, say)
        model = build_model(cfg.model, corpus.spec)
        say(f"model: {cfg.model.kind}, {count_parameters(model):,} parameters; run directory: {run_dir}")
        device = dist.local_device(pick_device(cfg.train.device))
        say(f"training: {torch.get_num_threads()} threads on {device}, "
            f"{'bf16 autocast' if autocast_dtype(device, cfg.train.precision) else 'fp32'}"
            f"{', torch.compile' if cfg.train.compile else ''}")
        return Plan(cfg, model, make_task(cfg.task, corpus.spec), corpus.train, corpus.val, None, corpus.tokenizer,
                    data=corpus)

    def summarize(self, plan, history, trainer, metrics):
        cfg, rows = plan.cfg, list(history)
        steps = rows[-1]["step"] if rows else 0
        return {"steps": steps,
                "tokens_seen": steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.data.block_size,
                "mfu": _mean([r.get("mfu") for r in rows]), "peak_flops": trainer.peak_flops,
                "threads": torch.get_num_threads(), "device": str(trainer.device), "corpus": plan.data.stats}


def pretrain(config=None, *overrides, resume=False, overwrite=False, loggers=(), command=None, **sections):
    """Pretrain a language model from a YAML config; returns the Run. Keyword sections override the file:
    `pretrain("configs/pretrain_gpt_en.yaml", train={"max_steps": 100})`."""
    return run_job(PretrainJob(), config, overrides, resume=resume, overwrite=overwrite, loggers=loggers,
                   command=command, **sections)


def make_task(name, spec):
    """The language-modelling task of `name`, with the masking ids of the run's tokenizer."""
    if name == "masked_lm":
        return MaskedLMTask(mask_id=spec.mask_id, vocab_size=spec.vocab_size)
    return TASKS[name]()


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else 0.0
