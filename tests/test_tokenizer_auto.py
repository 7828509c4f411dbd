"""`data.tokenizer.kind: auto` (the default): characters for Chinese / Japanese text, byte-level BPE for
alphabetic text; the kind chosen is recorded in the run and is what predict / serve / export load."""
import json
import os
import random

import pytest
from conftest import make_reviews, write_csv

import danlu
from danlu.cli import main
from danlu.config import load
from danlu.data.tokenizer import TextTokenizer, choose_kind
from danlu.runs import load_run


def english_reviews(n, seed=0):
    rng = random.Random(seed)
    good, bad = ["great", "excellent", "lovely", "recommended"], ["awful", "broken", "refunded", "disappointing"]
    filler = ["the", "delivery", "was", "quite", "honestly", "product", "packaging", "price"]
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.choices(filler, k=rng.randint(2, 6)) + rng.choices(good if label == "pos" else bad, k=2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def config(data, run_dir, **tokenizer):
    return {"run": {"dir": str(run_dir)}, "data": {"train": data, "tokenizer": {"vocab_size": 300, "max_length": 32,
                                                                               **tokenizer}},
            "model": {"kind": "mlp", "embed_dim": 16, "hidden_dim": 16}, "train": {"epochs": 1, "batch_size": 16}}


@pytest.mark.parametrize("texts, kind", [
    (["质量很好，物流也快", "太差了，再也不买"], "char"),
    (["この商品はとても良いです", "二度と買いません"], "char"),
    (["The room was clean", "Terrible service, never again"], "bpe"),
    (["Das Zimmer war sauber", "Schrecklicher Service"], "bpe"),
    (["手机很好用，iPhone 的屏幕不错", "电池 battery 太差"], "char"),  # Chinese with a few English words
    (["12345", "67 89"], "char"),  # no letters at all
])
def test_choose_kind_by_script(texts, kind):
    assert choose_kind(texts)[0] == kind


def test_auto_is_the_default_and_explicit_kinds_stay():
    assert load({}).data.tokenizer.kind == "auto"
    assert load("configs/seed_lstm.yaml").data.tokenizer.kind == "char"  # the README's figures keep characters


def test_english_run_gets_bpe_recorded_and_reloaded(tmp_path, one_thread, capsys):
    data = write_csv(tmp_path / "en.csv", english_reviews(120))
    run_dir = tmp_path / "en"
    assert main(["train", str(_yaml(tmp_path, config(data, run_dir))), "--overwrite"]) in (0, None)
    out = capsys.readouterr().out
    assert "tokenizer: bpe (auto: 100% of the letters are alphabetic" in out
    saved = load(str(run_dir / "config.yaml"))
    assert saved.data.tokenizer.kind == "bpe"
    with open(run_dir / "metrics.json", encoding="utf-8") as f:
        metrics = json.load(f)
    assert metrics["data"]["tokenizer"] == "bpe" and metrics["data"]["tokenizer_choice"].startswith("auto:")
    with open(run_dir / "tokenizer.json", encoding="utf-8") as f:
        assert json.load(f)["model"]["type"] == "BPE"
    run = load_run(str(run_dir))
    assert run.cfg.data.tokenizer.kind == "bpe" and run.tokenizer.kind_ == "bpe"
    # subwords: "delivery" is one or two tokens, not eight characters
    assert len(run.tokenizer.encode(["delivery"])[0]) <= 2
    texts = ["the delivery was great", "broken and refunded"]
    trained = danlu.train(config(data, tmp_path / "again", kind="auto"))
    assert [p["label"] for p in trained.predict(texts)] == [p["label"] for p in load_run(trained.path).predict(texts)]


def test_chinese_run_gets_characters(tmp_path, one_thread):
    data = write_csv(tmp_path / "zh.csv", make_reviews(120))
    run = danlu.train(config(data, tmp_path / "zh"))
    assert run.cfg.data.tokenizer.kind == "char"
    assert load(os.path.join(run.path, "config.yaml")).data.tokenizer.kind == "char"
    assert load_run(run.path).tokenizer.kind_ == "char"
    assert run.metrics["data"]["tokenizer"] == "char"
    assert "Chinese / Japanese characters" in run.metrics["data"]["tokenizer_choice"]


def test_an_explicit_kind_is_kept_on_english(tmp_path, one_thread):
    data = write_csv(tmp_path / "en.csv", english_reviews(80))
    run = danlu.train(config(data, tmp_path / "en", kind="char"))
    assert run.cfg.data.tokenizer.kind == "char" and "tokenizer_choice" not in run.metrics["data"]
    assert TextTokenizer.load(os.path.join(run.path, "tokenizer.json")).kind_ == "char"


def _yaml(tmp_path, cfg):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def test_a_stream_is_judged_on_its_first_pieces_and_trained_on_all():
    def corpus():  # a pretraining corpus arrives as a generator of pieces
        yield from ["the weather is fine today"] * 2500
        yield from ["zebra quokka"] * 50  # after the pieces auto looks at: still in the vocabulary
    tok = TextTokenizer("auto", vocab_size=400, min_frequency=2).fit(corpus())
    assert tok.kind_ == "bpe"
    assert len(tok.encode(["zebra"])[0]) == 1


def test_pretraining_records_the_kind_auto_chose(tmp_path, one_thread):
    from danlu.jobs.pretrain import pretrain

    corpus = tmp_path / "corpus.txt"
    rng = random.Random(0)
    corpus.write_text("".join(f"{rng.choice(['the king', 'my lord'])} {rng.choice(['sees', 'fears'])} the storm.\n"
                              for _ in range(400)), encoding="utf-8")
    run = pretrain({"task": "causal_lm", "run": {"dir": str(tmp_path / "lm")},
                    "data": {"train": str(corpus), "block_size": 16, "tokenizer": {"vocab_size": 300}},
                    "model": {"kind": "gpt", "num_layers": 1, "embed_dim": 16, "num_heads": 2, "max_positions": 16},
                    "train": {"max_steps": 2, "batch_size": 4, "peak_flops": 1e11}})
    assert load(os.path.join(run.path, "config.yaml")).data.tokenizer.kind == "bpe"
