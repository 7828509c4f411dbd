"""One training loop behind a Keras-like facade: `Trainer(model, task, cfg).fit(train, val) -> History`.

`fit` reads in one screen: per batch `train_step` (forward, backward, accumulation, clipping, the optimizer
step; DDP / FSDP gradient sync), per history row `_end_interval` (validation, throughput, the best value
of the monitored metric), and everything else as callbacks at named events (danlu.training.callbacks):
EarlyStopping, BestWeights (restore_best), Checkpointer, Progress, and the loggers of `train.log`. Where
the loop is lives in a LoopState, which the checkpoint stores as JSON for exact resume.

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
import math
import os
import time

import torch

from danlu.config import TrainConfig
from danlu.data.batching import iterate, num_batches
from danlu.registry import ConfigError
from danlu.training import callbacks as cb
from danlu.training import distributed as dist
from danlu.training.allocator import kept_freed_memory
from danlu.training.checkpoint import last_checkpoint, load_checkpoint, load_sharded
from danlu.training.flops import bf16_supported, measure_peak_flops, training_flops_per_token
from danlu.training.optim import build_optimizer, build_schedule
from danlu.training.tasks import TASKS


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
        raise ConfigError("train.device: cuda was asked for, but torch sees no CUDA device; use train.device=cpu or auto")
    return torch.device(name)


@dataclasses.dataclass
class LoopState:
    """Where the loop is. The checkpoint stores the first eight fields as JSON (`to_json`), which is all
    that an exact resume needs; the last three only measure the current row's throughput."""

    epoch: int = 0  # epochs (passes over the training data) finished
    batch: int = 0  # batches of the current epoch done
    step: int = 0  # optimizer steps done
    best: float | None = None  # best value so far of train.early_stopping.metric
    best_epoch: int = -1  # its history row (1-based; -1: none yet)
    bad_epochs: int = 0  # rows since it last improved
    sums: list = dataclasses.field(default_factory=lambda: [0.0, 0, 0])  # since the last row: loss sum, targets, right
    history: History = dataclasses.field(default_factory=History)
    units: int = 0  # examples or tokens since the last row
    started: float = dataclasses.field(default_factory=time.perf_counter)  # when the current row's time began
    seq_len: int = 1  # of the last batch, for FLOPs per token

    SAVED = ("epoch", "batch", "step", "best", "best_epoch", "bad_epochs", "sums", "history")

    def to_json(self):
        return {name: list(v) if isinstance(v := getattr(self, name), list) else v for name in self.SAVED}

    @classmethod
    def from_json(cls, saved):
        return cls(**{name: saved[name] for name in cls.SAVED if name != "history"}, history=History(saved["history"]))

    def add(self, loss_sum, count, correct, units, seq_len):
        """Count one more batch of the epoch."""
        self.sums = [self.sums[0] + loss_sum, self.sums[1] + count, self.sums[2] + correct]
        self.units, self.seq_len, self.batch = self.units + units, seq_len, self.batch + 1

    def track(self, value, higher_is_better):
        """Count a row's value of the monitored metric (None: the row lacks it) towards best / bad_epochs."""
        if value is not None and (self.best is None or (value > self.best if higher_is_better else value < self.best)):
            self.best, self.best_epoch, self.bad_epochs = value, len(self.history), 0
        else:
            self.bad_epochs += 1


