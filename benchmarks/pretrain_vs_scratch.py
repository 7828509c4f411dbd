"""Does pretraining pay? zh_sentiment with a GPT pretrained by `danlu pretrain` on People's Daily and
fine-tuned, vs the same architecture trained from scratch, on the same fine-tuning budget.

Both sides: the pretrained run's model config (configs/pretrain_gpt_zh.yaml: 4 layers, 256 wide, learned
positions), a character tokenizer, reviews cut at 128 characters, AdamW lr 3e-4 with linear decay, batch
32, the same number of optimizer steps and seed; test accuracy on the built-in test split. The scratch
side is what `danlu train` does (its own char tokenizer fitted on the reviews, random weights); the
fine-tuned side is `danlu finetune` with finetune.base = the pretrained run (its tokenizer and weights).

    python benchmarks/run.py --only pretrain_vs_scratch --threads 1 [--pretrained runs/pretrain_gpt_zh]

Without --pretrained (or when it does not exist) a run is pretrained first with
configs/pretrain_gpt_zh.yaml and --pretrain-steps steps.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

NAME = "pretrain_vs_scratch"
HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = dict(batch_size=32, lr=3e-4, optimizer="adamw", weight_decay=0.01, schedule="linear", warmup_steps=30,
             grad_clip=1.0, epochs=100, restore_best=False, device="cpu", eval_every=0)


def add_arguments(parser):
    group = parser.add_argument_group("pretrain_vs_scratch")
    group.add_argument("--pretrained", default="runs/pretrain_gpt_zh", help="a `danlu pretrain` causal_lm run")
    group.add_argument("--pretrain-steps", type=int, default=800, help="when the run must be pretrained first")
    group.add_argument("--finetune-steps", type=int, default=300, help="optimizer steps for both sides")
    group.add_argument("--finetune-lr", type=float, default=TRAIN["lr"], help="peak learning rate for both sides")
    group.add_argument("--pooling", default="last", choices=("last", "mean"),
                       help="classifier input of both sides: the last real token's state or the mean over tokens")
    group.add_argument("--control", action="store_true",
                       help="add a row: the pretrained run's tokenizer and fine-tuning path with freshly initialised weights")


def run(args):
    from danlu import config as config_mod
    from danlu.jobs.finetune import finetune
    from danlu.jobs.train import train
    from danlu.jobs.pretrain import pretrain

    steps = 20 if args.quick else args.finetune_steps
    limit = 2000 if args.quick else 0
    with tempfile.TemporaryDirectory() as tmp:
        base = args.pretrained
        pretrain_note = base
        if not os.path.isfile(os.path.join(base, "model.safetensors")):
            n = 20 if args.quick else args.pretrain_steps
            base = pretrain(os.path.join(HERE, os.pardir, "configs", "pretrain_gpt_zh.yaml"), f"train.max_steps={n}",
                            "train.eval_every=0" if args.quick else "train.eval_every=100",
                            run={"dir": os.path.join(tmp, "pretrained")}).path
            pretrain_note = f"pretrained here, {n} steps"
        base_cfg = config_mod.load(os.path.join(base, "config.yaml"))
        pretrain_metrics = pretrain_perplexity(base)
        data = {"train": "zh_sentiment", "limit": limit, "tokenizer": {"max_length": 128}}
        train_section = {**TRAIN, "max_steps": steps, "lr": args.finetune_lr}
        tuned = finetune(None, task="classification", finetune={"base": os.path.abspath(base), "method": "full", "pooling": args.pooling},
                         data=data, train=train_section, run={"dir": os.path.join(tmp, "finetuned"), "seed": 0})
        controlled = None
        if args.control:  # separates what the pretrained weights do from what its tokenizer and path do
            controlled = finetune(None, task="classification",
                                  finetune={"base": reinitialised(base, os.path.join(tmp, "fresh")), "method": "full",
                                            "pooling": args.pooling},
                                  data=data, train=train_section, run={"dir": os.path.join(tmp, "control"), "seed": 0})
        model = {**dataclasses.asdict(base_cfg.model), "pooling": args.pooling}
        tok = dataclasses.asdict(base_cfg.data.tokenizer)
        scratch = train(None, task="classification", model=model,
                        data={**data, "tokenizer": {**tok, "max_length": 128}}, train=train_section,
                        run={"dir": os.path.join(tmp, "scratch"), "seed": 0})
    rows = []
    contenders = [("from scratch (danlu train)", scratch, "none", None),
                  ("pretrained + fine-tuned (danlu finetune)", tuned, pretrain_note, pretrain_metrics)]
    if controlled is not None:
        contenders.append(("control: its tokenizer, fresh weights (danlu finetune)", controlled, "none", None))
    for name, r, pretraining, perplexity in contenders:
        rows.append({"model": name, "architecture": f"gpt {base_cfg.model.num_layers}x{base_cfg.model.embed_dim}",
                     "pretraining": pretraining, "pretrain_val_perplexity": perplexity,
                     "finetune_steps": steps, "batch_size": TRAIN["batch_size"], "lr": args.finetune_lr, "pooling": args.pooling,
                     "test_accuracy": r.metrics["test"]["accuracy"], "test_macro_f1": r.metrics["test"]["macro"]["f1"],
                     "train_seconds": r.metrics["train_seconds"]})
    return rows


def reinitialised(run_dir, out):
    """A copy of the run at `out` whose weights are a fresh initialisation (seed 0) of the same model."""
    import shutil

    import torch

    from danlu.files import save_weights
    from danlu.models import build_model
    from danlu.runs import load_run, run_spec

    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("checkpoints"))
    run = load_run(out)
    torch.manual_seed(0)
    save_weights(os.path.join(out, "model.safetensors"), build_model(run.cfg.model, run_spec(run.cfg, run.tokenizer, run.labels)))
    return out


def pretrain_perplexity(run_dir):
    import json

    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return (json.load(f).get("val") or {}).get("perplexity")
