"""The guide's CNN — Conv2D(32, 3x3, ReLU) -> MaxPooling2D(2) -> Flatten -> Dense(128, ReLU) -> Dense softmax,
Adam (lr 1e-3), sparse categorical cross-entropy, batch 32 — in Keras 3 (torch backend), in danlu
(`model.kind: cnn, size: guide`) and in a plain PyTorch loop, on the same data, in one process.

The data is the built-in digits split (scikit-learn's 8x8 digits, 1,437 training images), read and
normalised once by danlu (`configs/cnn_digits.yaml`'s data section): Keras and the plain loop get the
very same float arrays (Keras channels-last, as its Conv2D expects). The three trainings alternate epoch
by epoch, so load from elsewhere on the machine falls on all of them.

samples/s counts training only (no validation), over the epochs after the first (warm-up); test
accuracy is of the last epoch's weights (danlu's restore_best is off, as Keras keeps the last weights).

    python benchmarks/run.py --only cnn --threads 1
    python benchmarks/cnn.py --quick                 # 2 epochs
"""
from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from pathlib import Path

NAME = "cnn"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cnn_digits.yaml"
GUIDE = ["model.size=guide", "model.channels=[32]", "model.blocks=0", "model.norm=none", "model.pooling=flatten",
         "model.hidden_dim=128", "model.dropout=0.0"]  # the guide preset, whatever the config file sets
BATCH = 32


def add_arguments(parser):
    group = parser.add_argument_group(NAME)
    group.add_argument("--cnn-epochs", type=int, help="epochs for every tool (default 10; 2 with --quick)")
    group.add_argument("--cnn-tools", default="danlu,keras,pytorch",
                       help="comma-separated: danlu, keras, pytorch (default all three)")
    group.add_argument("--cnn-seeds", default="0",
                       help="comma-separated run seeds (default 0); with several, each tool's test accuracy is the "
                            "mean over them (each seed's in accuracy_by_seed) and samples/s counts every timed epoch")


def _seed_lstm():
    """The Keras helpers of the seed_lstm benchmark (backend choice, the epoch timer)."""
    spec = importlib.util.spec_from_file_location("benchmarks.seed_lstm", Path(__file__).with_name("seed_lstm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arrays(dataset):
    """All of a split as the model sees it after preprocessing: float (N, C, H, W) and int64 labels."""
    return dataset.preprocess(dataset.pixels).numpy(), dataset.targets


class KerasSide:
    def __init__(self, data, device, seed):
        helpers = _seed_lstm()
        keras = helpers.import_keras(device)
        from keras import layers

        keras.utils.set_random_seed(seed)

        def channels_last(split):
            x, y = arrays(split)
            return x.transpose(0, 2, 3, 1), y  # (N, H, W, C)

        (self.x, self.y), self.val, self.test = channels_last(data.train), channels_last(data.val), channels_last(data.test)
        self.model = keras.Sequential([
            keras.Input(self.x.shape[1:]),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(len(data.labels), activation="softmax"),
        ])
        self.model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                           metrics=["accuracy"])
        self.timer = helpers._epoch_timer(keras, device)
        self.tool = f"Keras {keras.__version__} (torch backend)"

    def train_to(self, epoch):
        self.model.fit(self.x, self.y, epochs=epoch, initial_epoch=len(self.seconds), batch_size=BATCH,
                       validation_data=self.val, callbacks=[self.timer], verbose=0)

    @property
    def seconds(self):
        return self.timer.seconds

    def test_accuracy(self):
        return self.model.evaluate(*self.test, batch_size=BATCH, verbose=0)[1]


class PyTorchSide:
    """The same network as an nn.Sequential, trained by the textbook loop: shuffle, slice, step."""

    def __init__(self, data, device, seed):
        import torch
        from torch import nn

        torch.manual_seed(seed)
        self.torch, self.device = torch, torch.device(device)
        (x, y), (tx, ty) = arrays(data.train), arrays(data.test)
        self.x, self.y = torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)
        self.tx, self.ty = torch.from_numpy(tx).to(self.device), torch.from_numpy(ty).to(self.device)
        C, H, W = x.shape[1:]
        self.model = nn.Sequential(nn.Conv2d(C, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                   nn.Linear(32 * (H // 2) * (W // 2), 128), nn.ReLU(),
                                   nn.Linear(128, len(data.labels))).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), 1e-3)
        self.seconds, self.tool = [], f"PyTorch {torch.__version__} (plain loop)"

    def train_to(self, epoch):
        torch = self.torch
        while len(self.seconds) < epoch:
            started = time.perf_counter()
            self.model.train()
            order = torch.randperm(len(self.x), device=self.device)
            for start in range(0, len(order), BATCH):
                index = order[start : start + BATCH]
                loss = torch.nn.functional.cross_entropy(self.model(self.x[index]), self.y[index])
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - started)

    def test_accuracy(self):
        with self.torch.no_grad():
            self.model.eval()
            return (self.model(self.tx).argmax(-1) == self.ty).float().mean().item()


