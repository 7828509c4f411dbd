import json
import re
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import danlu
from danlu.files import load_tensors
from danlu.registry import ConfigError
from danlu.training.optim import lr_factor

from conftest import make_reviews, tiny_config, write_csv


def test_train_writes_the_run_directory(tmp_path, reviews_csv):
    run = danlu.train(tiny_config(reviews_csv, tmp_path / "run", train={"epochs": 4}))
    files = set(os.listdir(run.path))
    assert {"config.yaml", "tokenizer.json", "labels.json", "model.safetensors", "metrics.json", "history.jsonl"} <= files
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.9  # the synthetic reviews are easy
    assert set(metrics["test"]) >= {"accuracy", "loss", "per_class", "confusion_matrix"}
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(r["samples_per_s"] > 0 and "val_accuracy" in r for r in history)
    again = danlu.load(run.path)
    texts = ["很好推荐喜欢", "垃圾退货失望"]
    assert [p["label"] for p in again.predict(texts)] == ["正面", "负面"]
    assert torch.allclose(again.predict_proba(texts), run.predict_proba(texts))


def test_existing_run_is_never_overwritten(tmp_path, reviews_csv):
    cfg = tiny_config(reviews_csv, tmp_path / "run", train={"epochs": 1})
    danlu.train(cfg)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already exists.*--overwrite"):
        danlu.train(cfg)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    danlu.train(cfg, overwrite=True)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "adamw"])
def test_optimizers_learn(tmp_path, reviews_csv, optimizer):
    lr = {"sgd": 0.5, "momentum": 0.1}.get(optimizer, 0.01)
    run = danlu.train(tiny_config(reviews_csv, tmp_path / "run", model={"kind": "mlp", "embed_dim": 16, "hidden_dim": 16},
                                  train={"epochs": 5, "optimizer": optimizer, "lr": lr}))
    assert run.metrics["test"]["accuracy"] > 0.8


def test_regression_task(tmp_path):
    rows = [(t, str(1.0 if label == "正面" else -1.0)) for t, label in make_reviews(300)]
    path = write_csv(tmp_path / "scores.csv", rows)
    run = danlu.train(tiny_config(path, tmp_path / "run", task="regression", train={"epochs": 4}))
    assert {"mse", "mae", "r2"} <= set(run.metrics["test"]) and run.metrics["test"]["r2"] > 0.5
    assert "value" in danlu.load(run.path).predict(["很好"])[0]


def test_regression_learns_targets_far_from_zero(tmp_path, capsys):
    """Prices around 10,000 +- 2,000: trained on the raw numbers, the model's outputs (near 0 at the start) crawled
    toward them and R2 stayed far below 0. The target is learned standardised, and the saved model (loaded
    back, served, exported) predicts in the data's units."""
    rows = [(t, str(10000.0 + (2000.0 if label == "正面" else -2000.0))) for t, label in make_reviews(300)]
    path = write_csv(tmp_path / "prices.csv", rows)
    run = danlu.train(tiny_config(path, tmp_path / "run", task="regression", train={"epochs": 4}))
    assert re.search(r"targets: mean 1\.00\de\+04, standard deviation 199\d|targets: mean 1\.00\de\+04, standard deviation 2000",
                     capsys.readouterr().err)
    assert run.metrics["test"]["r2"] > 0.5 and run.metrics["test"]["mae"] < 1500
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] > 1000  # the MSE in the data's units, as val_loss is
    good, bad = (p["value"] for p in danlu.load(run.path).predict(["很好喜欢推荐", "很差失望退货"]))
    assert 9000 < good < 13000 and 7000 < bad < 11000 and good > bad
    assert [p["value"] for p in run.predict(["很好"])] == pytest.approx([p["value"] for p in danlu.load(run.path).predict(["很好"])], rel=1e-5)


def test_schedules():
    assert lr_factor("constant", 5, 0, 100) == 1.0
    assert lr_factor("warmup", 0, 10, 100) == pytest.approx(0.1)
    assert lr_factor("linear", 55, 10, 100) == pytest.approx(0.5)
    assert lr_factor("cosine", 100, 0, 100) == pytest.approx(0.0)
    assert lr_factor("cosine", 50, 0, 100) == pytest.approx(0.5)


def test_early_stopping_and_accumulation(tmp_path, reviews_csv):
    run = danlu.train(tiny_config(reviews_csv, tmp_path / "run", train={
        "epochs": 30, "grad_accum": 2, "grad_clip": 1.0, "schedule": "cosine", "warmup_steps": 3,
        "early_stopping": {"patience": 2, "metric": "val_accuracy"}}))
    assert run.metrics["epochs_run"] < 30
    assert run.metrics["best_epoch"] == run.metrics["epochs_run"] - 2


def _checkpoint_state(path):
    try:
        return load_tensors(path)[1]["state"]
    except Exception:  # not written yet
        return None


def test_resume_after_sigkill_gives_the_same_weights(tmp_path):
    data = write_csv(tmp_path / "train.csv", make_reviews(1500))
    cfg = tiny_config(data, tmp_path / "killed", model={"kind": "lstm", "embed_dim": 32, "hidden_dim": 32, "dropout": 0.3},
                      train={"epochs": 3, "batch_size": 8, "checkpoint_every": 10})
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    cfg["run"]["dir"] = str(tmp_path / "straight")
    (tmp_path / "straight.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "danlu", "train"]
    proc = subprocess.Popen(cmd + [str(tmp_path / "killed.yaml")], env=env, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoints" / "last.safetensors"
    deadline = time.time() + 120
    while time.time() < deadline:
        state = _checkpoint_state(ckpt) if ckpt.exists() else None
        if state and state["epoch"] >= 1 and state["batch"] > 0:  # mid-way through the second epoch
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model.safetensors").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(cmd + [str(tmp_path / "killed"), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    straight = subprocess.run(cmd + [str(tmp_path / "straight.yaml")], env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    a, _ = load_tensors(tmp_path / "killed" / "model.safetensors")
    b, _ = load_tensors(tmp_path / "straight" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    hist = lambda p: [{k: v for k, v in json.loads(line).items() if k not in ("samples_per_s", "seconds")}  # noqa: E731
                      for line in (tmp_path / p / "history.jsonl").read_text().splitlines()]
    assert hist("killed") == hist("straight")


def test_restore_best_without_a_run_directory(reviews_csv):
    from danlu.config import DataConfig, TokenizerConfig, TrainConfig
    from danlu.data import build_data
    from danlu.models.lstm import LSTMClassifier, LSTMConfig
    from danlu.training.tasks import ClassificationTask
    from danlu.training.trainer import Trainer

    data = build_data(DataConfig(train=reviews_csv, tokenizer=TokenizerConfig(vocab_size=200, max_length=32)))
    torch.manual_seed(0)
    model = LSTMClassifier(LSTMConfig(embed_dim=16, hidden_dim=16), data.spec)
    trainer = Trainer(model, ClassificationTask(data.labels), TrainConfig(epochs=4, batch_size=16, lr=0.05))
    history = trainer.fit(data.train, data.val)
    best = min(range(len(history)), key=lambda i: history[i]["val_loss"])
    assert trainer.best_epoch == best + 1
    assert trainer.evaluate(data.val)["loss"] == pytest.approx(history[best]["val_loss"], rel=1e-5)
