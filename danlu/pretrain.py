"""Pretraining: raw corpus -> tokenizer + memory-mapped tokens -> GPT (causal LM) or BERT (masked LM)
from scratch -> run directory with curves, samples and a report.

The same training loop as `danlu train` (danlu.training.trainer), driven by optimizer steps: a history
row (train / validation loss and perplexity, tokens/s, MFU) every `train.eval_every` steps.

    danlu pretrain configs/pretrain_gpt_zh.yaml train.max_steps=2000 run.dir=runs/gpt_zh

>>> run = pretrain("configs/pretrain_gpt_en.yaml", "train.max_steps=50")   # doctest: +SKIP
>>> run.metrics["val"]["perplexity"]                                       # doctest: +SKIP
"""
from __future__ import annotations

import os
import sys
import time

import torch

from danlu import config as config_mod
from danlu.data.corpus import build_corpus, read_corpus
from danlu.data.tokenizer import TextTokenizer
from danlu.files import atomic_write_text
from danlu.models import build_model, count_parameters
from danlu.pipeline import _loggers, resolve_config, seed_everything
from danlu.registry import ConfigError
from danlu.runs import Run, prepare_run_dir, save_run, save_tokenizer
from danlu.training import distributed as dist
from danlu.training.tasks import LM_TASKS, MaskedLMTask
from danlu.training.trainer import Trainer, autocast_dtype, pick_device

SAMPLE_PROMPTS = 4


