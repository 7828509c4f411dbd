"""The fastText-style `ngram` kind: its features against a plain-Python bag of n-grams, padding, a tiny training
run that predicts and exports to ONNX with the same answers, and config errors that name the key.
(The shared checks of every model — shape, save / load, one step, determinism — are in test_conformance.py.)"""
import pytest
import torch

from danlu import config
from danlu.data.spec import DataSpec
from danlu.models.ngram import HASH_MODULUS, HASH_MULTIPLIER, NgramClassifier, NgramConfig
from danlu.registry import ConfigError
from danlu.testing import classifier_run

torch.set_num_threads(1)
SPEC = DataSpec(vocab_size=30, pad_id=0, num_classes=3, labels=("a", "b", "c"))


def python_rows(tokens, orders, vocab_size, buckets):
    """The rows of a text's n-grams, written out in Python integers (no tensors, no padding)."""
    rows = []
    for n in orders:
        for start in range(len(tokens) - n + 1):
            gram = tokens[start:start + n]
            if n == 1:
                rows.append(gram[0])
                continue
            h = n
            for token in gram:
                h = (h * HASH_MULTIPLIER + token) % HASH_MODULUS
            rows.append(vocab_size + h % buckets)
    return rows


def build(seed=0, ngrams=(1, 2, 3)):
    torch.manual_seed(seed)
    return NgramClassifier(NgramConfig(embed_dim=8, buckets=97, ngrams=ngrams), SPEC).eval()


@pytest.mark.parametrize("orders", [(1,), (1, 2, 3), (2, 4)])
def test_logits_are_the_head_of_the_mean_of_the_texts_ngram_rows(orders):
    model = build(ngrams=orders)
    texts = [[5, 9, 7, 5, 9, 11], [12, 13], [8]]  # one text shorter than the longest order
    length = max(map(len, texts))
    ids = torch.tensor([t + [0] * (length - len(t)) for t in texts])  # (B, T) right-padded
    with torch.no_grad():
        logits = model(ids, ids != 0)
        for i, tokens in enumerate(texts):
            rows = python_rows(tokens, orders, SPEC.vocab_size, 97)
            pooled = model.embed.weight[rows].mean(0) if rows else torch.zeros(8)
            torch.testing.assert_close(logits[i], model.head(pooled), rtol=0, atol=1e-6)


def test_the_same_ngram_gets_the_same_row_wherever_it_is():
    model = build()
    ids = torch.tensor([[5, 9, 7, 5, 9, 0], [1, 1, 5, 9, 7, 5]])
    rows, real = model.ngram_ids(ids, ids != 0)  # (B, 3 T): unigrams, bigrams, trigrams
    length = ids.shape[1]
    bigrams, trigrams = rows[:, length:2 * length], rows[:, 2 * length:]
    assert bigrams[0, 0] == bigrams[0, 3] == bigrams[1, 2]  # (5, 9) at three places
    assert trigrams[0, 0] == trigrams[1, 2]  # (5, 9, 7)
    assert real[0].tolist() == [True] * 5 + [False] + [True] * 4 + [False] * 2 + [True] * 3 + [False] * 3
    assert ((rows >= SPEC.vocab_size) == torch.cat([torch.zeros(2, length), torch.ones(2, 2 * length)], 1).bool()).all()


def test_padding_leaves_the_logits_unchanged():
    model = build(ngrams=(1, 2, 3))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], 1)  # more padding on the right
    alone = model(ids[1:, :2], torch.ones(1, 2, dtype=torch.bool))  # the short row with no padding at all
    torch.testing.assert_close(model(ids, ids != 0), model(padded, padded != 0), rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids, ids != 0)[1:], alone, rtol=0, atol=1e-6)


def test_unigrams_alone_need_no_hashed_rows():
    assert build(ngrams=(1,)).embed.num_embeddings == SPEC.vocab_size
    assert build(ngrams=(1, 2)).embed.num_embeddings == SPEC.vocab_size + 97


