"""The benchmark harness and the seed_lstm benchmark, on small subsets (speed is measured, never asserted)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ROW_KEYS = {"tool", "examples", "epochs", "timed_epochs", "seconds_per_epoch", "samples_per_s", "test_accuracy"}


def load_harness():
    spec = importlib.util.spec_from_file_location("benchmarks.run", BENCHMARKS / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_seed_lstm(tmp_path, capsys, *options):
    harness = load_harness()
    threads = torch.get_num_threads()
    try:  # one thread: much faster than two when other work shares the two cores
        code = harness.main(["--only", "seed_lstm", "--quick", "--device", "cpu", "--threads", "1",
                             "--results", str(tmp_path), *options])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "seed_lstm.json").read_text(encoding="utf-8"))
    assert (tmp_path / "seed_lstm.md").read_text(encoding="utf-8").strip() in printed
    return saved["rows"], printed


def test_seed_lstm_quick_danlu_side(tmp_path, capsys):
    rows, printed = run_seed_lstm(tmp_path, capsys, "--tools", "danlu")
    assert len(rows) == 1
    row = rows[0]
    assert set(row) == ROW_KEYS
    assert row["tool"].startswith("danlu") and row["examples"] == 2000 and row["epochs"] == 1
    assert row["timed_epochs"].startswith("1")
    assert row["samples_per_s"] > 0 and row["seconds_per_epoch"] > 0
    assert 0.0 <= row["test_accuracy"] <= 1.0
    assert "| tool | examples | epochs | timed_epochs |" in printed


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside keras, with numpy 2
def test_seed_lstm_keras_side(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "torch")  # keras picks its backend at first import
    pytest.importorskip("keras")
    rows, _ = run_seed_lstm(tmp_path, capsys, "--limit", "200", "--epochs", "2")
    assert [r["tool"].split()[0] for r in rows] == ["Keras", "danlu", "danlu"]
    assert [r["epochs"] for r in rows] == [1, 1, 2]
    assert rows[2]["timed_epochs"] == "2"
    for row in rows:
        assert set(row) == ROW_KEYS | {"vs_keras"}
        assert row["samples_per_s"] > 0 and row["vs_keras"] > 0
        assert 0.0 <= row["test_accuracy"] <= 1.0
    assert rows[0]["vs_keras"] == 1.0


def test_keras_guide_model_is_the_guides(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    pytest.importorskip("keras")
    spec = importlib.util.spec_from_file_location("benchmarks.seed_lstm", BENCHMARKS / "seed_lstm.py")
    seed_lstm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed_lstm)
    model = seed_lstm.keras_guide_model(vocab_size=50, num_classes=3)
    embedding, lstm, dense = model.layers
    assert (embedding.input_dim, embedding.output_dim, embedding.mask_zero) == (50, 128, False)
    assert lstm.units == 128 and not lstm.return_sequences
    assert dense.units == 3 and dense.activation.__name__ == "softmax"
    assert model.loss == "sparse_categorical_crossentropy"
