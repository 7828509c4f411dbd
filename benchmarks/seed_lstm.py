"""The guide's §5.2 program — Embedding -> LSTM(128) -> Dense softmax, Adam, sparse categorical
cross-entropy, batch 32 — in Keras 3 (torch backend) against danlu, on the same data, in one process.

Both read the built-in zh_sentiment split through danlu (`configs/seed_lstm.yaml`): the same
integer id sequences, which Keras gets padded to 128 with `pad_sequences` as the guide does, and
danlu gets length-bucketed and packed. The two trainings alternate epoch by epoch (Keras epoch 1,
danlu epoch 1, Keras epoch 2, ...), so load from elsewhere on the machine falls on both.

samples/s counts training only (no validation), over the epochs after the first (warm-up); with
one epoch, that epoch is timed. Keras runs `--keras-epochs` (default 2; ~10x slower), danlu runs
`--epochs` (default 10); test accuracy is compared after the same number of epochs (the Keras one)
and also given for danlu's full run.

    python benchmarks/run.py --only seed_lstm
    python benchmarks/seed_lstm.py --quick          # 2,000 training examples, 1 epoch each
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

NAME = "seed_lstm"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "seed_lstm.yaml"
MAXLEN = 128  # the guide's pad_sequences(..., maxlen=128); also the tokenizer's max_length in CONFIG
QUICK_LIMIT = 2000


def add_arguments(parser):
    group = parser.add_argument_group(NAME)
    group.add_argument("--epochs", type=int, help="danlu epochs (default 10; 1 with --quick)")
    group.add_argument("--keras-epochs", type=int, help="Keras epochs, and the epochs at which test accuracy "
                       "is compared (default 2; 1 with --quick)")
    group.add_argument("--limit", type=int, help=f"use the first N examples of each split (default all; "
                       f"{QUICK_LIMIT} with --quick)")
    group.add_argument("--tools", default="danlu,keras", help="comma-separated: danlu, keras (default both)")


def import_keras(device=None):
    """Keras 3 on the torch backend, placed on `device`; both must be chosen before the first import."""
    os.environ["KERAS_BACKEND"] = "torch"
    if device:
        os.environ.setdefault("KERAS_TORCH_DEVICE", device)
    import keras

    if keras.backend.backend() != "torch":
        raise RuntimeError(f"keras was imported with the {keras.backend.backend()} backend before this benchmark "
                           "could choose torch; run it in a fresh process")
    return keras


def keras_guide_model(vocab_size, num_classes):
    """The guide's model, as the guide writes it."""
    keras = import_keras()
    from keras import layers

    model = keras.Sequential([
        layers.Embedding(vocab_size, 128),
        layers.LSTM(128),
        layers.Dense(num_classes, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class DanluSide:
    """danlu's Trainer, continued epoch by epoch through its exact resume from a scratch run directory."""

    def __init__(self, cfg, data, run_dir):
        import danlu
        from danlu.models import build_model
        from danlu.jobs.skeleton import seed_everything
        from danlu.training.tasks import ClassificationTask
        from danlu.training.trainer import Trainer

        seed_everything(cfg.run.seed)
        model = build_model(cfg.model, data.spec)
        # restore_best off: like Keras, evaluate the weights of the last epoch
        self.trainer = Trainer(model, ClassificationTask(data.labels), cfg.train, run_dir=run_dir, seed=cfg.run.seed,
                               restore_best=False)
        self.data = data
        self.tool = "danlu " + danlu.__version__

    def train_to(self, epoch):
        self.trainer.fit(self.data.train, self.data.val, epochs=epoch, resume=True)

    @property
    def seconds(self):
        return self.trainer.history.series("seconds")

    def test_accuracy(self):
        return self.trainer.evaluate(self.data.test)["accuracy"]


class KerasSide:
    def __init__(self, data, device, seed):
        keras = import_keras(device)
        keras.utils.set_random_seed(seed)

        def pad(split):
            return keras.utils.pad_sequences(split.ids, maxlen=MAXLEN)  # (N, 128) int32, zeros in front

        self.x, self.y = pad(data.train), data.train.targets
        self.val = (pad(data.val), data.val.targets)
        self.test = (pad(data.test), data.test.targets)
        self.model = keras_guide_model(data.spec.vocab_size, data.spec.num_classes)
        self.timer = _epoch_timer(keras, device)
        self.tool = f"Keras {keras.__version__} (torch backend)"

    def train_to(self, epoch):
        self.model.fit(self.x, self.y, epochs=epoch, initial_epoch=len(self.seconds), batch_size=32,
                       validation_data=self.val, callbacks=[self.timer], verbose=0)

    @property
    def seconds(self):
        return self.timer.seconds

    def test_accuracy(self):
        return self.model.evaluate(*self.test, batch_size=32, verbose=0)[1]


def _epoch_timer(keras, device):
    """Seconds of each epoch's training loop: from epoch begin to the start of validation."""

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds, self.start = [], None

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_test_begin(self, logs=None):
            if self.start is not None:
                if device == "cuda":
                    import torch

                    torch.cuda.synchronize()
                self.seconds.append(time.perf_counter() - self.start)
                self.start = None

    return EpochTimer()


def run(args):
    import torch

    from danlu.config import load
    from danlu.data import build_data

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":  # what danlu's Trainer sets on CPU; process-wide, so Keras runs with it too
        from danlu.training.allocator import keep_freed_memory

        keep_freed_memory()
    epochs = args.epochs or (1 if args.quick else 10)
    compare_at = args.keras_epochs or (1 if args.quick else 2)
    limit = args.limit if args.limit is not None else (QUICK_LIMIT if args.quick else 0)
    tools = {t.strip() for t in args.tools.split(",")}
    if not tools or tools - {"danlu", "keras"}:
        raise SystemExit(f"--tools: expected danlu, keras or both, got {args.tools!r}")

    cfg = load(CONFIG, [f"data.limit={limit}", f"train.device={device}"])
    data = build_data(cfg.data, task=cfg.task, seed=cfg.run.seed)
    n = len(data.train)
    with tempfile.TemporaryDirectory(prefix="danlu-bench-") as run_dir:
        danlu_side = DanluSide(cfg, data, run_dir) if "danlu" in tools else None
        keras_side = KerasSide(data, device, cfg.run.seed) if "keras" in tools else None
        sides = [side for side in (keras_side, danlu_side) if side]  # Keras first: the baseline row
        for epoch in range(1, compare_at + 1):  # alternate: each side trains one more epoch in turn
            for side in sides:
                side.train_to(epoch)
        rows = [_row(side, n, compare_at) for side in sides]
        if danlu_side and epochs > compare_at:
            danlu_side.train_to(epochs)
            rows.append(_row(danlu_side, n, epochs))
    if keras_side:
        for row in rows:
            row["vs_keras"] = row["samples_per_s"] / rows[0]["samples_per_s"]
    return rows


def _row(side, n, epochs):
    seconds = side.seconds[:epochs]
    if epochs > 1:  # leave out the warm-up epoch
        timed, which = seconds[1:], f"2-{epochs}" if epochs > 2 else "2"
    else:
        timed, which = seconds, "1 (the warm-up one)"
    return {
        "tool": side.tool,
        "examples": n,
        "epochs": epochs,
        "timed_epochs": which,
        "seconds_per_epoch": sum(timed) / len(timed),
        "samples_per_s": n * len(timed) / sum(timed),
        "test_accuracy": side.test_accuracy(),
    }


if __name__ == "__main__":  # the same as: python benchmarks/run.py --only NAME [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run as harness

    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