def test_idf_is_scikit_learns_smoothed_idf_of_the_training_texts():
    from danlu.data.batching import TextDataset

    torch.manual_seed(0)
    model = NgramClassifier(NgramConfig(embed_dim=8, buckets=97, ngrams=(1, 2), weighting="idf"), SPEC)
    texts = [[5, 9, 5, 9], [5, 7], [9, 5, 11], [12]]
    model.adapt(TextDataset([torch.tensor(t).int().numpy() for t in texts], None, 0), batch_size=3)
    df = {}
    for tokens in texts:
        for row in set(python_rows(tokens, (1, 2), SPEC.vocab_size, 97)):
            df[row] = df.get(row, 0) + 1
    n = len(texts)
    for row in range(model.embed.num_embeddings):  # ln((1 + n) / (1 + df)) + 1; unseen rows: df 0
        want = torch.log(torch.tensor((1.0 + n) / (1.0 + df.get(row, 0)))) + 1
        assert model.idf[row].item() == pytest.approx(want.item(), abs=1e-6), row
    assert df[5] == 3 and model.idf[5] < model.idf[7] < model.idf[0]  # (5) in three texts, (7) in one, pad in none


def test_idf_logits_are_the_head_of_the_idf_weighted_sum_over_its_l2_norm():
    model = NgramClassifier(NgramConfig(embed_dim=8, buckets=97, ngrams=(1, 2), weighting="idf"), SPEC).eval()
    with torch.no_grad():
        model.idf.uniform_(1.0, 3.0)
        texts = [[5, 9, 7, 5, 9, 11], [12, 13], [8]]
        ids = torch.tensor([t + [0] * (6 - len(t)) for t in texts])
        logits = model(ids, ids != 0)
        for i, tokens in enumerate(texts):
            rows = python_rows(tokens, (1, 2), SPEC.vocab_size, 97)
            w = model.idf[rows]
            pooled = (w[:, None] * model.embed.weight[rows]).sum(0) / w.square().sum().sqrt()
            torch.testing.assert_close(logits[i], model.head(pooled), rtol=0, atol=1e-6)
    assert "idf" in model.state_dict() and "idf" not in build().state_dict()  # saved only when used


@pytest.mark.parametrize("labels", [[0, 0, 1, 2, 2], [0, 0, 1, 1, 1]])  # the second without class c in training
def test_nb_weights_are_the_idf_times_the_root_of_the_largest_log_count_ratio_written_out_by_hand(labels):
    import math

    from danlu.data.batching import TextDataset

    model = NgramClassifier(NgramConfig(embed_dim=8, buckets=97, ngrams=(1,), weighting="nb"), SPEC)
    texts = [[5, 9], [5, 9, 9], [5, 7], [7, 11], [5]]  # 9 only in class a; 5 in every class of the training texts
    model.adapt(TextDataset([torch.tensor(t).int().numpy() for t in texts], torch.tensor(labels).numpy(), 0), batch_size=2)
    seen = sorted({row for t in texts for row in t})  # the norms run over these rows only
    classes = sorted(set(labels))  # a class without training texts takes no part
    df = {c: {row: sum(row in t for t, y in zip(texts, labels) if y == c) for row in seen} for c in classes}
    for row in range(model.embed.num_embeddings):
        if row not in seen:  # never in training: no evidence, no weight
            assert model.idf[row].item() == 0, row
            continue
        ratios = []
        for c in classes:
            p = {r: 1 + df[c][r] for r in seen}
            q = {r: 1 + sum(df[o][r] for o in classes if o != c) for r in seen}
            ratios.append(abs(math.log(p[row] / sum(p.values())) - math.log(q[row] / sum(q.values()))))
        n_texts = sum(row in t for t in texts)
        idf = math.log((1 + len(texts)) / (1 + n_texts)) + 1
        assert model.idf[row].item() == pytest.approx(idf * math.sqrt(max(ratios)), abs=1e-6), row
    assert model.idf[9] > model.idf[5]  # 9 marks class a; 5 is in every class


def test_nb_weighting_needs_classes():
    regression = DataSpec(vocab_size=30, pad_id=0, num_classes=1)  # one numeric target
    with pytest.raises(ConfigError, match="model.weighting: nb .* classification"):
        NgramClassifier(NgramConfig(weighting="nb"), regression)


