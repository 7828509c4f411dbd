"""The training loop's policies, as callbacks at a handful of named events (as Keras callbacks).

`Trainer.fit` calls, in order, on every process (a callback that writes checks `dist.is_main()` itself):

    on_train_begin(trainer)          once, after the optimizer and the loop state exist (resumed or fresh)
    on_epoch_begin(trainer)          at the start of each pass over the training data
    on_batch_end(trainer, state)     after each batch's forward and backward
    on_step_end(trainer, state)      after each optimizer step
    on_epoch_end(trainer, row)       after each history row: per epoch, or every train.eval_every steps
    on_train_end(trainer)            once, with the final weights in trainer.model

`state` is the trainer's LoopState (epoch, batch, step, best, best_epoch, bad_epochs, running sums,
history); a row is one History dict. The loop keeps `state.best` and friends by the task's direction of
`train.early_stopping.metric`; the callbacks below act on them. A callback stops training by setting
`trainer.stop_training = True`.

>>> class PrintLoss(Callback):
...     def on_epoch_end(self, trainer, row):
...         print(row["epoch"], row["train_loss"])
>>> Trainer(model, task, cfg, callbacks=[PrintLoss()]).fit(train, val)   # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

from danlu.files import atomic_write_text, load_tensors, load_weights, save_weights
from danlu.training import distributed as dist


class Callback:
    """Does nothing at every event; subclasses override the events they need."""

    def on_train_begin(self, trainer):
        pass

    def on_epoch_begin(self, trainer):
        pass

    def on_batch_end(self, trainer, state):
        pass

    def on_step_end(self, trainer, state):
        pass

    def on_epoch_end(self, trainer, row):
        pass

    def on_train_end(self, trainer):
        pass


class EarlyStopping(Callback):
    """Stop once the monitored metric has not improved for `patience` rows (train.early_stopping)."""

    def __init__(self, metric, patience):
        self.metric, self.patience = metric, patience

    def on_epoch_end(self, trainer, row):
        bad = trainer.state.bad_epochs
        if self.patience and bad >= self.patience:
            say(f"early stopping: {self.metric} has not improved for {bad} "
                f"{'evaluations' if trainer.cfg.eval_every else 'epochs'}")
            trainer.stop_training = True


class BestWeights(Callback):
    """restore_best: keep the weights of the best row (checkpoints/best.safetensors in a run directory, in
    memory without one) and load them back at the end of training."""

    def __init__(self, metric):
        self.metric = metric
        self.kept = None  # the best weights, on CPU, when there is no run directory

    def on_train_begin(self, trainer):
        self.kept = None

    def on_epoch_end(self, trainer, row):
        if trainer.state.best_epoch != len(trainer.history):
            return
        meta = {"epoch": row["epoch"], "step": row["step"]} if trainer.cfg.eval_every else {"epoch": row["epoch"]}
        weights = dist.FullState(trainer.model, None).weights() if trainer.distributed == "fsdp" else trainer.model
        if not trainer.run_dir:
            self.kept = {k: v.detach().to("cpu", copy=True) for k, v in weights.state_dict().items()}
        elif dist.is_main():
            save_weights(best_path(trainer), weights, meta)

    def on_train_end(self, trainer):
        state, history, path = trainer.state, trainer.history, best_path(trainer)
        if state.best_epoch == len(history) or not (self.kept or (path and os.path.exists(path))):
            return
        load_weights(trainer.model, self.kept or load_tensors(path)[0], where=path or "the best epoch's weights")
        row = history[state.best_epoch - 1]
        where = f"step {row['step']}" if trainer.cfg.eval_every else f"epoch {row['epoch']}"
        say(f"restored the weights of {where} (best {self.metric} {state.best:.4f})")


class Checkpointer(Callback):
    """checkpoints/last.safetensors from rank 0 (or under FSDP the sharded checkpoints/last/ that every rank
    writes its part of; danlu.training.checkpoint) and history.jsonl: at every history row, and every
    train.checkpoint_every optimizer steps in between."""

    def on_step_end(self, trainer, state):
        every = trainer.cfg.checkpoint_every
        if every and state.step % every == 0 and state.batch < trainer.epoch_batches and not trainer.row_due():
            self.save(trainer)  # (a row, or the end of the epoch, writes one anyway)

    def on_epoch_end(self, trainer, row):
        self.save(trainer)

    @staticmethod
    def save(trainer):
        from danlu.training.checkpoint import LAST_FILE, LAST_FOLDER, remove_other, save_checkpoint, save_sharded

        folder, sharded = os.path.join(trainer.run_dir, "checkpoints"), trainer.distributed == "fsdp"
        parts = (trainer.model, trainer.optimizer, trainer.scheduler, trainer.state.to_json())
        if sharded:
            save_sharded(os.path.join(folder, LAST_FOLDER), *parts)
        elif dist.is_main():
            save_checkpoint(os.path.join(folder, LAST_FILE), *parts)
        if dist.is_main():
            remove_other(folder, sharded)
            rows = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in trainer.history)
            atomic_write_text(os.path.join(trainer.run_dir, "history.jsonl"), rows)


class Progress(Callback):
    """What a person watching sees, from rank 0: each history row, the train.log_every lines, and between
    them a tqdm bar on a terminal or, when stderr is a file or a pipe, a line every tenth of an epoch or
    every `seconds`, whichever comes first, with the time left, so that a long run is never silent."""

    def __init__(self, seconds=30.0, parts=10):
        self.seconds, self.parts = seconds, parts
        self.bar = None
        self.started = self.last = 0.0  # when fit began, when the last line was printed
        self.done = self.every = self.first = 0  # batches run in this fit; a line every `every` batches of
        # the epoch from `first`, where this fit began it

    def on_train_begin(self, trainer):
        self.started = self.last = time.perf_counter()
        self.done = 0

    def on_epoch_begin(self, trainer):
        self.close()
        state = trainer.state
        self.first = state.batch
        self.every = max(1, math.ceil(min(trainer.epoch_batches - state.batch, _batches_left(trainer)) / self.parts))
        if dist.is_main() and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.epoch_batches, initial=state.batch, desc=_epoch(trainer), unit="batch",
                            leave=False, dynamic_ncols=True)

    def on_batch_end(self, trainer, state):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            if self.bar.n % 10 == 0:
                self.bar.set_postfix(loss=f"{state.sums[0] / max(state.sums[1], 1):.4f}")
            return
        now = time.perf_counter()
        if ((state.batch - self.first) % self.every and now - self.last < self.seconds) or not dist.is_main():
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)  # validation and checkpoints included
        say(f"{_epoch(trainer)}  batch {state.batch}/{trainer.epoch_batches}  "
            f"loss {state.sums[0] / max(state.sums[1], 1):.4f}  {rate:.1f} batches/s  "
            f"ETA {_duration(_batches_left(trainer) / rate)}")

    def on_step_end(self, trainer, state):
        cfg = trainer.cfg
        if cfg.log_every and state.step % cfg.log_every == 0:
            seconds = time.perf_counter() - state.started
            self.write(f"step {state.step}/{trainer.total_steps}  loss {state.sums[0] / max(state.sums[1], 1):.4f}  "
                       f"lr {trainer.scheduler.get_last_lr()[0]:.2e}  {state.units / max(seconds, 1e-9):.0f} "
                       f"{trainer.task.unit}/s")

    def on_epoch_end(self, trainer, row):
        if trainer.state.batch == 0:  # the epoch is over: its bar goes before its row
            self.close()
        self.write(format_row(row))

    def on_train_end(self, trainer):
        self.close()

    def write(self, line):
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            say(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def say(message):
    """A line on stderr, from rank 0 only."""
    if dist.is_main():
        print(message, file=sys.stderr, flush=True)


def best_path(trainer):
    return os.path.join(trainer.run_dir, "checkpoints", "best.safetensors") if trainer.run_dir else None


def format_row(row):
    parts = [f"epoch {row['epoch']}"] + ([f"step {row['step']}"] if "tokens_per_s" in row else [])
    for key in ("train_loss", "train_perplexity", "train_accuracy", "val_loss", "val_accuracy", "val_r2",
                "val_mae", "val_perplexity"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    for unit in ("samples", "tokens"):
        if f"{unit}_per_s" in row:
            parts.append(f"{row[f'{unit}_per_s']:.0f} {unit}/s")
    if "mfu" in row:
        parts.append(f"MFU {row['mfu']:.1%}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)


def _epoch(trainer):
    return f"epoch {trainer.state.epoch + 1}/{trainer.cfg.epochs}"


def _batches_left(trainer):
    """Training batches left in this run: to the last epoch's end, or to train.max_steps."""
    state, cfg = trainer.state, trainer.cfg
    left = (cfg.epochs - state.epoch) * trainer.epoch_batches - state.batch
    if cfg.max_steps:
        left = min(left, (trainer.total_steps - state.step) * cfg.grad_accum)
    return max(left, 0)


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