def pretrain(config=None, *overrides, resume=False, overwrite=False, loggers=(), command=None, **sections) -> Run:
    """Pretrain a language model from a YAML config; returns the Run. Keyword sections override the file:
    `pretrain("configs/pretrain_gpt_en.yaml", train={"max_steps": 100})`."""
    resume = resume or dist.restart_count() > 0  # torchrun --max-restarts: continue from the last checkpoint
    cfg = resolve_config(config, overrides, resume or dist.launched(), **sections)
    if cfg.task not in LM_TASKS:
        raise ConfigError(f"task: `danlu pretrain` takes {' or '.join(LM_TASKS)}, got {cfg.task!r} (use `danlu train`)")
    if not cfg.train.max_steps and not cfg.train.epochs:
        raise ConfigError("train.max_steps: give the number of optimizer steps (or train.epochs) to pretrain for")
    main = dist.is_main()  # only rank 0 logs and writes the run directory
    run_dir = prepare_run_dir(cfg.run.dir, overwrite=overwrite, resume=resume) if main else cfg.run.dir
    seed_everything(cfg.run.seed)
    say = lambda m: main and print(m, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    tokenizer_file = os.path.join(run_dir, "tokenizer.json")
    # under torchrun rank 0 fits the tokenizer and writes the token files; the others then read them
    dist.setup(cfg.train.distributed, dist.local_device(pick_device(cfg.train.device)))
    if not main:
        dist.barrier()
    reuse = (resume or not main) and os.path.exists(tokenizer_file)
    tokenizer = TextTokenizer.load(tokenizer_file) if reuse else None
    corpus = build_corpus(cfg.data, os.path.join(run_dir, "data"), cfg.task, tokenizer, say)
    if main:  # config and tokenizer first, so that an interrupted run can be resumed and inspected
        atomic_write_text(os.path.join(run_dir, "config.yaml"), config_mod.dump(cfg))
        save_tokenizer(run_dir, corpus.tokenizer)
        dist.barrier()
    model = build_model(cfg.model, corpus.spec)
    say(f"model: {cfg.model.kind}, {count_parameters(model):,} parameters; run directory: {run_dir}")
    task = _make_task(cfg.task, corpus.spec)
    trainer = Trainer(model, task, cfg.train, run_dir=run_dir, seed=cfg.run.seed, loggers=_loggers(cfg, loggers))
    say(f"training: {torch.get_num_threads()} threads on {trainer.device}, "
        f"{'bf16 autocast' if autocast_dtype(trainer.device, cfg.train.precision) else 'fp32'}"
        f"{', torch.compile' if cfg.train.compile else ''}")
    history = trainer.fit(corpus.train, corpus.val, resume=resume)
    model = trainer.model  # under FSDP, the gathered full model
    rows = list(history)
    metrics = {
        "val": trainer.evaluate(corpus.val) if corpus.val is not None else {},
        "steps": rows[-1]["step"] if rows else 0,
        "tokens_seen": (rows[-1]["step"] if rows else 0) * cfg.train.batch_size * cfg.train.grad_accum * cfg.data.block_size,
        "parameters": count_parameters(model),
        "train_seconds": sum(r["seconds"] for r in rows),
        "total_seconds": time.perf_counter() - started,
        "tokens_per_s": _mean([r["tokens_per_s"] for r in rows]),
        "mfu": _mean([r.get("mfu", 0.0) for r in rows]),
        "peak_flops": trainer.peak_flops,
        "threads": torch.get_num_threads(),
        "device": str(trainer.device),
        "corpus": corpus.stats,
    }
    run = Run(run_dir, cfg, model, corpus.tokenizer, (), metrics)
    if main:
        save_run(run_dir, cfg, model, corpus.tokenizer, (), metrics)
        run.samples = write_report(run, rows, corpus, command=command)
    return run


def _make_task(name, spec):
    if name == "masked_lm":
        return MaskedLMTask(mask_id=spec.mask_id, vocab_size=spec.vocab_size)
    return LM_TASKS[name]()


# ---------------------------------------------------------------------------------------------
# report


def sample_prompts(corpus, count=SAMPLE_PROMPTS, tokens=6):
    """Openings for samples, taken from the held-out text: the first tokens of a few validation windows."""
    stream = corpus.val or corpus.train
    n = stream.num_windows(shuffle=False)
    prompts = []
    for i in range(count):
        start = (i * n // count) * stream.block_size
        ids = [int(t) for t in stream.tokens[start : start + tokens]]
        text = corpus.tokenizer.decode(ids).strip()
        if text and text not in prompts:
            prompts.append(text)
    return prompts


def write_report(run, rows, corpus, command=None, max_new_tokens=120):
    """report.md with the curves (plots/loss.png, plots/perplexity.png) and samples; returns the samples."""
    from danlu.generation import generate

    cfg, metrics = run.cfg, run.metrics
    plots = _plot_curves(rows, os.path.join(run.path, "plots"))
    lines = [f"# Pretraining report: {os.path.basename(os.path.normpath(run.path))}", ""]
    if command:
        lines += ["```", command, "```", ""]
    val = metrics.get("val") or {}
    c = metrics["corpus"]
    lines += [
        "| | |", "|---|---|",
        f"| task | {cfg.task} |",
        f"| model | {cfg.model.kind}, {metrics['parameters']:,} parameters |",
        f"| corpus | {c['source']}: {c['train_tokens']:,} train / {c['val_tokens']:,} validation tokens |",
        f"| tokenizer | {cfg.data.tokenizer.kind}, vocabulary {c['vocab_size']:,} |",
        f"| training | {metrics['steps']:,} steps x {cfg.train.batch_size * cfg.train.grad_accum} windows of "
        f"{cfg.data.block_size} tokens = {metrics['tokens_seen']:,} tokens, {metrics['train_seconds'] / 60:.1f} min |",
        f"| hardware | {metrics['device']}, {metrics['threads']} threads, precision {cfg.train.precision} |",
        f"| throughput | {metrics['tokens_per_s']:,.0f} tokens/s, MFU {metrics['mfu']:.1%} of "
        f"{(metrics['peak_flops'] or 0) / 1e9:,.0f} GFLOP/s measured peak |",
    ]
    if val:
        lines.append(f"| validation | loss {val['loss']:.4f}, perplexity {val['perplexity']:.2f}, "
                     f"token accuracy {val['accuracy']:.1%} ({val['count']:,} tokens) |")
    lines += ["", "## Curves", ""] + [f"![{name}](plots/{os.path.basename(p)})" for name, p in plots] + [""]
    if cfg.task == "causal_lm":
        prompts = sample_prompts(corpus)
        settings = dict(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, repetition_penalty=1.1, seed=0)
        samples = list(zip(prompts, generate(run.model, run.tokenizer, prompts, **settings)))
        lines += ["## Samples", "",
                  f"Prompts are openings of held-out text; {max_new_tokens} new tokens, temperature 0.8, top-k 50, "
                  "repetition penalty 1.1, seed 0. The prompt is in bold.", ""]
        for prompt, text in samples:
            bold = "\n".join(f"**{_md_escape(line)}**" if line.strip() else "" for line in prompt.split("\n"))
            lines += [f"> {bold}{_md_escape(text)}".replace("\n", "  \n> "), ""]
    else:
        samples = _fill_mask_samples(run, corpus)
        lines += ["## Masked-token predictions", "",
                  "Held-out windows with 15% of the tokens masked; the model's top guess for each masked position.", ""]
        for original, masked, predicted in samples:
            lines += [f"- original: `{original}`", f"  - masked: `{masked}`", f"  - predicted: `{predicted}`", ""]
    atomic_write_text(os.path.join(run.path, "report.md"), "\n".join(lines) + "\n")
    return samples


@torch.no_grad()
def _fill_mask_samples(run, corpus, count=3, length=48):
    from danlu.training.tasks import mask_tokens

    stream = corpus.val or corpus.train
    batch = next(stream.batches(count, shuffle=False))
    ids = batch["input_ids"][:, :length]
    spec = corpus.spec
    generator = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(ids, spec.mask_id, spec.vocab_size, generator=generator)
    run.model.eval()
    device = next(run.model.parameters()).device
    predicted = run.model(masked.to(device)).argmax(-1).cpu()  # (B, T)
    filled = torch.where(labels != -100, predicted, ids)
    tok = run.tokenizer
    show = lambda row: tok.decode(row, skip_special_tokens=False).replace("\n", " ")  # noqa: E731
    return [(show(ids[i]), show(masked[i]), show(filled[i])) for i in range(len(ids))]


def _plot_curves(rows, plots_dir):
    from danlu.evaluate.fonts import new_figure, plot_style

    os.makedirs(plots_dir, exist_ok=True)
    steps = [r["step"] for r in rows]
    out = []
    for name, key, log in (("loss", "loss", False), ("perplexity", "perplexity", True)):
        with plot_style():
            fig = new_figure(7, 4)
            ax = fig.subplots()
            for split, color in (("train", "#1f77b4"), ("val", "#d62728")):
                points = [(s, r[f"{split}_{key}"]) for s, r in zip(steps, rows) if r.get(f"{split}_{key}") is not None]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker="o", markersize=3, color=color,
                            label="train" if split == "train" else "validation")
            if log and any(r.get("val_perplexity") for r in rows):
                ax.set_yscale("log")
            ax.set(xlabel="optimizer step", ylabel=key, title=f"{key} (per {'token' if not log else 'token, exp of loss'})")
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
            path = os.path.join(plots_dir, f"{name}.png")
            fig.savefig(path + ".tmp.png", format="png")
            os.replace(path + ".tmp.png", path)
        out.append((name, path))
    return out


def _md_escape(text):
    return "".join("\\" + ch if ch in "\\`*_[]<>#|" else ch for ch in text)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else 0.0


__all__ = ["pretrain", "write_report", "sample_prompts", "read_corpus"]
