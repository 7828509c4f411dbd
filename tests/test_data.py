import codecs
import json

import numpy as np
import pytest

from danlu.config import DataConfig, TokenizerConfig
from danlu.data import DataError, build_data
from danlu.data.batching import batch_order, collate, TextDataset
from danlu.data.builtin import zh_sentiment
from danlu.data.sources import read_examples
from danlu.data.tokenizer import TextTokenizer
from danlu.registry import ConfigError

from conftest import make_reviews, write_csv


def test_builtin_zh_sentiment_is_deduplicated_and_disjoint():
    splits = zh_sentiment()
    sizes = {k: len(v.texts) for k, v in splits.items()}
    total = sum(sizes.values())
    assert 17000 < total < 17500  # 8,379 + 9,078 unique texts, minus 2 x 47 that carry both labels
    assert abs(sizes["train"] / total - 0.8) < 0.01
    texts = {k: set(v.texts) for k, v in splits.items()}
    assert all(len(texts[k]) == sizes[k] for k in texts)  # no duplicates inside a split
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["val"] and not texts["val"] & texts["test"]
    assert set(splits["train"].labels) == {"正面", "负面"}
    assert zh_sentiment()["test"].texts == splits["test"].texts  # fixed split


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "folder"])
def test_sources(tmp_path, fmt):
    rows = make_reviews(30)
    if fmt == "csv":
        path = write_csv(tmp_path / "d.csv", rows, header=("review", "stars"))
    elif fmt == "tsv":
        path = write_csv(tmp_path / "d.tsv", rows, header=("review", "stars"), delimiter="\t")
    elif fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps({"review": t, "stars": l}, ensure_ascii=False) + "\n" for t, l in rows), encoding="utf-8")
    else:
        path = tmp_path / "d"
        for i, (t, l) in enumerate(rows):
            (path / l).mkdir(parents=True, exist_ok=True)
            (path / l / f"{i}.txt").write_text(t, encoding="utf-8")
    ex = read_examples(path, "review", "stars")
    assert sorted(zip(ex.texts, ex.labels)) == sorted(rows)


def _bad(tmp_path, name, content, **kw):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(DataError) as e:
        read_examples(path, **kw)
    return str(e.value)


def test_bad_rows_name_file_and_line(tmp_path):
    msg = _bad(tmp_path, "a.csv", "text,label\n好,正面\n,负面\n")
    assert "a.csv, line 3" in msg and "empty text" in msg
    msg = _bad(tmp_path, "b.csv", "text,label\n好,正面\n".encode() + b"\xff\xfe bad,x\n")
    assert "b.csv, line 3" in msg and "UTF-8" in msg
    msg = _bad(tmp_path, "c.jsonl", '{"text": "好", "label": "a"}\n{"text": "坏", "label": \n')
    assert "c.jsonl, line 2" in msg and "not valid JSON" in msg
    msg = _bad(tmp_path, "d.csv", "review,label\n好,正面\n")
    assert "d.csv, line 1" in msg and "'text'" in msg and "review" in msg
    msg = _bad(tmp_path, "e.csv", "text,label\n好,\n")
    assert "e.csv, line 2" in msg and "missing label" in msg
    msg = _bad(tmp_path, "f.parquet", "x")
    assert "f.parquet" in msg and ".csv" in msg
    with pytest.raises(DataError, match="missing.csv: file not found"):
        read_examples(tmp_path / "missing.csv")


def test_skip_bad_rows_reports_count(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "好", "label": "a"}\nnot json\n{"text": "", "label": "b"}\n{"text": "坏", "label": "b"}\n')
    ex = read_examples(path, on_bad_rows="skip")
    assert ex.texts == ["好", "坏"] and ex.skipped == 2


def test_unseen_test_label_is_an_error(tmp_path):
    train = write_csv(tmp_path / "train.csv", make_reviews(40))
    test = write_csv(tmp_path / "test.csv", [("还行吧", "中性")])
    cfg = DataConfig(train=train, test=test, tokenizer=TokenizerConfig(vocab_size=200))
    with pytest.raises(DataError) as e:
        build_data(cfg)
    assert "test.csv:2" in str(e.value) and "中性" in str(e.value) and "正面" in str(e.value)