@pytest.mark.parametrize("weighting", ["mean", "idf", "nb"])
def test_a_tiny_run_learns_predicts_and_exports_with_the_same_answers(tmp_path, weighting):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from danlu.runs import load_run
    from danlu.serve.export import TOLERANCE, OnnxModel, export

    run = classifier_run(str(tmp_path / "ngram"), kind="ngram", rows=120, epochs=4, buckets=4096, ngrams=[1, 2],
                         weighting=weighting)
    if weighting != "mean":  # measured on the training split, saved in model.safetensors, loaded back
        assert run.model.idf.min() >= (1 if weighting == "idf" else 0) and run.model.idf.max() > run.model.idf.min()
        again = load_run(run.path, device="cpu")
        torch.testing.assert_close(again.model.idf, run.model.idf, rtol=0, atol=0)
        ids = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 3, 0, 0]])
        with torch.no_grad():
            torch.testing.assert_close(again.model(ids, ids != 0), run.model.eval()(ids, ids != 0), rtol=0, atol=0)
    texts = ["很好喜欢推荐", "很差失望退货", "质量物流很好满意", "包装糟糕后悔"]
    predicted = run.predict(texts)
    assert [p["label"] for p in predicted] == ["正面", "负面", "正面", "负面"]
    report = export(run, out=tmp_path / "onnx", repeats=2)
    assert report["model"] == "ngram" and report["fixed_length"] is None
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] <= TOLERANCE
    alone = OnnxModel(tmp_path / "onnx").predict(texts + ["", "好"])  # an empty text and a single token too
    want = run.predict(texts + ["", "好"])
    assert [a["label"] for a in alone] == [w["label"] for w in want]
    for a, w in zip(alone, want):
        assert a["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)


@pytest.mark.parametrize("values, words", [
    ({"ngrams": []}, ["model.ngrams", "at least one n-gram order"]),
    ({"ngrams": [1, 0]}, ["model.ngrams[1]", "in [1, 8]", "got 0"]),
    ({"ngrams": [1, 9]}, ["model.ngrams[1]", "in [1, 8]", "got 9"]),
    ({"ngrams": [2, 2]}, ["model.ngrams", "each order once", "[2, 2]"]),
    ({"buckets": 0}, ["model.buckets", "got 0"]),
    ({"embed_dim": 0}, ["model.embed_dim", ">= 1"]),
    ({"dropout": 1}, ["model.dropout", "in [0, 1)"]),
    ({"bucket": 5}, ["unknown key 'bucket'", "did you mean 'buckets'"]),
])
def test_bad_config_values_name_the_key(values, words):
    with pytest.raises(ConfigError) as e:
        config.load({"model": {"kind": "ngram", **values}})
    assert all(w in str(e.value) for w in words), str(e.value)


def run_benchmark(results, *options):
    """benchmarks/run.py --only ngram on 120 examples of the 4-play set, one epoch: (exit code, its rows)."""
    import importlib.util
    import json
    from pathlib import Path

    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("benchmarks.run", Path(__file__).resolve().parents[1] / "benchmarks" / "run.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    code = harness.main(["--only", "ngram", "--threads", "1", "--results", str(results), "--ngram-data", "shakespeare",
                         "--ngram-limit", "120", "--ngram-set", "train.epochs=1", *options])
    torch.set_num_threads(1)
    rows = json.loads((results / "ngram.json").read_text(encoding="utf-8"))["rows"] if code == 0 else None
    return code, rows


def test_the_benchmark_sets_ngram_beside_the_baseline_on_the_same_split(tmp_path, capsys):
    code, rows = run_benchmark(tmp_path)
    assert code == 0
    assert [r["model"].split()[0] for r in rows] == ["TF-IDF", "danlu"]
    assert all(r["data"] == "shakespeare" and r["train_examples"] == 120 for r in rows)
    assert rows[0]["vs_baseline"] == 0 and rows[1]["vs_baseline"] == rows[1]["test_accuracy"] - rows[0]["test_accuracy"]
    assert all(0 <= r["test_accuracy"] <= 1 and r["seconds"] > 0 for r in rows)
    assert "| data | train_examples | model |" in capsys.readouterr().out


def test_the_benchmark_spreads_the_baseline_over_its_own_settings(tmp_path):
    code, rows = run_benchmark(tmp_path, "--ngram-baseline", "spread")
    assert code == 0
    changes = [r["model"].split("logistic regression (")[-1].rstrip(")") for r in rows[:6]]
    assert changes == ["as reported", "min_df=1", "min_df=3", "sublinear_tf=False", "C=1", "C=16"]
    assert rows[0]["vs_baseline"] == 0 and rows[-1]["model"].startswith("danlu ngram") and len(rows) == 7
    assert all(0 <= r["val_accuracy"] <= 1 and 0 <= r["test_accuracy"] <= 1 for r in rows)
    assert rows[3]["vs_baseline"] == rows[3]["test_accuracy"] - rows[0]["test_accuracy"]


