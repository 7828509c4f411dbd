"""danlu export --format onnx: the graph matches PyTorch in onnxruntime (max |diff| <= 1e-4, fp32), and the
exported folder works on its own (tokenizer.json, labels.json, config beside model.onnx)."""
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from danlu.cli import main
from danlu.registry import ConfigError
from danlu.serve.export import TOLERANCE, OnnxModel, export
from danlu.testing import classifier_run, language_model_run

torch.set_num_threads(1)
TEXTS = ["质量很好，推荐", "太差了，再也不买", "", "good 物流 bad bad bad awful 质量 价格 包装 客服 这个 东西 房间 很好"]


def assert_standalone_classifier(folder, run, tmp_path):
    alone = tmp_path / "alone"
    shutil.copytree(folder, alone)  # a copy far from the run directory
    assert {"model.onnx", "tokenizer.json", "labels.json", "config.yaml", "export.json"} <= set(os.listdir(alone))
    got, want = OnnxModel(alone).predict(TEXTS), run.predict(TEXTS)
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want):
        assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)


def test_cli_exports_a_classifier(tmp_path, capsys):
    run = classifier_run(str(tmp_path / "mlp"), kind="mlp")
    out = tmp_path / "onnx"
    torch.set_num_threads(2)
    try:
        assert main(["export", run.path, "--format", "onnx", "--out", str(out)]) == 0
        assert torch.get_num_threads() == 2  # measured with 1 thread (the default), then put back
    finally:
        torch.set_num_threads(1)
    printed = capsys.readouterr().out
    assert "parity: max |onnxruntime - pytorch|" in printed and "passed" in printed
    assert "1 CPU thread for both (--threads)" in printed
    assert "| batch | length | PyTorch ms | ONNX Runtime ms | speed-up |" in printed
    report = json.loads((out / "export.json").read_text())
    assert report["threads"] == 1
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] <= TOLERANCE
    assert report["fixed_length"] is None and report["inputs"] == ["input_ids", "attention_mask"]
    assert [r["batch"] for r in report["latency"]] == [1, 16]
    assert all(r["torch_ms"] > 0 and r["onnxruntime_ms"] > 0 for r in report["latency"])
    assert_standalone_classifier(out, run, tmp_path)


def test_lstm_classifier_matches_packed_pytorch(tmp_path):
    run = classifier_run(str(tmp_path / "lstm"), kind="lstm")  # the seed model: packed sequences in PyTorch
    report = export(run, out=tmp_path / "onnx", repeats=3)
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] <= TOLERANCE
    assert report["fixed_length"] is None  # one layer, one direction: the length stays dynamic
    assert_standalone_classifier(tmp_path / "onnx", run, tmp_path)


def test_language_model_decoder_matches_and_generates_alone(tmp_path):
    from danlu.generation import generate

    run = language_model_run(str(tmp_path / "lm"))
    report = export(run.path, out=tmp_path / "onnx", repeats=3)
    assert report["kind"] == "language_model" and report["outputs"] == ["logits"]
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] <= TOLERANCE
    alone = OnnxModel(tmp_path / "onnx")
    expected = generate(run.model, run.tokenizer, ["你好"], max_new_tokens=12, temperature=0)[0]
    assert alone.generate("你好", max_new_tokens=12) == expected and expected


@pytest.mark.slow
@pytest.mark.parametrize("kind, model", [("transformer", {"num_heads": 2, "num_layers": 1}),
                                         ("lstm", {"num_layers": 2, "bidirectional": True})])
def test_other_classifiers(tmp_path, kind, model):
    run = classifier_run(str(tmp_path / kind), kind=kind, **model)
    report = export(run, out=tmp_path / "onnx", repeats=3)
    assert report["parity"]["passed"]
    assert_standalone_classifier(tmp_path / "onnx", run, tmp_path)


def test_unknown_format_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="onnx"):
        export(str(tmp_path), format="tflite")


def test_export_threads_are_explicit_and_checked(tmp_path):
    run = classifier_run(str(tmp_path / "mlp"), kind="mlp")
    report = export(run, out=tmp_path / "onnx", repeats=2, threads=2)
    assert report["threads"] == 2 and torch.get_num_threads() == 1
    with pytest.raises(ConfigError, match="--threads: expected a whole number of at least 1, got 0"):
        export(run, out=tmp_path / "onnx0", threads=0)