def test_split_from_train_is_seeded(tmp_path):
    train = write_csv(tmp_path / "train.csv", make_reviews(100))
    cfg = DataConfig(train=train, tokenizer=TokenizerConfig(vocab_size=200))
    a, b, c = build_data(cfg, seed=1), build_data(cfg, seed=1), build_data(cfg, seed=2)
    assert (len(a.train), len(a.val), len(a.test)) == (80, 10, 10)
    assert a.examples["test"].texts == b.examples["test"].texts != c.examples["test"].texts
    assert not set(a.examples["train"].texts) & set(a.examples["test"].texts) - set(a.examples["train"].texts)


@pytest.mark.parametrize("kind", ["char", "bpe", "wordpiece"])
def test_tokenizers_round_trip(tmp_path, kind):
    texts = [t for t, _ in make_reviews(200)] + ["很好 good"]
    tok = TextTokenizer(kind, vocab_size=300, max_length=16).fit(texts)
    ids = tok.encode(["质量很好，物流也快" * 5])[0]
    assert len(ids) == 16  # truncated to max_length
    tok.save(tmp_path / "tokenizer.json")
    again = TextTokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode(texts[:5])[0].tolist() == tok.encode(texts[:5])[0].tolist()
    assert again.max_length == 16 and again.pad_id == 0
    if kind != "wordpiece":
        assert tok.decode(tok.encode(["很好 good"])[0]) == "很好 good"


def test_buckets_group_similar_lengths_and_order_is_reproducible():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 128, size=3200)
    a = batch_order(lengths, 32, seed=0, epoch=3)
    b = batch_order(lengths, 32, seed=0, epoch=3)
    c = batch_order(lengths, 32, seed=0, epoch=4)
    assert all((x == y).all() for x, y in zip(a, b)) and not all((x == y).all() for x, y in zip(a, c))
    assert sorted(np.concatenate(a).tolist()) == list(range(3200))
    padded = sum(len(i) * lengths[i].max() for i in a)
    unbucketed = sum(len(i) * lengths[i].max() for i in batch_order(lengths, 32, bucket=False))
    assert padded < 0.6 * unbucketed  # bucketing removes most of the padding