def test_the_character_table_holds_each_tokens_ngrams_written_out_by_hand():
    import zlib

    from danlu.models.ngram import char_table

    tokens = ["[PAD]", "play", "##ing", "好", "\u0120ab", "x"]
    table = char_table(tokens, (2, 3), 8, 30, 97, skip={"[PAD]"})

    def rows(*grams):  # CRC-32 of the UTF-8 bytes into the 97 rows after the 30 of the vocabulary
        return [30 + zlib.crc32(g.encode()) % 97 for g in grams] + [-1] * (8 - len(grams))

    assert table.shape == (6, 8) and table.dtype == torch.int32
    assert table[0].tolist() == [-1] * 8  # a special token: none
    assert table[1].tolist() == rows("<p", "pl", "la", "ay", "<pl", "pla", "lay")[:8]  # a word's start marked
    assert table[2].tolist() == rows("in", "ng", "ing")  # a WordPiece continuation: no start mark
    assert table[3].tolist() == [-1] * 8 == table[5].tolist()  # one character: nothing beyond the token itself
    assert table[4].tolist() == rows("<a", "ab", "<ab")  # byte-level BPE's space is the start mark
    longer = char_table(["abcdefgh"], (2, 3), 8, 30, 97)[0].tolist()  # 8 bigrams of "<abcdefgh" fill the slots
    assert longer == rows("<a", "ab", "bc", "cd", "de", "ef", "fg", "gh")


def char_model(weighting):
    torch.manual_seed(0)
    model = NgramClassifier(NgramConfig(embed_dim=8, buckets=97, ngrams=(1, 2), char_ngrams=(2, 3), char_slots=6,
                                        weighting=weighting), SPEC).eval()
    with torch.no_grad():
        model.char_rows[5, :3] = torch.tensor([31, 40, 77])  # token 5 has three character n-grams, token 9 one
        model.char_rows[9, 0] = 40
        if weighting == "idf":
            model.idf.uniform_(1.0, 3.0)
    return model


@pytest.mark.parametrize("weighting", ["mean", "idf"])
def test_character_ngrams_join_the_text_as_each_token_occurs(weighting):
    model = char_model(weighting)
    texts = [[5, 9, 7, 5], [7, 8], [9]]
    ids = torch.tensor([t + [0] * (4 - len(t)) for t in texts])
    table = {5: [31, 40, 77], 9: [40]}
    with torch.no_grad():
        logits = model(ids, ids != 0)
        for i, tokens in enumerate(texts):
            rows = python_rows(tokens, (1, 2), SPEC.vocab_size, 97)
            chars = [r for t in tokens for r in table.get(t, [])]  # repeated with each occurrence
            e = model.embed.weight
            if weighting == "mean":  # one mean over everything, as fastText averages a word's vectors
                pooled = e[rows + chars].mean(0)
            else:  # each block over its own idf L2 norm, then added
                w, c = model.idf[rows], model.idf[chars]
                pooled = (w[:, None] * e[rows]).sum(0) / w.square().sum().sqrt()
                if chars:
                    pooled = pooled + (c[:, None] * e[chars]).sum(0) / c.square().sum().sqrt()
            torch.testing.assert_close(logits[i], model.head(pooled), rtol=0, atol=1e-6)
    assert "char_rows" in model.state_dict() and "char_rows" not in build().state_dict()  # old runs load unchanged


def test_character_ngrams_without_the_tokenizer_are_an_error_that_says_so():
    from danlu.data.batching import TextDataset

    model = char_model("idf")
    with pytest.raises(ValueError, match="char_ngrams needs the run's tokenizer"):
        model.adapt(TextDataset([torch.tensor([5, 9]).int().numpy()], None, 0))


ENGLISH = [("a great film, I recommend it", "pos"), ("wonderful acting and recommended", "pos"),
           ("greatest story, loved it", "pos"), ("awful plot, I hated it", "neg"),
           ("terrible acting and boring", "neg"), ("awfully dull, hateful ending", "neg")]


