"""One training loop behind a Keras-like facade: `Trainer(model, task, cfg).fit(train, val) -> History`.

The loop does accumulation, clipping, autocast, schedules, early stopping and checkpoints inline;
loggers are called at three events (`on_train_begin`, `on_epoch_end` (each history row), `on_train_end`).

The training data is a TextDataset (padded, length-bucketed batches) or any object with
`batches(batch_size, *, epoch, seed, skip, shuffle)` and `num_batches(batch_size)`, such as the packed
token windows of a pretraining corpus (danlu.data.corpus.TokenStream). A history row is written per
epoch, or every `train.eval_every` optimizer steps for step-based runs (pretraining); the task counts
what a batch holds (examples or tokens), and token-counting runs also log model FLOPs utilisation.

>>> trainer = Trainer(model, ClassificationTask(labels), TrainConfig(epochs=10, batch_size=32))  # doctest: +SKIP
>>> history = trainer.fit(data.train, data.val)                                                    # doctest: +SKIP
>>> trainer.evaluate(data.test)["accuracy"]                                                       # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import sys
import time

import torch

from danlu.config import TrainConfig
from danlu.data.batching import iterate, num_batches
from danlu.files import atomic_write_text, load_tensors, load_weights, save_weights
from danlu.training import distributed as dist
from danlu.training.allocator import keep_freed_memory
from danlu.training.checkpoint import (LAST_FILE, LAST_FOLDER, last_checkpoint, load_checkpoint, load_sharded,
                                       remove_other, save_checkpoint, save_sharded)
from danlu.training.optim import build_optimizer, build_schedule
from danlu.training.flops import bf16_supported, measure_peak_flops, training_flops_per_token
from danlu.training.tasks import ALL_TASKS


class History(list):
    """One dict per epoch (or per eval interval): epoch, step, train_loss, train_<metric>, val_loss, val_<metric>,
    lr, samples_per_s (tokens_per_s and mfu for language models), seconds."""

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
            task = ALL_TASKS[task](getattr(model, "labels", ()))
        self.cfg = dataclasses.replace(cfg or TrainConfig(), **overrides)
        self.task, self.run_dir, self.seed = task, run_dir, seed
        self.device = dist.local_device(pick_device(self.cfg.device))
        self.distributed = dist.setup(self.cfg.distributed, self.device)  # under torchrun: ddp or fsdp
        self.model = model.to(self.device)
        self.loggers = list(loggers) if dist.is_main() else []
        self.history = History()
        self.stopped_early = False

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, train, val=None, epochs=None, batch_size=None, resume=False) -> History:
        cfg = dataclasses.replace(self.cfg, **{k: v for k, v in (("epochs", epochs), ("batch_size", batch_size)) if v})
        self.cfg = cfg
        model, task, device = self.model, self.task, self.device
        if device.type == "cpu":
            keep_freed_memory()  # no page faults for the blocks every step allocates again (allocator.py)
        regression = task.name == "regression"
        per_epoch = math.ceil(_num_batches(train, cfg.batch_size) / cfg.grad_accum)
        total_steps = cfg.max_steps or per_epoch * cfg.epochs
        mode, world = self.distributed, dist.world_size()
        if mode != "none":  # each rank takes its slice of every global batch of cfg.batch_size
            dist.check_batch_size(cfg.batch_size)
        plain = dist.plain_copy(model) if mode == "fsdp" else None  # holds the gathered weights at the end
        model, wrapped = dist.wrap(model, mode, device)
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_schedule(self.optimizer, cfg, total_steps)
        state = {"epoch": 0, "batch": 0, "step": 0, "best": None, "best_epoch": -1, "bad_epochs": 0,
                 "sums": [0.0, 0, 0.0], "history": []}
        ckpt = last_checkpoint(self._path("checkpoints")) if self.run_dir else None
        if resume and ckpt:
            state = self._resume(ckpt)
            self.history = History(state["history"])
            self._say(f"resumed from {ckpt} at epoch {state['epoch'] + 1}, batch {state['batch']}")
        else:
            torch.manual_seed(self.seed)
        for logger in self.loggers:
            logger.on_train_begin(self)
        dtype = autocast_dtype(device, cfg.precision)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        forward = wrapped
        if cfg.compile:  # same parameters; self.model stays plain
            from danlu.models import compile_model

            forward = compile_model(wrapped)
        self.peak_flops = None
        if task.unit == "tokens":  # MFU's denominator, once per run
            self.peak_flops = cfg.peak_flops or measure_peak_flops(device, dtype or torch.float32)
        every = cfg.eval_every  # 0: a row per epoch; N: a row every N optimizer steps
        start, processed = time.perf_counter(), 0  # since the last row
        while state["epoch"] < cfg.epochs and not self._done(state, total_steps):
            epoch = state["epoch"]
            model.train()
            if not every:
                start, processed = time.perf_counter(), 0
            batches = _batches(train, cfg, self.seed, epoch, state["batch"], regression)
            progress = self._progress(_num_batches(train, cfg.batch_size), state["batch"], f"epoch {epoch + 1}/{cfg.epochs}")
            for batch in batches:
                stepping = (state["batch"] + 1) % cfg.grad_accum == 0 or state["batch"] + 1 == progress.total
                if mode != "none":
                    batch, real = dist.shard_batch(batch)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with dist.gradient_sync(wrapped, stepping):
                    with autocast:
                        loss, outputs = task.loss(forward, batch)
                    count, correct, units = task.counts(outputs, batch)
                    if mode == "none":
                        (loss / cfg.grad_accum).backward()
                        loss_sum = loss.item() * count
                    else:  # weight by this rank's share of the global count: the mean over ranks of the
                        # gradients (what DDP and FSDP take) is then the gradient of the global batch's mean loss
                        count, correct, units = (count, correct, units) if real else (0, 0, 0)
                        loss_sum, total, correct, units = dist.reduce_counts(loss.item() * count, count, correct, units)
                        (loss * (count * world / max(total, 1)) / cfg.grad_accum).backward()
                        count = total
                state["sums"][0] += loss_sum
                state["sums"][1] += count
                state["sums"][2] += correct
                processed += units
                self._seq_len = batch["input_ids"].shape[-1] if "input_ids" in batch else 1  # images: no sequence
                state["batch"] += 1
                progress.update(state["sums"][0] / max(state["sums"][1], 1))
                last = state["batch"] == progress.total
                if state["batch"] % cfg.grad_accum == 0 or last:
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    state["step"] += 1
                    if cfg.log_every and state["step"] % cfg.log_every == 0:
                        self._say(self._progress_line(state, total_steps, processed, time.perf_counter() - start))
                    if every and (state["step"] % every == 0 or self._done(state, total_steps)):
                        self._end_interval(state, epoch + 1, val, time.perf_counter() - start, processed)
                        start, processed = time.perf_counter(), 0
                        if self.stopped_early:
                            break
                    elif cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and not last:
                        self._checkpoint(state)
                    if self._done(state, total_steps):
                        break
            progress.close()
            if self.stopped_early:
                break
            if every:  # step-based: an epoch only moves the data order on
                if state["batch"] >= progress.total:
                    state.update(epoch=epoch + 1, batch=0)
                continue
            self._end_interval(state, epoch + 1, val, time.perf_counter() - start, processed, epoch_end=True)
            if self.stopped_early:
                break
        if every and state["sums"][1] and not self.stopped_early:  # the epochs ran out between two rows
            self._end_interval(state, state["epoch"], val, time.perf_counter() - start, processed)
        dist.barrier()  # rank 0 has written the last checkpoint and the best weights
        if mode == "fsdp":  # the full weights on every rank, for restore_best, evaluation and saving
            self.model = model = dist.unshard(model, plain, device)
        monitor = cfg.early_stopping.metric
        best = self._path("checkpoints", "best.safetensors")
        kept = getattr(self, "_best_weights", None)
        if cfg.restore_best and state["best_epoch"] != len(self.history) and (kept or (best and os.path.exists(best))):
            load_weights(model, kept or load_tensors(best)[0], where=best or "the best epoch's weights")
            where = (f"step {self.history[state['best_epoch'] - 1]['step']}" if every
                     else f"epoch {state['best_epoch']}")
            self._say(f"restored the weights of {where} (best {monitor} {state['best']:.4f})")
        self.best_epoch = state["best_epoch"]
        for logger in self.loggers:
            logger.on_train_end(self)
        return self.history

    def _end_interval(self, state, epoch, val, seconds, processed, epoch_end=False):
        """One history row: train numbers since the last row, validation, throughput; then best weights,
        checkpoint, loggers and early stopping."""
        cfg, task = self.cfg, self.task
        loss_sum, count, correct = state["sums"]
        row = {"epoch": epoch, "step": state["step"], **task.train_metrics(loss_sum, count, correct)}
        if val is not None:
            metrics = self.evaluate(val)
            row["val_loss"] = metrics["loss"]
            row[f"val_{task.monitor}"] = metrics[task.monitor]
        row.update({"lr": self.scheduler.get_last_lr()[0], f"{task.unit}_per_s": processed / max(seconds, 1e-9)})
        if self.peak_flops:
            flops = training_flops_per_token(self.model, getattr(self, "_seq_len", 1))
            row["mfu"] = row[f"{task.unit}_per_s"] * flops / self.peak_flops
        row["seconds"] = seconds
        self.history.append(row)
        self._say(_format_row(row))
        if epoch_end:
            state.update(epoch=epoch, batch=0)
        state.update(sums=[0.0, 0, 0.0], history=list(self.history))
        monitor = cfg.early_stopping.metric
        lower_better = monitor.endswith("loss")
        value = row.get(monitor)
        if value is not None and (state["best"] is None or (value < state["best"] if lower_better else value > state["best"])):
            state.update(best=value, best_epoch=len(self.history), bad_epochs=0)
            if cfg.restore_best:
                meta = {"epoch": epoch} if epoch_end else {"epoch": epoch, "step": state["step"]}
                weights = dist.FullState(self.model, None).weights() if self.distributed == "fsdp" else self.model
                if not self.run_dir:  # no run directory (the Python API): keep the best weights in memory
                    self._best_weights = {k: v.detach().to("cpu", copy=True) for k, v in weights.state_dict().items()}
                elif dist.is_main():
                    save_weights(self._path("checkpoints", "best.safetensors"), weights, meta)
        else:
            state["bad_epochs"] += 1
        self._checkpoint(state)
        for logger in self.loggers:
            logger.on_epoch_end(self, row)
        if cfg.early_stopping.patience and state["bad_epochs"] >= cfg.early_stopping.patience:
            what = "epochs" if epoch_end else "evaluations"
            self._say(f"early stopping: {monitor} has not improved for {state['bad_epochs']} {what}")
            self.stopped_early = True

    def _progress_line(self, state, total_steps, processed, seconds):
        sums = state["sums"]
        return (f"step {state['step']}/{total_steps}  loss {sums[0] / max(sums[1], 1):.4f}  "
                f"lr {self.scheduler.get_last_lr()[0]:.2e}  {processed / max(seconds, 1e-9):.0f} {self.task.unit}/s")

    # -- evaluation and prediction --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset, batch_size=None, on_batch=None):
        """Streaming metrics over a dataset (memory does not grow with its size)."""
        self.model.eval()
        metrics = self.task.new_metrics()
        regression = self.task.name == "regression"
        if hasattr(dataset, "batches"):
            batches = dataset.batches(batch_size or self.cfg.batch_size, shuffle=False)
        else:
            batches = iterate(dataset, batch_size or max(self.cfg.batch_size, 64), dataset.pad_id, shuffle=False,
                              regression=regression)
        if self.cfg.eval_batches:
            batches = itertools.islice(batches, self.cfg.eval_batches)
        for batch in batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            _, outputs = self.task.loss(self.model, batch)
            self.task.update(metrics, outputs, batch)
            if on_batch is not None:
                on_batch(outputs, batch)
        self.model.train()
        return metrics.compute()

    # -- helpers --------------------------------------------------------------------------------------
    def _done(self, state, total_steps):
        return bool(self.cfg.max_steps) and state["step"] >= total_steps

    def _path(self, *parts):
        return os.path.join(self.run_dir, *parts) if self.run_dir else None

    def _checkpoint(self, state):
        """checkpoints/last.safetensors from rank 0, or under FSDP the sharded checkpoints/last/ that every
        rank writes its part of (danlu.training.checkpoint)."""
        if not self.run_dir:
            return
        folder, sharded = self._path("checkpoints"), self.distributed == "fsdp"
        if sharded:
            save_sharded(os.path.join(folder, LAST_FOLDER), self.model, self.optimizer, self.scheduler, state)
        elif dist.is_main():
            save_checkpoint(os.path.join(folder, LAST_FILE), self.model, self.optimizer, self.scheduler, state)
        if dist.is_main():
            remove_other(folder, sharded)
            rows = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.history)
            atomic_write_text(self._path("history.jsonl"), rows)

    def _resume(self, path):
        """Load a checkpoint on this run's processes, whatever number wrote it: a sharded one through DCP
        (which reshards), a single file directly or, under FSDP, sharded from its full state."""
        if os.path.isdir(path):
            return load_sharded(path, self.model, self.optimizer, self.scheduler)
        if self.distributed == "fsdp":
            return load_checkpoint(path, *dist.FullState(self.model, self.optimizer).loaders(), self.scheduler)
        return load_checkpoint(path, self.model, self.optimizer, self.scheduler)

    def _progress(self, total, done, desc):
        return _Progress(total, done, desc)

    @staticmethod
    def _say(message):
        if dist.is_main():
            print(message, file=sys.stderr, flush=True)


def autocast_dtype(device, precision):
    """torch.bfloat16 for bf16 (and for auto where the hardware has it), else None (full fp32)."""
    if precision == "bf16" or (precision == "auto" and bf16_supported(device)):
        return torch.bfloat16
    if precision not in ("fp32", "auto", "bf16"):
        from danlu.registry import ConfigError

        raise ConfigError(f"train.precision: unknown value {precision!r}; expected one of: auto, bf16, fp32")
    return None


def _batches(data, cfg, seed, epoch, skip, regression):
    if hasattr(data, "batches"):
        return data.batches(cfg.batch_size, epoch=epoch, seed=seed, skip=skip)
    return iterate(data, cfg.batch_size, data.pad_id, seed=seed, epoch=epoch, bucket=cfg.bucket, skip=skip,
                   regression=regression)


def _num_batches(data, batch_size):
    return data.num_batches(batch_size) if hasattr(data, "num_batches") else num_batches(data, batch_size)


class _Progress:
    """A tqdm bar on a terminal; nothing per batch otherwise (the epoch line says it all)."""

    def __init__(self, total, done, desc):
        self.total = total
        self.bar = None
        if sys.stderr.isatty() and dist.is_main():
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
    parts = [f"epoch {row['epoch']}"] + ([f"step {row['step']}"] if "tokens_per_s" in row else [])
    for key in ("train_loss", "train_perplexity", "train_accuracy", "val_loss", "val_accuracy", "val_r2",
                "val_perplexity"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    for unit in ("samples", "tokens"):
        if f"{unit}_per_s" in row:
            parts.append(f"{row[f'{unit}_per_s']:.0f} {unit}/s")
    if "mfu" in row:
        parts.append(f"MFU {row['mfu']:.1%}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)
