"""A decoder LLM (Llama family: RoPE, RMSNorm, SwiGLU, GQA) as a classifier backbone: `danlu finetune` with
task classification on an imported checkpoint, pooled at each text's last real token after the final norm.

The base is a tiny random LlamaForCausalLM saved by transformers (the shape of SmolLM2, 2 layers), with a
character-level tokenizer.json; the packaged SmolLM2 GGUF goes through the same GPT class (test_convert.py
holds its import to transformers' logits).
"""
import json
import os

import pytest
import torch
from torch import nn

from danlu import config as config_mod
from danlu.jobs.finetune import finetune
from danlu.registry import ConfigError
from danlu.runs import load_run
from danlu.runs.import_checkpoint import import_checkpoint
from danlu.runs.load import export_merged
from danlu.testing import reviews

transformers = pytest.importorskip("transformers")

SPECIAL = ["<unk>", "<pad>", "</s>"]
TEXTS = ["很好满意推荐", "很差失望", "质量物流价格包装客服很好"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(folder of a tiny Llama checkpoint, reviews CSV): the tokenizer splits every character."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("llama")
    rows = reviews(96)
    chars = sorted({c for text, _ in rows for c in text} | set("".join(TEXTS)))
    vocab = {t: i for i, t in enumerate(SPECIAL + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                                      tie_word_embeddings=True, max_position_embeddings=64, pad_token_id=1)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    csv = folder.parent / "reviews.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows), encoding="utf-8")
    return str(folder), str(csv)


def encode(tokenizer, texts):
    return [torch.tensor(x, dtype=torch.long) for x in tokenizer.encode(texts)]


def padded(rows, pad_id, side):
    """(ids (B, T), attention_mask (B, T)) with the padding on `side`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        cut = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cut], mask[i, cut] = r, True
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_pooling_is_the_unpadded_last_state(llama, side):
    """The pooled vector of a padded row is the final-normed hidden state at the last token of the same
    text run alone, whichever side the padding is on."""
    imported = import_checkpoint(llama[0])
    model = imported.build(num_classes=2, labels=("a", "b")).eval()
    model.head = nn.Identity()  # forward now returns the pooled vector (B, C)
    rows = encode(imported.tokenizer, TEXTS)
    assert len({len(r) for r in rows}) == 3  # three lengths: every row but the longest is padded
    ids, mask = padded(rows, imported.tokenizer.pad_id, side)
    with torch.no_grad():
        pooled = model(ids, mask)  # (B, C)
        for i, r in enumerate(rows):
            alone = model(r[None], return_hidden=True)[0, -1]  # (C,) the last state, after the final norm
            assert torch.allclose(pooled[i], alone, atol=1e-5), (side, i)
    norm = model.norm.weight
    with torch.no_grad():  # the final norm is applied before pooling: scaling its weight scales the pooled vector
        norm.mul_(2.0)
        assert torch.allclose(model(ids, mask), 2 * pooled, atol=1e-5)
        norm.div_(2.0)


def test_classifier_logits_match_transformers(llama):
    """Same weights in transformers' LlamaForSequenceClassification (its score layer has no bias): the same
    logits on a right-padded batch, which it pools at the last token that is not padding."""
    imported = import_checkpoint(llama[0])
    model = imported.build(num_classes=3, labels=("a", "b", "c")).eval()
    reference = transformers.LlamaForSequenceClassification.from_pretrained(llama[0], num_labels=3).eval()
    with torch.no_grad():
        model.head.weight.copy_(reference.score.weight)
        model.head.bias.zero_()
        ids, mask = padded(encode(imported.tokenizer, TEXTS), imported.tokenizer.pad_id, "right")
        expected = reference(input_ids=ids, attention_mask=mask.long()).logits
        assert (model(ids, mask) - expected).abs().max().item() <= 1e-5


def finetune_config(base, csv, run_dir, **finetune_section):
    return {"task": "classification", "run": {"dir": str(run_dir)},
            "finetune": {"base": base, "lora_r": 4, "lora_alpha": 8, **finetune_section},
            "data": {"train": csv, "tokenizer": {"max_length": 24}},
            "train": {"epochs": 4, "batch_size": 16, "lr": 1e-2, "optimizer": "adamw", "device": "cpu", "threads": 1}}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_llama_as_classifier(llama, tmp_path, method, capsys):
    folder, csv = llama
    run = finetune(finetune_config(folder, csv, tmp_path / method, method=method,
                                   lora_targets=["*.attn.qkv", "*.attn.out"]))
    assert run.cfg.model.kind == "gpt" and run.cfg.model.norm == "rmsnorm" and run.cfg.model.positions == "rope"
    assert run.cfg.model.pooling == "last" and run.model.head.out_features == 2
    assert run.metrics["test"]["accuracy"] >= 0.8  # one keyword decides the label: the backbone learns to read it
    files = set(os.listdir(run.path))
    assert ("adapter.safetensors" in files) == (method == "lora") and ("model.safetensors" in files) == (method == "full")
    if method == "lora":  # the adapter holds the LoRA matrices and the new head, nothing of the base
        from safetensors import safe_open

        with safe_open(os.path.join(run.path, "adapter.safetensors"), "pt") as f:
            names = set(f.keys())
        assert {"head.weight", "head.bias"} <= names
        assert all(n.startswith("head.") or n.endswith((".lora_a", ".lora_b")) for n in names)
        assert run.metrics["trainable_parameters"] < 0.2 * run.metrics["parameters"]
    expected = run.predict(TEXTS)
    loaded = load_run(run.path)  # an adapter run re-imports its base and loads the adapter on top
    for a, b in zip(loaded.predict(TEXTS), expected):
        assert a["label"] == b["label"] and a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    from danlu.cli import main

    capsys.readouterr()
    assert main(["evaluate", run.path, "--data", csv]) == 0  # the same tokenizer, labels and pooling on a file
    assert "accuracy" in capsys.readouterr().out
    from danlu.serve.predictor import Predictor

    served = Predictor.from_run(run.path).classify(TEXTS)
    assert [r["label"] for r in served] == [r["label"] for r in expected]
    if method == "lora":
        merged = load_run(export_merged(run.path, str(tmp_path / "merged")))
        assert "adapter.safetensors" not in os.listdir(merged.path) and merged.cfg.finetune.method == "full"
        for a, b in zip(merged.predict(TEXTS), expected):
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
        assert main(["compare", run.path, merged.path, "--out", str(tmp_path / "compare")]) == 0
        table = capsys.readouterr().out
        assert os.path.basename(run.path) in table and "merged" in table


def test_served_over_http(llama, tmp_path):
    """/v1/predict on an adapter-only LLM classifier run answers what the run predicts."""
    from fastapi.testclient import TestClient

    from danlu.serve.app import create_app
    from danlu.serve.predictor import Predictor

    folder, csv = llama
    run = finetune(finetune_config(folder, csv, tmp_path / "run", method="lora", lora_targets=["*.attn.qkv"]) |
                   {"train": {"epochs": 1, "batch_size": 16, "lr": 1e-2, "device": "cpu", "threads": 1}})
    with TestClient(create_app(Predictor.from_run(run.path))) as client:
        answer = client.post("/v1/predict", json={"texts": TEXTS})
    assert answer.status_code == 200, answer.text
    expected = run.predict(TEXTS)
    got = answer.json()["data"]
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    assert got[0]["score"] == pytest.approx(expected[0]["score"], abs=1e-5)


def test_unsupported_combinations_are_named(llama, tmp_path):
    folder, csv = llama
    with pytest.raises(ConfigError, match=r"finetune.pooling: 'cls'.*gpt.*last, mean"):
        finetune(finetune_config(folder, csv, tmp_path / "cls", method="lora", pooling="cls"))
    with pytest.raises(ConfigError, match=r"finetune.*classification or causal_lm.*regression"):
        finetune(finetune_config(folder, csv, tmp_path / "regression", method="lora") | {"task": "regression"})
    assert not (tmp_path / "cls").exists() and not (tmp_path / "regression").exists()


def test_ready_config_loads():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = config_mod.load(os.path.join(root, "configs", "lora_smollm2_zh_sentiment.yaml"))
    assert cfg.task == "classification" and cfg.finetune.method == "lora" and cfg.finetune.base.endswith(".gguf")