def test_an_english_run_with_character_ngrams_saves_loads_and_exports_with_the_same_answers(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    import csv

    from danlu.evaluate.explain import explain
    from danlu.jobs.train import train
    from danlu.runs import load_run
    from danlu.serve.export import TOLERANCE, OnnxModel, export

    data = tmp_path / "en.csv"
    with open(data, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *(ENGLISH * 20)])
    run = train({"run": {"dir": str(tmp_path / "run"), "seed": 0},
                 "data": {"train": str(data), "tokenizer": {"kind": "wordpiece", "vocab_size": 200, "max_length": 32}},
                 "model": {"kind": "ngram", "embed_dim": 8, "buckets": 4096, "ngrams": [1, 2], "char_ngrams": [3, 4],
                           "char_slots": 12, "weighting": "idf"},
                 "train": {"epochs": 6, "batch_size": 16, "lr": 0.05, "device": "cpu"}}, overwrite=True)
    tokenizer = run.tokenizer.tokenizer_
    great = run.model.char_rows[tokenizer.token_to_id("great")]
    assert (great >= 0).sum() == 7  # of "<great": "<gr", "gre", "rea", "eat", then "<gre", "grea", "reat"
    again = load_run(run.path, device="cpu")
    torch.testing.assert_close(again.model.char_rows, run.model.char_rows, rtol=0, atol=0)
    texts = ["greatest film", "awfully boring", "recommend it", "hated"]
    ids = torch.tensor([list(t) + [0] * (8 - len(t)) for t in run.tokenizer.encode(texts)])
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids, ids != 0), run.model.eval()(ids, ids != 0), rtol=0, atol=0)
    explained = explain(run, ["awful plot, hated"])[0]  # occlusion, as for every ngram run; the report uses it too
    assert explained["method"] == "occlusion" and [t["text"] for t in explained["tokens"]][:2] == ["awful", "plot"]
    report = export(run, out=tmp_path / "onnx", repeats=2)
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] <= TOLERANCE
    alone, want = OnnxModel(tmp_path / "onnx").predict(texts), run.predict(texts)
    for a, w in zip(alone, want):
        assert a["label"] == w["label"] and a["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)


def test_sublinear_tf_pools_each_distinct_ngram_once_at_one_plus_the_log_of_its_count():
    import math
    from collections import Counter

    torch.manual_seed(0)
    model = NgramClassifier(NgramConfig(embed_dim=8, buckets=97, ngrams=(1, 2), char_ngrams=(2,), char_slots=4,
                                        weighting="idf", tf="sublinear"), SPEC).eval()
    table = {5: [31, 40], 9: [40]}
    with torch.no_grad():
        model.idf.uniform_(1.0, 3.0)
        for token, rows in table.items():
            model.char_rows[token, :len(rows)] = torch.tensor(rows)
        texts = [[5, 9, 5, 9, 5, 7], [7, 7, 7], [9]]
        ids = torch.tensor([t + [0] * (6 - len(t)) for t in texts])
        logits = model(ids, ids != 0)
        e = model.embed.weight

        def tfidf(counts):  # a TF-IDF row over distinct keys (ending in their row), L2-normalised, times the embeddings
            w = {key: (1 + math.log(c)) * model.idf[key[-1]].item() for key, c in counts.items()}
            norm = math.sqrt(sum(v * v for v in w.values()))
            return sum(v * e[key[-1]] for key, v in w.items()) / norm

        for i, tokens in enumerate(texts):
            pooled = tfidf(Counter((r,) for r in python_rows(tokens, (1, 2), SPEC.vocab_size, 97)))
            chars = Counter((t, r) for t in tokens for r in table.get(t, []))  # row 40 counted per token: 5 and 9
            if chars:
                pooled = pooled + tfidf(chars)
            torch.testing.assert_close(logits[i], model.head(pooled), rtol=0, atol=1e-5)


@pytest.mark.parametrize("weighting, tf", [("mean", "raw"), ("idf", "raw"), ("idf", "sublinear")])
def test_training_pools_character_ngrams_per_distinct_token_as_evaluation_does_per_position(weighting, tf):
    torch.manual_seed(0)
    model = NgramClassifier(NgramConfig(embed_dim=8, buckets=97, ngrams=(1, 2), char_ngrams=(2, 3), char_slots=6,
                                        weighting=weighting, tf=tf), SPEC)
    with torch.no_grad():
        model.char_rows[5, :3] = torch.tensor([31, 40, 77])
        model.char_rows[9, :2] = torch.tensor([40, 120])
        if weighting == "idf":
            model.idf.uniform_(1.0, 3.0)
        ids = torch.tensor([[5, 9, 7, 5, 0], [9, 9, 9, 8, 2], [11, 0, 0, 0, 0]])
        torch.testing.assert_close(model.train()(ids, ids != 0), model.eval()(ids, ids != 0), rtol=0, atol=1e-6)
