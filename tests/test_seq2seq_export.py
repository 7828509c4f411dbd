"""danlu export of a seq2seq run: encoder.onnx and a KV-cached decoder.onnx whose greedy decoding in onnxruntime
gives danlu's greedy tokens, and a folder that translates on its own."""
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from test_seq2seq import train_copy_run

from danlu.cli import main
from danlu.serve.export import TOLERANCE
from danlu.serve.seq2seq_export import OnnxSeq2Seq

TEXTS = ["red cat", "two big dogs", "", "blue bird small one green dog red red"]


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory):
    """A tiny run with a tokenizer per side (the export copies both) and grouped key/value heads."""
    return train_copy_run(tmp_path_factory.mktemp("s2s_export"), pairs=200, epochs=2,
                          model={"kind": "seq2seq", "embed_dim": 32, "num_heads": 4, "num_kv_heads": 2, "num_layers": 2,
                                 "dropout": 0.0},
                          seq2seq={"beam_size": 1, "max_new_tokens": 24})


@pytest.fixture(scope="module")
def exported(seq2seq_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2s_onnx") / "onnx"
    assert main(["export", seq2seq_run.path, "--format", "onnx", "--out", str(out)]) == 0
    return out


def test_cli_exports_encoder_and_cached_decoder(seq2seq_run, exported, tmp_path, capsys):
    report = json.loads((exported / "export.json").read_text())
    assert report["kind"] == "seq2seq" and report["decoder"]["kv_cache"]
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] <= TOLERANCE
    assert report["parity"]["greedy_same_tokens"] == 1.0 and report["parity"]["greedy_sources"] == 8
    assert [r["batch"] for r in report["latency"]] == [1, 16]
    assert all(r["torch_ms"] > 0 and r["onnxruntime_ms"] > 0 for r in report["latency"])
    from danlu.serve.export import format_report

    printed = format_report(report)
    assert "encoder.onnx and decoder.onnx" in printed and "passed" in printed and "| batch | source length |" in printed

    alone = tmp_path / "alone"
    shutil.copytree(exported, alone)  # far from the run directory
    assert {"encoder.onnx", "decoder.onnx", "tokenizer.json", "tokenizer_target.json", "config.yaml"} <= set(os.listdir(alone))
    model = OnnxSeq2Seq(alone)
    want = [r["text"] for r in seq2seq_run.predict(TEXTS, beam_size=1)]
    assert model.translate(TEXTS) == want
    assert len(set(want)) > 1  # real, source-dependent outputs


def test_decoder_steps_match_the_full_forward_at_every_length(seq2seq_run, exported):
    """The cached ONNX step, fed a prefix one token at a time from an empty past, gives the logits of the model's
    full forward at every position, with padded sources."""
    alone = OnnxSeq2Seq(exported)
    ids, mask = alone.encode(TEXTS)
    prefix = torch.randint(7, seq2seq_run.target.vocab_size_, (len(TEXTS), 9), generator=torch.Generator().manual_seed(0))
    prefix[:, 0] = alone.bos_id
    with torch.inference_mode():
        want = seq2seq_run.model(torch.from_numpy(ids), torch.from_numpy(mask).bool(), prefix)  # (B, T, V)
    for t, logits in enumerate(alone.step_logits(ids, mask, prefix.numpy())):
        torch.testing.assert_close(torch.from_numpy(logits), want[:, t], rtol=0, atol=TOLERANCE)
