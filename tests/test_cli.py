import json
import subprocess
import sys
import typing

import pytest
import yaml

from danlu.cli import main

from conftest import make_reviews, tiny_config, write_csv


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    data = write_csv(tmp / "reviews.csv", make_reviews(300))
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(data, tmp / "unused", train={"epochs": 3}), allow_unicode=True))
    assert main(["train", str(cfg), f"run.dir={tmp / 'run'}", "train.epochs=3"]) == 0
    return tmp


def test_train_prints_metrics_and_run(trained, capsys, tmp_path):
    data = write_csv(tmp_path / "r.csv", make_reviews(100, seed=3))
    assert main(["train", str(trained / "cfg.yaml"), f"data.train={data}", f"run.dir={tmp_path / 'r'}", "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "test: accuracy" in out and f"run directory: {tmp_path / 'r'}" in out


def test_evaluate_predict_info(trained, capsys, tmp_path):
    other = write_csv(tmp_path / "other.csv", make_reviews(50, seed=7))
    assert main(["evaluate", str(trained / "run"), "--data", other]) == 0
    assert "other.csv: accuracy" in capsys.readouterr().out
    saved = json.loads((trained / "run" / "eval" / "other" / "metrics.json").read_text())
    assert saved["count"] == 50 and saved["accuracy"] > 0.8

    assert main(["predict", str(trained / "run"), "很好推荐喜欢", "垃圾退货失望"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("正面\t") and lines[1].startswith("负面\t")

    inbox = tmp_path / "inbox.jsonl"
    inbox.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t, _ in make_reviews(5)), encoding="utf-8")
    assert main(["predict", str(trained / "run"), "--file", str(inbox), "--out", str(tmp_path / "scored.jsonl")]) == 0
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 5 and all(set(r["probabilities"]) == {"正面", "负面"} for r in scored)

    assert main(["info", str(trained / "run")]) == 0
    out = capsys.readouterr().out
    assert "lstm" in out and "parameters" in out and "labels:     正面, 负面" in out


@pytest.mark.parametrize(
    "content, args, words",
    [
        ("text,label\n好,正面\n,负面\n", [], ["bad.csv, line 3", "empty text"]),
        ("review,label\n好,正面\n", [], ["bad.csv, line 1", "no column 'text'", "review"]),
        (None, ["train.epoch=3"], ["unknown key 'epoch'", "did you mean 'epochs'"]),
        (None, ["model.kind=gru"], ["model.kind", "'gru'", "lstm"]),
        (None, ["data.train=/nonexistent.csv"], ["/nonexistent.csv: file not found"]),
    ],
)
def test_bad_input_is_one_clear_paragraph(trained, tmp_path, content, args, words):
    extra = list(args)
    if content is not None:
        (tmp_path / "bad.csv").write_text(content, encoding="utf-8")
        extra.append(f"data.train={tmp_path / 'bad.csv'}")
    proc = subprocess.run([sys.executable, "-m", "danlu", "train", str(trained / "cfg.yaml"), f"run.dir={tmp_path / 'r'}"] + extra,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    for w in words:
        assert w in proc.stderr


def test_cli_errors_for_runs(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("model:\n  kind: lstm\n")
    assert main(["predict", str(tmp_path / "half"), "x"]) == 2
    assert "not a finished run" in capsys.readouterr().err


def test_help_for_every_verb():
    from danlu.cli import VERBS

    for verb in VERBS:
        proc = subprocess.run([sys.executable, "-m", "danlu", verb, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: danlu" in proc.stdout


# ------------------------------------------------------------------ flags made from the dataclasses


def _parsed_defaults(verb):
    from danlu.cli import build_parser

    return build_parser([verb]).parse_args([verb, "RUN"])


@pytest.mark.parametrize("verb", ["generate", "chat", "serve"])
def test_every_field_has_a_flag_with_the_field_default(verb):
    import dataclasses

    from danlu.sampling import CHAT_SAMPLING, SAMPLING, SamplingConfig
    from danlu.serve.app import ServeOptions

    cls, defaults, skipped = {"generate": (SamplingConfig, SAMPLING, ()),
                              "chat": (SamplingConfig, CHAT_SAMPLING, ("stop",)),  # the chat template's stops
                              "serve": (ServeOptions, ServeOptions(), ("allowed_hosts",))}[verb]  # from --host
    args = _parsed_defaults(verb)
    for f in dataclasses.fields(cls):
        if f.name in skipped:
            assert not hasattr(args, f.name)
            continue
        value = getattr(args, f.name)
        assert (tuple(value) if isinstance(value, list) else value) == getattr(defaults, f.name), f.name


def test_serve_flags_match_the_server_function():
    """The flags that are not ServeOptions fields are serve()'s own keywords, with serve()'s defaults."""
    import inspect

    from danlu.serve.server import serve

    args = _parsed_defaults("serve")
    signature = inspect.signature(serve).parameters
    for name in ("host", "port", "device", "threads", "precision"):
        assert getattr(args, name) == signature[name].default, name
    assert (not args.no_access_log) == signature["access_log"].default


def test_one_place_for_sampling_defaults():
    import inspect

    from danlu.generation import generate, generate_ids, sample, stream_generate
    from danlu.sampling import SAMPLING
    from danlu.serve.schemas import Sampling

    for fn in (generate, stream_generate, generate_ids, sample):
        for name, p in inspect.signature(fn).parameters.items():
            if hasattr(SAMPLING, name) and p.default is not inspect.Parameter.empty:
                assert p.default == getattr(SAMPLING, name), (fn.__name__, name)
    http = Sampling(model="m")
    for name in ("temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        assert getattr(http, name) == getattr(SAMPLING, name), name
    from danlu.generation import DECODE_PRECISIONS
    from danlu.sampling import DecodePrecision

    assert typing.get_args(DecodePrecision) == tuple(DECODE_PRECISIONS)  # --precision's choices are the table's


def test_flags_check_choices_and_ranges_like_the_config(capsys):
    for argv, words in ((["generate", "RUN", "--top-p", "2"], ["--top-p", "in (0, 1]", "2.0"]),
                        (["chat", "RUN", "--temperature", "-1"], ["--temperature", ">= 0"]),
                        (["generate", "RUN", "--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
                        (["generate", "RUN", "--top-k", "many"], ["--top-k", "expected an integer", "'many'"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        for w in words:
            assert w in err


def test_generate_chat_and_serve_pass_every_field_on(monkeypatch, capsys):
    """What the flags parse reaches generate(), stream_generate() and the server, field by field."""
    import io
    import types

    import danlu.generation
    import danlu.runs
    import danlu.serve.server
    from danlu.sampling import CHAT_SAMPLING
    from danlu.serve.app import ServeOptions

    seen = {}
    fake_run = types.SimpleNamespace(cfg=types.SimpleNamespace(task="causal_lm"), model=None, tokenizer=None, path="RUN")
    monkeypatch.setattr(danlu.runs, "load_run", lambda path, device="cpu": fake_run)
    monkeypatch.setattr(danlu.generation, "set_decode_precision", lambda model, precision: model)
    monkeypatch.setattr(danlu.generation, "generate", lambda m, t, prompts, **kw: seen.update(generate=kw) or [""] * len(prompts))
    monkeypatch.setattr(danlu.generation, "stream_generate", lambda m, t, prompt, **kw: seen.update(stream=kw) or iter(["ok"]))
    assert main(["generate", "RUN", "p", "--no-stream", "--top-k", "7", "--stop", "\n", "--stop", "。", "--seed", "3"]) == 0
    assert seen["generate"] == dict(max_new_tokens=64, temperature=1.0, top_k=7, top_p=1.0, repetition_penalty=1.0,
                                    stop=["\n", "。"], seed=3)

    import danlu.chat_template

    fake_run.chat_template = "{{ messages }}"
    monkeypatch.setattr(danlu.chat_template, "render_chat", lambda template, messages, **kw: "prompt")
    fake_run.tokenizer = types.SimpleNamespace(tokenizer_=types.SimpleNamespace(id_to_token=lambda i: ""),
                                               token_id=lambda t: 0)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", "RUN", "--top-p", "0.5"]) == 0
    assert {k: v for k, v in seen["stream"].items() if k != "stop"} == {
        **{k: getattr(CHAT_SAMPLING, k) for k in ("max_new_tokens", "temperature", "top_k", "repetition_penalty", "seed")},
        "top_p": 0.5}

    monkeypatch.setattr(danlu.serve.server, "serve", lambda run, **kw: seen.update(serve=kw))
    monkeypatch.setenv("DANLU_API_KEY", "from-env")
    assert main(["serve", "RUN", "--max-prompts", "3", "--timeout", "5"]) == 0
    options = {k: v for k, v in seen["serve"].items() if k in {f for f in ServeOptions.__dataclass_fields__}}
    assert ServeOptions(**options) == ServeOptions(api_key="from-env", max_prompts=3, timeout_s=5.0)
    capsys.readouterr()


# ------------------------------------------------------------------ small things a user notices


def test_version():
    import importlib.metadata

    proc = subprocess.run([sys.executable, "-m", "danlu", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"danlu {importlib.metadata.version('danlu')}"


def test_predict_file_hints_name_predicts_own_options(trained, tmp_path, capsys):
    no_column = tmp_path / "reviews.csv"
    no_column.write_text("id,review\n1,很好\n", encoding="utf-8")
    assert main(["predict", str(trained / "run"), "--file", str(no_column)]) == 2
    err = capsys.readouterr().err
    assert "no column 'text'" in err and "Set --text-column to the right name." in err and "data." not in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "很好"}\n{"text": ""}\n', encoding="utf-8")
    assert main(["predict", str(trained / "run"), "--file", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "empty.jsonl, line 2: empty text in 'text'. Fix the row." in err and "on_bad_rows" not in err

    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "很好"}\n', encoding="utf-8")
    assert main(["predict", str(trained / "run"), "--file", str(other)]) == 2
    err = capsys.readouterr().err
    assert "no 'text' field (--text-column); fields found: body" in err and "data." not in err
    assert main(["predict", str(trained / "run"), "--file", str(other), "--text-column", "body"]) == 0


def test_predict_file_keeps_the_inputs_other_fields(trained, tmp_path, capsys):
    inbox = tmp_path / "inbox.jsonl"
    inbox.write_text('{"id": 7, "text": "很好推荐喜欢", "meta": {"shop": "a"}}\n'
                     '{"id": "x-8", "text": "垃圾退货失望", "label": "负面"}\n', encoding="utf-8")
    assert main(["predict", str(trained / "run"), "--file", str(inbox), "--out", str(tmp_path / "scored.jsonl")]) == 0
    first, second = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert first["id"] == 7 and first["meta"] == {"shop": "a"} and first["text"] == "很好推荐喜欢"
    assert first["label"] == "正面" and set(first["probabilities"]) == {"正面", "负面"}
    assert second["id"] == "x-8" and second["input_label"] == "负面" and second["label"] == "负面"

    table = write_csv(tmp_path / "table.csv", [("17", "很好推荐喜欢", "2024")], header=("id", "review", "year"))
    capsys.readouterr()
    assert main(["predict", str(trained / "run"), "--file", table, "--text-column", "review"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["id"] == "17" and row["year"] == "2024" and row["text"] == "很好推荐喜欢" and "review" not in row


def test_predict_into_a_closed_pipe_is_quiet(trained, tmp_path):
    """`danlu predict ... | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    inbox = tmp_path / "inbox.jsonl"
    inbox.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t, _ in make_reviews(50)),
                     encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "danlu", "predict", str(trained / "run"), "--file", str(inbox)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "BrokenPipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err
    assert proc.returncode == 141


def test_a_binary_file_named_csv_is_not_a_table(trained, tmp_path, capsys):
    import random

    fake = tmp_path / "photo.csv"
    fake.write_bytes(b"PK\x03\x04\x14\x00\x06\x00" + random.Random(0).randbytes(4000))  # a zip archive
    assert main(["predict", str(trained / "run"), "--file", str(fake)]) == 2
    err = capsys.readouterr().err
    assert f"{fake}: not a text table" in err and "header" not in err and "PK" not in err

    utf16 = tmp_path / "excel.csv"  # UTF-16 without its byte-order mark: a hint, not garbage
    utf16.write_bytes("text,label\n很好,正面\n".encode("utf-16-le"))
    assert main(["train", str(trained / "cfg.yaml"), f"data.train={utf16}", f"run.dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "not a text table" in err and "set data.encoding=utf-16" in err


def test_regression_runs_say_regression_not_one_class(tmp_path, capsys):
    rows = [(t, str(1.0 if label == "正面" else -1.0)) for t, label in make_reviews(120)]
    data = write_csv(tmp_path / "scores.csv", rows)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(data, tmp_path / "run", task="regression", train={"epochs": 1}),
                                  allow_unicode=True))
    assert main(["train", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "test examples, regression, vocabulary" in err and "1 classes" not in err


def test_the_chinese_readme_has_every_command_of_the_english_one():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parent.parent

    def verbs(name):
        block = (root / name).read_text(encoding="utf-8").split("```bash", 2)[2].split("```", 1)[0]  # the commands
        return set(re.findall(r"^(?:torchrun .*-m )?danlu (\w+)", block, re.M))

    english = verbs("README.md")
    assert {"train", "finetune", "chat", "serve"} <= english
    assert english <= verbs("README.zh-CN.md")
