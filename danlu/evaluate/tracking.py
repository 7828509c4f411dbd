"""Experiment trackers, chosen by `train.log: [tensorboard]`: LOGGERS maps a name to a class built from the
run directory.

A logger is a training callback (danlu.training.callbacks.Callback) run on rank 0; it uses three events:
`on_train_begin(trainer)`, `on_epoch_end(trainer, row)` (row: one History row) and `on_train_end(trainer)`.

    danlu train configs/textcnn_zh_sentiment.yaml "train.log=[tensorboard]"
    tensorboard --logdir runs/textcnn_zh_sentiment/tensorboard
"""
from __future__ import annotations

import os

from danlu.registry import ConfigError
from danlu.training.callbacks import Callback

SKIP = ("epoch", "step")


class TensorBoardLogger(Callback):
    """One scalar per History column (loss/train, accuracy/val, lr, samples_per_s, ...) against the epoch,
    written with torch.utils.tensorboard to `<run dir>/tensorboard/`."""

    def __init__(self, run_dir):
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it, and says so less clearly)
        except ImportError:
            raise ConfigError("train.log: tensorboard needs the tensorboard package; install it with: "
                              "pip install tensorboard  (or pip install 'danlu[tensorboard]')") from None
        self.log_dir = os.path.join(run_dir, "tensorboard")
        self.writer = None

    def on_train_begin(self, trainer):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(self.log_dir)

    def on_epoch_end(self, trainer, row):
        for key, value in row.items():
            if key not in SKIP and isinstance(value, (int, float)):
                self.writer.add_scalar(tag(key), value, row["epoch"])
        self.writer.flush()

    def on_train_end(self, trainer):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def tag(key):
    """train_loss -> loss/train, val_accuracy -> accuracy/val: TensorBoard groups a metric's splits together."""
    split, _, metric = key.partition("_")
    return f"{metric}/{split}" if split in ("train", "val") and metric else key


LOGGERS = {"tensorboard": TensorBoardLogger}