def test_collate_pads_and_masks():
    ds = TextDataset([np.array([5, 6, 7], np.int32), np.array([8], np.int32)], np.array([1, 0]), pad_id=0)
    batch = collate(ds, [0, 1], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["labels"].tolist() == [1, 0]


def test_char_fast_path_matches_the_tokenizers_pipeline(tmp_path):
    """encode() looks characters up in a table for danlu's char tokenizer: the ids must be exactly the
    `tokenizers` pipeline's, including where characters interact (composition, newline runs, special tokens)."""
    import random

    rng = random.Random(0)
    sample = [chr(i) for i in range(0x20, 0x30000, 7) if not 0xD800 <= i < 0xE000]
    tok = TextTokenizer("char", vocab_size=200000, max_length=24).fit(["".join(sample)] * 2 + ["质量很好，物流也快"])
    tok.save(tmp_path / "tokenizer.json")
    tok = TextTokenizer.load(tmp_path / "tokenizer.json")
    assert tok._char_table() is not None  # the table is used for a loaded char tokenizer too
    tricky = list("质量很好ΣΑΣﬁ①Ⅻ㋿\n\r\t 한국어\u1100\u1161\u11a8e\u0301\u0cbf\u0cd5") + ["[SEP]", "[UNK]", "<s>", "\n\n"]
    texts = ["a" + c + "b" for c in sample + tricky]
    texts += ["".join(rng.choice(tricky) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    fast = tok.encode(texts)
    slow = [e.ids for e in tok.tokenizer_.encode_batch(texts)]
    assert [ids.tolist() for ids in fast] == slow
    assert all(ids.dtype == np.int32 for ids in fast)
    assert len(tok._table.ids) > 1000  # most texts went through the table, not the fallback
    assert TextTokenizer("bpe", vocab_size=300).fit(texts[:50])._char_table() is None
    tok.tokenizer_.no_truncation()  # as fine-tuning does on a loaded tokenizer: the table follows
    assert [ids.tolist() for ids in tok.encode(texts[-50:])] == [e.ids for e in tok.tokenizer_.encode_batch(texts[-50:])]
    assert max(len(ids) for ids in tok.encode(texts[-50:])) > 24


def test_chinese_excel_csv_gbk_and_other_separators(tmp_path):
    """Excel on Chinese Windows saves CSV as GBK: read as GB18030 with a warning; data.encoding chooses;
    UTF-16 / UTF-32 files with a byte-order mark (Excel's "Unicode Text") read as such; a semicolon-,
    tab- or bar-separated .csv is read by the separator its header shows."""
    rows = make_reviews(20) + [("质量很好，推荐购买", "正面")]
    body = "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows)
    (tmp_path / "gbk.csv").write_bytes(body.encode("gbk"))
    with pytest.warns(UserWarning, match="GB18030"):
        ex = read_examples(tmp_path / "gbk.csv")
    assert list(zip(ex.texts, ex.labels)) == rows
    explicit = read_examples(tmp_path / "gbk.csv", encoding="gb18030")  # no warning when chosen
    assert explicit.texts == ex.texts
    msg = _bad(tmp_path, "gbk2.csv", body.encode("gbk"), encoding="utf-8")
    assert "gbk2.csv, line 2" in msg and "data.encoding" in msg
    with pytest.raises(ConfigError, match="data.encoding"):
        read_examples(tmp_path / "gbk.csv", encoding="no-such-codec")
    (tmp_path / "bom.csv").write_bytes(body.encode("utf-8-sig"))
    assert read_examples(tmp_path / "bom.csv").texts == ex.texts  # the BOM is not part of the header
    # Excel's "Unicode Text": UTF-16 little-endian with a BOM, tab-separated, CRLF
    (tmp_path / "excel.tsv").write_bytes(body.replace(",", "\t").replace("\n", "\r\n").encode("utf-16"))
    assert list(zip(*(lambda e: (e.texts, e.labels))(read_examples(tmp_path / "excel.tsv")))) == rows
    (tmp_path / "excel.txt").write_bytes((tmp_path / "excel.tsv").read_bytes())  # the extension Excel gives it
    assert list(zip(*(lambda e: (e.texts, e.labels))(read_examples(tmp_path / "excel.txt")))) == rows
    (tmp_path / "plain.txt").write_text("just a sentence\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"plain.txt, line 1: no column 'text'; the header has: just a sentence"):
        read_examples(tmp_path / "plain.txt")
    (tmp_path / "be.csv").write_bytes(codecs.BOM_UTF16_BE + body.encode("utf-16-be"))
    assert read_examples(tmp_path / "be.csv").texts == ex.texts
    (tmp_path / "u32.csv").write_bytes(body.encode("utf-32"))
    assert read_examples(tmp_path / "u32.csv").texts == ex.texts
    for sep in (";", "\t", "|"):
        (tmp_path / "sep.csv").write_text(body.replace(",label", sep + "label").replace(",正面", sep + "正面")
                                          .replace(",负面", sep + "负面"), encoding="utf-8")
        assert list(zip(*(lambda e: (e.texts, e.labels))(read_examples(tmp_path / "sep.csv")))) == rows
    (tmp_path / "d" / "正面").mkdir(parents=True)
    (tmp_path / "d" / "正面" / "1.txt").write_bytes("物流很快".encode("gbk"))
    with pytest.warns(UserWarning, match="GB18030"):
        assert read_examples(tmp_path / "d").texts == ["物流很快"]


@pytest.mark.parametrize("name", ["sheet.csv", "rows.jsonl", "rows.tsv"])
def test_binary_data_under_a_tables_name_is_refused(tmp_path, name):
    import random

    noise = random.Random(1).randbytes(3000)
    msg = _bad(tmp_path, name, noise)
    assert msg.startswith(f"{tmp_path / name}: not a text table") and "line" not in msg
    without_nul = bytes(b for b in noise if b)  # control characters give it away even without a NUL
    assert "not a text table" in _bad(tmp_path, name, without_nul)
    text = "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in make_reviews(30))
    assert len(read_examples(_write(tmp_path / "ok.csv", text.replace("\n", "\r\n"))).texts) == 30  # text is text


def _write(path, text):
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_error_hints_name_the_callers_own_options(tmp_path):
    path = _write(tmp_path / "t.csv", "review,label\n好,正面\n")
    with pytest.raises(DataError, match=r"no column 'text'; the header has: review, label\. Set data.text_column / "
                                        r"data.label_column to the right names\.$"):
        read_examples(path)
    with pytest.raises(DataError, match=r"no column 'text'; the header has: review, label\.$"):
        read_examples(path, options={})
    with pytest.raises(DataError, match=r"line 2: missing label in 'label'\. Fix the row\.$"):
        read_examples(_write(tmp_path / "u.csv", "text,label\n好,\n"), options={})
    with pytest.raises(DataError, match=r"missing label in 'label' \(data.label_column\)\. Fix the row, or set "
                                        r"data.on_bad_rows=skip to skip bad rows\.$"):
        read_examples(tmp_path / "u.csv")