class Trainer:
    def __init__(self, model, task, cfg: TrainConfig | None = None, run_dir=None, seed=0, loggers=(), callbacks=(),
                 **overrides):
        """Stores its arguments; the work (process group, device placement, optimizer) starts in `fit`.
        loggers (train.log) run on rank 0 only, callbacks on every process."""
        if isinstance(task, str):
            task = TASKS[task](getattr(model, "labels", ()))
        self.cfg = dataclasses.replace(cfg or TrainConfig(), **overrides)
        self.model, self.task, self.run_dir, self.seed = model, task, run_dir, seed
        self.device = dist.local_device(pick_device(self.cfg.device))
        self.loggers = list(loggers) if dist.is_main() else []
        self.callbacks = list(callbacks)
        self.state = LoopState()
        self.distributed = "none"  # what `fit` runs under: none, ddp or fsdp (torchrun)
        self.optimizer = self.scheduler = None
        self.peak_flops = None  # FLOP/s of all processes, for MFU (token-counting tasks)
        self.epoch_batches = self.total_steps = 0  # batches in an epoch; optimizer steps in the run
        self.stop_training = False  # set by a callback (EarlyStopping) to end `fit` after the current row
        self._wrapped = self._forward = self._autocast = None  # DDP / FSDP module; what the loss calls (compiled?)
        self._plain = None  # under FSDP, a plain copy of the model that receives the gathered weights at the end

    @property
    def history(self) -> History:
        return self.state.history

    @property
    def best_epoch(self):
        """The history row (1-based) whose weights restore_best keeps; -1 before any."""
        return self.state.best_epoch

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, train, val=None, epochs=None, batch_size=None, resume=False) -> History:
        """Train on `train`, evaluating on `val` at every history row; resume=True continues from the run
        directory's last checkpoint. epochs / batch_size, when given, replace the config's."""
        given = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size)) if v}
        self.cfg = cfg = dataclasses.replace(self.cfg, **given)
        higher_is_better = self.task.higher_is_better(cfg.early_stopping.metric)  # misspelt: fails before any work
        with kept_freed_memory(cfg.keep_freed_memory and self.device.type == "cpu"):
            callbacks = self._begin(train, resume)
            state, every = self.state, cfg.eval_every  # every 0: a row per epoch; N: a row every N optimizer steps
            regression = self.task.name == "regression"
            while state.epoch < cfg.epochs and not self._done() and not self.stop_training:
                self._call(callbacks, "on_epoch_begin")
                for batch in _batches(train, cfg, self.seed, state.epoch, state.batch, regression):
                    stepping = (state.batch + 1) % cfg.grad_accum == 0 or state.batch + 1 == self.epoch_batches
                    state.add(*self.train_step(batch, stepping), seq_len=_seq_len(batch))
                    self._call(callbacks, "on_batch_end", state)
                    if not stepping:
                        continue
                    state.step += 1
                    self._call(callbacks, "on_step_end", state)
                    if self.row_due():
                        self._end_interval(val, callbacks, higher_is_better)
                    if self.stop_training or self._done():
                        break
                if not every:  # a row per epoch (also when max_steps ends it early)
                    state.epoch, state.batch = state.epoch + 1, 0
                    self._end_interval(val, callbacks, higher_is_better)
                elif state.batch >= self.epoch_batches:  # step-based: an epoch only moves the data order on
                    state.epoch, state.batch = state.epoch + 1, 0
            if every and state.sums[1] and not self.stop_training:  # the epochs ran out between two rows
                self._end_interval(val, callbacks, higher_is_better)
            dist.barrier()  # rank 0 has written the last checkpoint and the best weights
            if self.distributed == "fsdp":  # the full weights on every rank, for restore_best, evaluation and saving
                self.model = dist.unshard(self.model, self._plain, self.device)
            self._call(callbacks, "on_train_end")
        return self.history

    def train_step(self, batch, sync=True):
        """One batch: forward and backward, the loss divided by train.grad_accum so that gradients add up to
        those of the accumulated batch. With `sync` (the last batch of an accumulation) DDP / FSDP average the
        gradients over the processes, and they are clipped and the optimizer and schedule step. Returns the
        batch's (loss sum, targets, right answers, units processed), summed over processes."""
        cfg, task, mode = self.cfg, self.task, self.distributed
        if mode != "none":  # each rank takes its slice of every global batch of cfg.batch_size
            batch, real = dist.shard_batch(batch)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with dist.gradient_sync(self._wrapped, sync):
            with self._autocast:
                loss, outputs = task.loss(self._forward, batch)
            count, correct, units = task.counts(outputs, batch)
            if mode == "none":
                (loss / cfg.grad_accum if cfg.grad_accum > 1 else loss).backward()  # no division (nor its backward) by 1
                loss_sum = loss.item() * count
            else:  # weight by this rank's share of the global count: the mean over ranks of the
                # gradients (what DDP and FSDP take) is then the gradient of the global batch's mean loss
                count, correct, units = (count, correct, units) if real else (0, 0, 0)
                loss_sum, total, correct, units = dist.reduce_counts(loss.item() * count, count, correct, units)
                (loss * (count * dist.world_size() / max(total, 1)) / cfg.grad_accum).backward()
                count = total
        if sync:
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, count, correct, units

    def row_due(self):
        """Whether the optimizer step just taken ends a row of a step-based run (train.eval_every)."""
        every = self.cfg.eval_every
        return bool(every) and (self.state.step % every == 0 or self._done())

    def _begin(self, train, resume):
        """What the first batch needs: the process group (under torchrun), the model on its device and
        wrapped, optimizer and schedule, the loop state (resumed or fresh), autocast, the FLOPs peak and the
        callbacks. Returns the callbacks, after on_train_begin."""
        cfg, task = self.cfg, self.task
        self.distributed = dist.setup(cfg.distributed, self.device)
        if self.distributed != "none":
            dist.check_batch_size(cfg.batch_size)
        self.model.to(self.device)  # in place
        self.epoch_batches = _num_batches(train, cfg.batch_size)
        self.total_steps = cfg.max_steps or math.ceil(self.epoch_batches / cfg.grad_accum) * cfg.epochs
        self._plain = dist.plain_copy(self.model) if self.distributed == "fsdp" else None  # for the gathered weights
        self.model, self._wrapped = dist.wrap(self.model, self.distributed, self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_schedule(self.optimizer, cfg, self.total_steps)
        dtype = autocast_dtype(self.device, cfg.precision)
        if task.unit == "tokens":  # MFU's denominator, for all processes; measured (with random matrices)
            peak = cfg.peak_flops or measure_peak_flops(self.device, dtype or torch.float32)  # before the RNG is set
            self.peak_flops = peak * dist.world_size()
        ckpt = last_checkpoint(os.path.join(self.run_dir, "checkpoints")) if self.run_dir else None
        self.state, self.stop_training = LoopState(), False
        if resume and ckpt:
            self.state = LoopState.from_json(self._resume(ckpt))
            cb.say(f"resumed from {ckpt} at epoch {self.state.epoch + 1}, batch {self.state.batch}")
        else:
            torch.manual_seed(self.seed)
        self._autocast = torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        self._forward = self._wrapped
        if cfg.compile:  # same parameters; self.model stays plain
            from danlu.models import compile_model

            self._forward = compile_model(self._wrapped)
        callbacks = [cb.Progress()] + ([cb.BestWeights(cfg.early_stopping.metric)] if cfg.restore_best else [])
        callbacks += ([cb.Checkpointer()] if self.run_dir else []) + self.loggers
        callbacks += [cb.EarlyStopping(cfg.early_stopping.metric, cfg.early_stopping.patience)] + self.callbacks
        self._wrapped.train()
        self._call(callbacks, "on_train_begin")
        self.state.started = time.perf_counter()
        return callbacks

    def _end_interval(self, val, callbacks, higher_is_better):
        """One history row: train numbers since the last row, validation, throughput; the monitored
        metric's best; then the callbacks (best weights, checkpoint, loggers, early stopping)."""
        state, task = self.state, self.task
        seconds = time.perf_counter() - state.started
        row = {"epoch": state.epoch + (state.batch > 0), "step": state.step, **task.train_metrics(*state.sums)}
        if val is not None:
            metrics = self.evaluate(val, max_batches=self.cfg.eval_batches or None)
            row.update((f"val_{name}", metrics[name]) for name in task.metrics if name in metrics)
        speed = state.units / max(seconds, 1e-9)
        row.update({"lr": self.scheduler.get_last_lr()[0], f"{task.unit}_per_s": speed})
        if self.peak_flops:
            row["mfu"] = speed * training_flops_per_token(self.model, state.seq_len) / self.peak_flops
        row["seconds"] = seconds
        self.history.append(row)
        state.sums = [0.0, 0, 0]
        state.track(row.get(self.cfg.early_stopping.metric), higher_is_better)
        self._call(callbacks, "on_epoch_end", row)
        state.units, state.started = 0, time.perf_counter()

    def _call(self, callbacks, event, *args):
        for callback in callbacks:
            getattr(callback, event)(self, *args)

    # -- evaluation and prediction --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset, batch_size=None, on_batch=None, max_batches=None):
        """Streaming metrics over a dataset (memory does not grow with its size): every batch, or the first
        `max_batches` (the loop's validation passes train.eval_batches)."""
        first = next(self.model.parameters(), None)
        if first is not None and first.device != self.device:  # placed here, not when the trainer is built
            self.model.to(self.device)
        self.model.eval()
        metrics = self.task.new_metrics()
        regression = self.task.name == "regression"
        if hasattr(dataset, "batches"):
            batches = dataset.batches(batch_size or self.cfg.batch_size, shuffle=False)
        else:
            batches = iterate(dataset, batch_size or max(self.cfg.batch_size, 64), dataset.pad_id, shuffle=False,
                              regression=regression)
        if max_batches is not None:
            batches = itertools.islice(batches, max_batches)
        for batch in batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            _, outputs = self.task.loss(self.model, batch)
            self.task.update(metrics, outputs, batch)
            if on_batch is not None:
                on_batch(outputs, batch)
        self.model.train()
        return metrics.compute()

    # -- helpers --------------------------------------------------------------------------------------
    def _done(self):
        return bool(self.cfg.max_steps) and self.state.step >= self.total_steps

    def _resume(self, path):
        """Load a checkpoint on this run's processes, whatever number wrote it: a sharded one through DCP
        (which reshards), a single file directly or, under FSDP, sharded from its full state."""
        if os.path.isdir(path):
            return load_sharded(path, self.model, self.optimizer, self.scheduler)
        if self.distributed == "fsdp":
            return load_checkpoint(path, *dist.FullState(self.model, self.optimizer).loaders(), self.scheduler)
        return load_checkpoint(path, self.model, self.optimizer, self.scheduler)


def autocast_dtype(device, precision):
    """torch.bfloat16 for bf16 (and for auto where the hardware has it), else None (full fp32). The value
    was checked against train.precision's choices when the config was loaded."""
    if precision == "bf16" or (precision == "auto" and bf16_supported(device)):
        return torch.bfloat16
    return None


def _batches(data, cfg, seed, epoch, skip, regression):
    if hasattr(data, "batches"):
        return data.batches(cfg.batch_size, epoch=epoch, seed=seed, skip=skip)
    return iterate(data, cfg.batch_size, data.pad_id, seed=seed, epoch=epoch, bucket=cfg.bucket, skip=skip,
                   regression=regression)


def _num_batches(data, batch_size):
    return data.num_batches(batch_size) if hasattr(data, "num_batches") else num_batches(data, batch_size)


def _seq_len(batch):
    """Tokens per row of a text batch (for FLOPs per token); images have no sequence."""
    return batch["input_ids"].shape[-1] if "input_ids" in batch else 1
