import json
import subprocess
import sys

import pytest
import yaml

from danlu.cli import main

from conftest import make_reviews, tiny_config, write_csv


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    data = write_csv(tmp / "reviews.csv", make_reviews(300))
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(data, tmp / "unused", train={"epochs": 3}), allow_unicode=True))
    assert main(["train", str(cfg), f"run.dir={tmp / 'run'}", "train.epochs=3"]) == 0
    return tmp


def test_train_prints_metrics_and_run(trained, capsys, tmp_path):
    data = write_csv(tmp_path / "r.csv", make_reviews(100, seed=3))
    assert main(["train", str(trained / "cfg.yaml"), f"data.train={data}", f"run.dir={tmp_path / 'r'}", "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "test: accuracy" in out and f"run directory: {tmp_path / 'r'}" in out


def test_evaluate_predict_info(trained, capsys, tmp_path):
    other = write_csv(tmp_path / "other.csv", make_reviews(50, seed=7))
    assert main(["evaluate", str(trained / "run"), "--data", other]) == 0
    assert "other.csv: accuracy" in capsys.readouterr().out
    saved = json.loads((trained / "run" / "eval" / "other" / "metrics.json").read_text())
    assert saved["count"] == 50 and saved["accuracy"] > 0.8

    assert main(["predict", str(trained / "run"), "很好推荐喜欢", "垃圾退货失望"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("正面\t") and lines[1].startswith("负面\t")

    inbox = tmp_path / "inbox.jsonl"
    inbox.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t, _ in make_reviews(5)), encoding="utf-8")
    assert main(["predict", str(trained / "run"), "--file", str(inbox), "--out", str(tmp_path / "scored.jsonl")]) == 0
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 5 and all(set(r["probabilities"]) == {"正面", "负面"} for r in scored)

    assert main(["info", str(trained / "run")]) == 0
    out = capsys.readouterr().out
    assert "lstm" in out and "parameters" in out and "labels:     正面, 负面" in out


@pytest.mark.parametrize(
    "content, args, words",
    [
        ("text,label\n好,正面\n,负面\n", [], ["bad.csv, line 3", "empty text"]),
        ("review,label\n好,正面\n", [], ["bad.csv, line 1", "no column 'text'", "review"]),
        (None, ["train.epoch=3"], ["unknown key 'epoch'", "did you mean 'epochs'"]),
        (None, ["model.kind=gru"], ["model.kind", "'gru'", "lstm"]),
        (None, ["data.train=/nonexistent.csv"], ["/nonexistent.csv: file not found"]),
    ],
)
def test_bad_input_is_one_clear_paragraph(trained, tmp_path, content, args, words):
    extra = list(args)
    if content is not None:
        (tmp_path / "bad.csv").write_text(content, encoding="utf-8")
        extra.append(f"data.train={tmp_path / 'bad.csv'}")
    proc = subprocess.run([sys.executable, "-m", "danlu", "train", str(trained / "cfg.yaml"), f"run.dir={tmp_path / 'r'}"] + extra,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    for w in words:
        assert w in proc.stderr


def test_cli_errors_for_runs(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("model:\n  kind: lstm\n")
    assert main(["predict", str(tmp_path / "half"), "x"]) == 2
    assert "not a finished run" in capsys.readouterr().err


def test_help_for_every_verb():
    from danlu.cli import VERBS

    for verb in VERBS:
        proc = subprocess.run([sys.executable, "-m", "danlu", verb, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: danlu" in proc.stdout