def run(args):
    import torch

    from danlu.config import load
    from danlu.data.images import build_image_data

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":  # what danlu's Trainer sets on CPU; process-wide, so the others run with it too
        from danlu.training.allocator import keep_freed_memory

        keep_freed_memory()
    epochs = args.cnn_epochs or (2 if args.quick else 10)
    tools = [t.strip() for t in args.cnn_tools.split(",") if t.strip()]
    if not tools or set(tools) - {"danlu", "keras", "pytorch"}:
        raise SystemExit(f"--cnn-tools: expected danlu, keras and / or pytorch, got {args.cnn_tools!r}")
    try:
        seeds = [int(s) for s in args.cnn_seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--cnn-seeds: expected comma-separated integers, got {args.cnn_seeds!r}") from None
    order = [t for t in ("keras", "danlu", "pytorch") if t in tools]  # Keras first: the baseline row
    runs = {t: [] for t in order}  # tool -> [(seconds per epoch, test accuracy)] per seed
    for seed in seeds or [0]:
        cfg = load(CONFIG, GUIDE + [f"train.device={device}", f"train.batch_size={BATCH}", "train.optimizer=adam",
                                    "train.lr=0.001", "train.weight_decay=0", "train.schedule=constant",
                                    "train.warmup_steps=0", f"train.epochs={epochs}", f"run.seed={seed}"])
        data = build_image_data(cfg.data, cfg.run.seed)
        n = len(data.train)
        with tempfile.TemporaryDirectory(prefix="danlu-bench-") as run_dir:
            sides = [_side(t, cfg, data, device, seed, run_dir) for t in order]
            for epoch in range(1, epochs + 1):  # alternate: each side trains one more epoch in turn
                for side in sides:
                    side.train_to(epoch)
            for t, side in zip(order, sides):
                runs[t].append((side.seconds[:epochs], side.test_accuracy(), side.tool))
    rows = [_row(runs[t], n, epochs) for t in order]
    if order[0] == "keras":
        for row in rows:
            row["vs_keras"] = row["samples_per_s"] / rows[0]["samples_per_s"]
    return rows


def _side(tool, cfg, data, device, seed, run_dir):
    if tool == "keras":
        return KerasSide(data, device, seed)
    if tool == "danlu":
        return _seed_lstm().DanluSide(cfg, data, run_dir)
    return PyTorchSide(data, device, seed)


def _row(runs, n, epochs):
    """One tool's row from its runs [(seconds of each epoch, test accuracy, tool name)], one per seed."""
    which = (f"2-{epochs}" if epochs > 2 else "2") if epochs > 1 else "1 (the warm-up one)"
    timed = [s for seconds, _, _ in runs for s in (seconds[1:] if epochs > 1 else seconds)]
    accuracy = [a for _, a, _ in runs]
    row = {"tool": runs[0][2], "examples": n, "epochs": epochs, "timed_epochs": which,
           "seconds_per_epoch": sum(timed) / len(timed), "samples_per_s": n * len(timed) / sum(timed),
           "test_accuracy": sum(accuracy) / len(accuracy)}
    if len(runs) > 1:
        row["accuracy_by_seed"] = " ".join(f"{a:.4f}" for a in accuracy)
    return row


if __name__ == "__main__":  # the same as: python benchmarks/run.py --only NAME [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run as harness

    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
