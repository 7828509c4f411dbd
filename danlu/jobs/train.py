"""`danlu train`: labelled data -> tokenizer -> model -> training -> evaluation -> run directory (+ report).

>>> run = train("configs/seed_lstm.yaml", train={"epochs": 3}, run={"dir": "runs/mine"})  # doctest: +SKIP
>>> run.metrics["test"]["accuracy"]                                                      # doctest: +SKIP
"""
from __future__ import annotations

import os

from torch import nn

from danlu.data import TextTokenizer, build_data, encode_examples, make_spec
from danlu.jobs.skeleton import Job, Plan, record_tokenizer_kind, run_job
from danlu.models import build_model, count_parameters
from danlu.runs import layout
from danlu.training import distributed as dist
from danlu.training.tasks import TASKS, RegressionTask, standardised_head, target_scale


class TrainJob(Job):
    name = "train"

    def plan(self, cfg, run_dir, resume, say):
        data = build_data(cfg.data, cfg.task, cfg.run.seed)
        tokenizer_file = os.path.join(run_dir, layout.TOKENIZER)
        if resume and os.path.exists(tokenizer_file):  # the tokenizer the checkpoints were trained with
            data = _reencode(data, TextTokenizer.load(tokenizer_file), cfg)
        cfg = record_tokenizer_kind(cfg, data.tokenizer, say)
        what = "regression" if cfg.task == "regression" else f"{data.spec.num_classes} classes"
        say(f"data: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test examples, {what}, "
            f"vocabulary {data.spec.vocab_size}" + (f", {data.skipped} bad rows skipped" if data.skipped else ""))
        model = build_model(cfg.model, data.spec)
        if hasattr(model, "adapt"):  # the ngram kind's idf and character n-gram table
            model.adapt(data.train, data.tokenizer)
        say(f"model: {cfg.model.kind}, {count_parameters(model):,} parameters; run directory: {run_dir}")
        task = TASKS[cfg.task](data.labels)
        if cfg.task == "regression" and type(getattr(model, "head", None)) is nn.Linear:  # learn standardised targets
            task = RegressionTask(target_mean=(scale := target_scale(data.train.targets))[0], target_std=scale[1])
            say(f"targets: mean {scale[0]:.4g}, standard deviation {scale[1]:.4g} (learned standardised)")
        return Plan(cfg, model, task, data.train, data.val, data.test, data.tokenizer, data.labels, data=data)

    def save(self, run, plan, history):
        task = plan.task
        if getattr(task, "target_std", 1.0) != 1.0 or getattr(task, "target_mean", 0.0) != 0.0:
            standardised_head(run.model, task.target_mean, task.target_std)  # the saved model predicts in the data's units
        super().save(run, plan, history)

    def summarize(self, plan, history, trainer, metrics):
        data = plan.data
        summary = {"best_epoch": trainer.best_epoch, "epochs_run": len(history),
                "data": {"train": len(data.train), "val": len(data.val), "test": len(data.test),
                         "skipped_rows": data.skipped, "tokenizer": plan.cfg.data.tokenizer.kind,
                         **({"tokenizer_choice": data.tokenizer.choice_} if getattr(data.tokenizer, "choice_", "") else {})}}
        summary.update(text_baseline_summary(plan, metrics))
        return summary


def text_baseline_summary(plan, metrics):
    """{"baselines": ...} for metrics.json: scikit-learn baselines fitted on the plan's training texts and scored on
    its test split, beside the model's test metrics; {} when `train.baseline` is off or there is no test split."""
    if not (plan.cfg.train.baseline and "test" in metrics and dist.is_main()):
        return {}
    from danlu.evaluate.baseline import run_baselines, text_baselines

    ex, labels = plan.data.examples, plan.data.labels
    return {"baselines": run_baselines(lambda: text_baselines(ex["train"], ex["test"], plan.cfg.task, labels),
                                       metrics["test"])}


def train(config=None, *overrides, resume=False, overwrite=False, loggers=(), **sections):
    """Train, evaluate and save a run; return it. Keyword sections override the file:
    `train("configs/seed_lstm.yaml", train={"epochs": 3})` or dotted strings `"train.epochs=3"`."""
    return run_job(choose_job, config, overrides, resume=resume, overwrite=overwrite, loggers=loggers, **sections)


def choose_job(cfg):
    """The job for a `danlu train` config: images for an image model (cnn, vit), else labelled text."""
    from danlu.models import IMAGE_MODELS

    if cfg.task == "seq2seq":  # text to text: pairs, tokenizers per side, decoding and BLEU
        from danlu.jobs.seq2seq import Seq2SeqTrainJob

        return Seq2SeqTrainJob()
    if cfg.model.kind in IMAGE_MODELS:
        from danlu.jobs.images import ImageTrainJob

        return ImageTrainJob()
    return TrainJob()


def _reencode(data, tokenizer, cfg):
    numeric = cfg.task == "regression"
    enc = {k: encode_examples(ex, tokenizer, data.labels, numeric) for k, ex in data.examples.items()}
    data.train, data.val, data.test = enc["train"], enc["val"], enc["test"]
    data.tokenizer, data.spec = tokenizer, make_spec(tokenizer, data.labels, numeric)
    return data
