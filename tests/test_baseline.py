"""Baselines beside every classifier and regressor (danlu.evaluate.baseline): metrics.json, the report, the
summary printed by `danlu train`, `danlu evaluate` and `danlu compare`."""
import json
import os
import random
import sys

import pytest
from conftest import make_reviews, tiny_config, write_csv

import danlu
from danlu.cli import main
from danlu.data import read_splits
from danlu.evaluate.baseline import run_baselines, text_baselines


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _cheap(cfg):
    cfg["model"] = {"kind": "mlp", "embed_dim": 16, "hidden_dim": 16}
    cfg["train"]["epochs"] = 1
    return cfg


def test_every_classification_report_shows_the_baseline_and_the_difference(tmp_path, one_thread):
    rows = make_reviews(300)
    run = danlu.train(_cheap(tiny_config(write_csv(tmp_path / "r.csv", rows), tmp_path / "run")))
    base = run.metrics["baselines"]
    # a keyword decides each label: the n-gram model gets the whole test split right
    assert base["linear"]["accuracy"] == 1.0 and base["linear"]["count"] == run.metrics["test"]["count"]
    assert "character 1-3-grams" in base["linear"]["name"]
    # the majority line: the most frequent training class, scored on the test split's own labels
    splits = read_splits(run.cfg.data, run.cfg.run.seed)
    test_labels, train_labels = splits["test"].labels, splits["train"].labels
    # the most frequent training class; on a tie the first in the run's label order
    majority = max(run.labels, key=lambda label: (train_labels.count(label), -list(run.labels).index(label)))
    assert base["majority"]["accuracy"] == pytest.approx(test_labels.count(majority) / len(test_labels))
    assert base["model_minus_baseline"]["accuracy"] == pytest.approx(run.metrics["test"]["accuracy"] - 1.0)
    on_disk = json.loads(_read(os.path.join(run.path, "metrics.json")))
    assert on_disk["baselines"]["linear"]["accuracy"] == 1.0
    for name in ("report.md", "report.html"):
        report = _read(os.path.join(run.path, name))
        assert "Baseline" in report and "model − linear baseline" in report and "logistic regression" in report
    md = _read(os.path.join(run.path, "report.md"))
    row = next(line for line in md.splitlines() if line.startswith("| model − linear baseline"))
    assert f"{run.metrics['test']['accuracy'] - 1.0:+.4f}" in row


def test_regression_baselines_ridge_and_the_mean(tmp_path, one_thread):
    rng = random.Random(0)
    rows = []
    for _ in range(200):  # the target follows the number of "good" words (sublinear tf: 1 + log k, not k)
        k = rng.randint(0, 4)
        words = ["good"] * k + rng.choices(["room", "food", "staff", "view"], k=rng.randint(1, 4))
        rng.shuffle(words)
        rows.append((" ".join(words), 2.0 * k + 1.0))
    path = write_csv(tmp_path / "reg.csv", rows)
    run = danlu.train(_cheap(tiny_config(path, tmp_path / "run", task="regression")))
    base = run.metrics["baselines"]
    assert base["linear"]["r2"] > 0.7 and "ridge" in base["linear"]["name"]
    assert base["mean"]["r2"] <= 0.05  # a constant explains none of the test variance
    assert base["model_minus_baseline"]["r2"] == pytest.approx(run.metrics["test"]["r2"] - base["linear"]["r2"])
    assert "| mean: the training mean" in _read(os.path.join(run.path, "report.md"))


def test_the_config_key_turns_it_off(tmp_path, one_thread):
    cfg = _cheap(tiny_config(write_csv(tmp_path / "r.csv", make_reviews(100)), tmp_path / "run"))
    cfg["train"]["baseline"] = False
    run = danlu.train(cfg)
    assert "baselines" not in run.metrics
    assert "## Baseline" not in _read(os.path.join(run.path, "report.md"))


def test_cli_train_evaluate_and_compare_show_it(tmp_path, capsys, one_thread):
    data = write_csv(tmp_path / "r.csv", make_reviews(200))
    overrides = ["model.kind=mlp", "model.embed_dim=16", "model.hidden_dim=16", "train.epochs=1",
                 "data.tokenizer.max_length=32"]
    run_dir = str(tmp_path / "run")
    assert main(["train", "configs/seed_mlp.yaml", f"data.train={data}", f"run.dir={run_dir}", *overrides]) in (0, None)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("baseline:"))
    assert "accuracy 1.0000" in line and "majority class" in line and "vs the baseline" in line

    other = write_csv(tmp_path / "other.csv", make_reviews(50, seed=7))
    assert main(["evaluate", run_dir, "--data", other]) in (0, None)
    assert "baseline: accuracy" in capsys.readouterr().out
    out_dir = os.path.join(run_dir, "eval", "other")
    metrics = json.loads(_read(os.path.join(out_dir, "metrics.json")))
    assert metrics["baselines"]["linear"]["count"] == 50 == metrics["count"]  # fitted again, scored on the file
    assert "model − linear baseline" in _read(os.path.join(out_dir, "report.md"))

    assert main(["compare", run_dir, "--out", str(tmp_path / "c.png")]) in (0, None)
    table = capsys.readouterr().out.splitlines()
    assert "baseline acc" in table[0] and "vs baseline" in table[0]
    assert "1.0000" in table[2] and f"{metrics_of(run_dir)['baselines']['model_minus_baseline']['accuracy']:+.4f}" in table[2]

    os.remove(data)  # the training data is gone: evaluate says there is no baseline, and why
    assert main(["evaluate", run_dir, "--data", other]) in (0, None)
    assert "baseline: none (the run's training data could not be read again" in capsys.readouterr().out
    assert "No baseline:" in _read(os.path.join(out_dir, "report.md"))


def metrics_of(run_dir):
    return json.loads(_read(os.path.join(run_dir, "metrics.json")))


def test_features_follow_the_script():
    from danlu.data.sources import Examples

    en = Examples(["great value", "awful, broke", "works great", "awful smell"], ["p", "n", "p", "n"], ["x"] * 4)
    base = text_baselines(en, en, "classification", ("n", "p"))
    assert base["linear"]["name"].startswith("TF-IDF word 1-2-grams + character 2-5-grams")
    assert base["linear"]["accuracy"] == 1.0 and base["majority"]["accuracy"] == 0.5
    zh = Examples(["很好", "很差", "满意", "失望"], ["p", "n", "p", "n"], ["x"] * 4)
    assert text_baselines(zh, zh, "classification", ("n", "p"))["linear"]["name"].startswith("TF-IDF character 1-3")


def test_without_scikit_learn_the_run_says_so(monkeypatch):
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing any of it raises ImportError
    from danlu.data.sources import Examples

    ex = Examples(["很好", "很差"], ["p", "n"], ["x"] * 2)
    result = run_baselines(lambda: text_baselines(ex, ex, "classification", ("n", "p")), {"accuracy": 1.0, "macro": {"f1": 1.0}})
    assert result == {"skipped": "scikit-learn is not installed (pip install scikit-learn)"}
