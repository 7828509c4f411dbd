"""One training loop behind a Keras-like facade: `Trainer(model, task, cfg).fit(train, val) -> History`.

The loop does accumulation, clipping, autocast, schedules, early stopping and checkpoints inline;
loggers are called at three events (`on_train_begin`, `on_epoch_end`, `on_train_end`).

>>> trainer = Trainer(model, ClassificationTask(labels), TrainConfig(epochs=10, batch_size=32))  # doctest: +SKIP
>>> history = trainer.fit(data.train, data.val)                                                    # doctest: +SKIP
>>> trainer.evaluate(data.test)["accuracy"]                                                       # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import torch

from danlu.config import TrainConfig
from danlu.data.batching import iterate, num_batches
from danlu.files import atomic_write_text, load_tensors, load_weights, save_weights
from danlu.train.checkpoint import load_checkpoint, save_checkpoint
from danlu.train.optim import build_optimizer, build_schedule
from danlu.train.tasks import TASKS


class History(list):
    """One dict per epoch: epoch, step, train_loss, train_<metric>, val_loss, val_<metric>, lr, samples_per_s, seconds."""

    def series(self, key):
        return [row.get(key) for row in self]

    def plot(self, path="curves.png"):
        from danlu.evaluate.plots import plot_curves

        return plot_curves(list(self), path)


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from danlu.registry import ConfigError

        raise ConfigError("train.device: cuda was asked for, but torch sees no CUDA device; use train.device=cpu or auto")
    return torch.device(name)


class Trainer:
    def __init__(self, model, task, cfg: TrainConfig | None = None, run_dir=None, seed=0, loggers=(), **overrides):
        if isinstance(task, str):
            task = TASKS[task](getattr(model, "labels", ()))
        self.cfg = dataclasses.replace(cfg or TrainConfig(), **overrides)
        self.task, self.run_dir, self.seed = task, run_dir, seed
        self.device = pick_device(self.cfg.device)
        self.model = model.to(self.device)
        self.loggers = list(loggers)
        self.history = History()
        self.stopped_early = False

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, train, val=None, epochs=None, batch_size=None, resume=False) -> History:
        cfg = dataclasses.replace(self.cfg, **{k: v for k, v in (("epochs", epochs), ("batch_size", batch_size)) if v})
        self.cfg = cfg
        model, task, device = self.model, self.task, self.device
        regression = task.name == "regression"
        per_epoch = math.ceil(num_batches(train, cfg.batch_size) / cfg.grad_accum)
        total_steps = cfg.max_steps or per_epoch * cfg.epochs
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_schedule(self.optimizer, cfg, total_steps)
        state = {"epoch": 0, "batch": 0, "step": 0, "best": None, "best_epoch": -1, "bad_epochs": 0,
                 "sums": [0.0, 0, 0.0], "history": []}
        ckpt = self._path("checkpoints", "last.safetensors")
        if resume and ckpt and os.path.exists(ckpt):
            state = load_checkpoint(ckpt, model, self.optimizer, self.scheduler)
            self.history = History(state["history"])
            self._say(f"resumed from {ckpt} at epoch {state['epoch'] + 1}, batch {state['batch']}")
        else:
            torch.manual_seed(self.seed)
        for logger in self.loggers:
            logger.on_train_begin(self)
        monitor = cfg.early_stopping.metric
        lower_better = monitor.endswith("loss")
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                    else contextlib.nullcontext())
        while state["epoch"] < cfg.epochs and not self._done(state, total_steps):
            epoch = state["epoch"]
            model.train()
            start, seen_at_start = time.perf_counter(), state["sums"][1]
            batches = iterate(train, cfg.batch_size, train.pad_id, seed=self.seed, epoch=epoch, bucket=cfg.bucket,
                              skip=state["batch"], regression=regression)
            progress = self._progress(num_batches(train, cfg.batch_size), state["batch"], f"epoch {epoch + 1}/{cfg.epochs}")
            for batch in batches:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast:
                    loss, outputs = task.loss(model, batch)
                (loss / cfg.grad_accum).backward()
                n = len(batch["input_ids"])
                state["sums"][0] += loss.item() * n
                state["sums"][1] += n
                if not regression:
                    state["sums"][2] += (outputs.argmax(-1) == batch["labels"]).sum().item()
                state["batch"] += 1
                progress.update(state["sums"][0] / state["sums"][1])
                last = state["batch"] == progress.total
                if state["batch"] % cfg.grad_accum == 0 or last:
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    state["step"] += 1
                    if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and not last:
                        self._checkpoint(state)
                    if self._done(state, total_steps):
                        break
            progress.close()
            seconds = time.perf_counter() - start
            loss_sum, count, correct = state["sums"]
            row = {"epoch": epoch + 1, "step": state["step"], "train_loss": loss_sum / max(count, 1)}
            if not regression:
                row["train_accuracy"] = correct / max(count, 1)
            if val is not None:
                metrics = self.evaluate(val)
                row["val_loss"] = metrics["loss"]
                row[f"val_{task.monitor}"] = metrics[task.monitor]
            row.update(lr=self.scheduler.get_last_lr()[0], samples_per_s=(count - seen_at_start) / max(seconds, 1e-9),
                       seconds=seconds)
            self.history.append(row)
            self._say(_format_row(row))
            state.update(epoch=epoch + 1, batch=0, sums=[0.0, 0, 0.0], history=list(self.history))
            value = row.get(monitor)
            if value is not None and (state["best"] is None or (value < state["best"] if lower_better else value > state["best"])):
                state.update(best=value, best_epoch=epoch + 1, bad_epochs=0)
                if self.run_dir and cfg.restore_best:
                    save_weights(self._path("checkpoints", "best.safetensors"), model, {"epoch": epoch + 1})
            else:
                state["bad_epochs"] += 1
            self._checkpoint(state)
            for logger in self.loggers:
                logger.on_epoch_end(self, row)
            if cfg.early_stopping.patience and state["bad_epochs"] >= cfg.early_stopping.patience:
                self._say(f"early stopping: {monitor} has not improved for {state['bad_epochs']} epochs")
                self.stopped_early = True
                break
        best = self._path("checkpoints", "best.safetensors")
        if cfg.restore_best and best and os.path.exists(best) and state["best_epoch"] != len(self.history):
            load_weights(model, load_tensors(best)[0], where=best)
            self._say(f"restored the weights of epoch {state['best_epoch']} (best {monitor} {state['best']:.4f})")
        self.best_epoch = state["best_epoch"]
        for logger in self.loggers:
            logger.on_train_end(self)
        return self.history

    # -- evaluation and prediction --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset, batch_size=None, on_batch=None):
        """Streaming metrics over a dataset (memory does not grow with its size)."""
        self.model.eval()
        metrics = self.task.new_metrics()
        regression = self.task.name == "regression"
        for batch in iterate(dataset, batch_size or max(self.cfg.batch_size, 64), dataset.pad_id, shuffle=False,
                             regression=regression):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            _, outputs = self.task.loss(self.model, batch)
            self.task.update(metrics, outputs, batch)
            if on_batch is not None:
                on_batch(outputs, batch)
        self.model.train()
        return metrics.compute()

    @torch.no_grad()
    def predict(self, dataset, batch_size=64):
        """Class probabilities (N, C) for classifiers, values (N,) for regression, in dataset order."""
        self.model.eval()
        out = [None] * len(dataset)
        for batch in iterate(dataset, batch_size, dataset.pad_id, shuffle=False):
            logits = self.model(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)).float()
            values = logits.squeeze(-1) if self.task.name == "regression" else logits.softmax(-1)
            for i, v in zip(batch["index"].tolist(), values.cpu()):
                out[i] = v
        return torch.stack(out) if out else torch.empty(0)

    # -- helpers --------------------------------------------------------------------------------------
    def _done(self, state, total_steps):
        return bool(self.cfg.max_steps) and state["step"] >= total_steps

    def _path(self, *parts):
        return os.path.join(self.run_dir, *parts) if self.run_dir else None

    def _checkpoint(self, state):
        if self.run_dir:
            save_checkpoint(self._path("checkpoints", "last.safetensors"), self.model, self.optimizer, self.scheduler, state)
            atomic_write_text(self._path("history.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.history))

    def _progress(self, total, done, desc):
        return _Progress(total, done, desc)

    @staticmethod
    def _say(message):
        print(message, file=sys.stderr, flush=True)


class _Progress:
    """A tqdm bar on a terminal; nothing per batch otherwise (the epoch line says it all)."""

    def __init__(self, total, done, desc):
        self.total = total
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=desc, unit="batch", leave=False, dynamic_ncols=True)

    def update(self, loss):
        if self.bar is not None:
            self.bar.update(1)
            if self.bar.n % 10 == 0:
                self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _format_row(row):
    parts = [f"epoch {row['epoch']}"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_r2"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"{row['samples_per_s']:.0f} samples/s")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)
