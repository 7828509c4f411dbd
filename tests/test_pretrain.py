"""Pretraining: the LM tasks, `danlu pretrain` end to end (GPT and BERT), run loading, generation, exact resume."""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import danlu
from danlu.cli import main
from danlu.files import load_tensors
from danlu.models.bert import BERT
from danlu.models.gpt import GPT
from danlu.jobs.pretrain import pretrain
from danlu.registry import ConfigError
from danlu.training.tasks import IGNORE, CausalLMTask, LanguageModelMetrics, MaskedLMTask, mask_tokens

pytestmark = pytest.mark.usefixtures("one_thread")



SUBJECTS = ["the king", "the queen", "my lord", "the fool", "我们", "人民"]
VERBS = ["loves", "fears", "sees", "follows", "爱", "想"]
OBJECTS = ["the crown.", "the storm.", "his daughter.", "the night.", "中国。", "和平。"]


def write_corpus(path, lines=1500, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            f.write(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}\n")
    return str(path)


def lm_config(corpus, run_dir, task="causal_lm", **train):
    model = ({"kind": "gpt", "num_layers": 2, "embed_dim": 32, "num_heads": 2, "max_positions": 32}
             if task == "causal_lm" else {"kind": "bert", "num_layers": 2, "embed_dim": 32, "num_heads": 2, "dropout": 0.0})
    return {
        "task": task,
        "run": {"dir": str(run_dir), "seed": 0},
        "data": {"train": corpus, "val_fraction": 0.1, "block_size": 32,
                 "tokenizer": {"kind": "bpe", "vocab_size": 300, "lowercase": False}},
        "model": model,
        "train": {"max_steps": 40, "epochs": 100, "batch_size": 8, "optimizer": "adamw", "lr": 0.01, "schedule": "cosine",
                  "warmup_steps": 5, "grad_clip": 1.0, "eval_every": 10, "eval_batches": 4, "peak_flops": 1e11,
                  **train},
    }


def test_causal_lm_loss_and_metrics():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = IGNORE
    model = lambda ids, mask=None: logits  # noqa: E731
    task = CausalLMTask()
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": labels}
    loss, out = task.loss(model, batch)
    valid = labels != IGNORE
    assert loss.item() == pytest.approx(F.cross_entropy(logits[valid], labels[valid]).item(), rel=1e-6)
    count, correct, processed = task.counts(out, batch)
    assert (count, processed) == (8, 10) and correct == ((logits.argmax(-1) == labels) & valid).sum().item()
    metrics = LanguageModelMetrics()
    metrics.update(logits[:1], labels[:1])
    metrics.update(logits[1:], labels[1:])
    m = metrics.compute()
    assert m["loss"] == pytest.approx(loss.item(), rel=1e-6) and m["perplexity"] == pytest.approx(math.exp(loss.item()))
    assert m["count"] == 8


def test_causal_lm_on_padded_batches_predicts_the_next_real_token():
    ids = torch.tensor([[7, 8, 9, 0], [5, 6, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": ids != 0}
    CausalLMTask().loss(lambda i, m=None: torch.zeros(2, 4, 10), batch)
    assert batch["labels"].tolist() == [[8, 9, IGNORE, IGNORE], [6, IGNORE, IGNORE, IGNORE]]


def test_bert_masking_follows_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, 1000, (64, 256), generator=g)
    ids[:, :4] = 2  # special tokens are never chosen
    masked, labels = mask_tokens(ids, mask_id=4, vocab_size=1000, generator=g)
    chosen = labels != IGNORE
    assert not chosen[:, :4].any() and torch.equal(labels[chosen], ids[chosen])
    assert 0.14 < chosen.float().mean().item() / (252 / 256) < 0.16
    as_mask = (masked[chosen] == 4).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()
    assert 0.78 < as_mask < 0.82 and 0.08 < kept < 0.12  # the other ~10% are random tokens (rarely the same)
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert torch.equal(mask_tokens(ids, 4, 1000, generator=torch.Generator().manual_seed(5))[0],
                       mask_tokens(ids, 4, 1000, generator=torch.Generator().manual_seed(5))[0])


def test_masked_lm_masks_are_a_function_of_the_batch():
    task = MaskedLMTask(vocab_size=100)
    seen = []
    model = lambda ids, mask=None: (seen.append(ids.clone()), torch.zeros(*ids.shape, 100))[1]  # noqa: E731
    make = lambda: {"input_ids": torch.randint(7, 100, (4, 32), generator=torch.Generator().manual_seed(1)),  # noqa: E731
                    "index": torch.tensor([0, 32, 64, 96])}
    task.loss(model, make())
    torch.rand(10)  # the global random state does not matter
    task.loss(model, make())
    assert torch.equal(seen[0], seen[1]) and (seen[0] == 4).any()


def test_pretrain_gpt_end_to_end(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = pretrain(lm_config(corpus, tmp_path / "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 10 and "val_perplexity" in r for r in rows)
    val = run.metrics["val"]
    assert val["perplexity"] == pytest.approx(math.exp(val["loss"])) and val["perplexity"] < 40
    for name in ("config.yaml", "tokenizer.json", "model.safetensors", "metrics.json", "report.md",
                 "plots/loss.png", "plots/perplexity.png", "data/train.bin", "data/val.bin"):
        assert (tmp_path / "run" / name).exists(), name
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "## Samples" in report and "perplexity" in report

    loaded = danlu.load(run.path)
    assert isinstance(loaded.model, GPT) and loaded.cfg.task == "causal_lm" and loaded.labels == ()
    assert loaded.language_model and loaded.spec.num_classes == 0 and loaded.spec.max_length == 32
    assert loaded.generate(["the king"], max_new_tokens=8, temperature=0) == \
        danlu.generation.generate(run.model, run.tokenizer, ["the king"], max_new_tokens=8, temperature=0)
    assert val["perplexity"] < 15  # uniform guessing over the vocabulary of 300 would give 300


def test_pretrain_with_compile_matches_eager(tmp_path):
    """`train.compile` trains the same model to the same losses, and the model compiles without a graph break:
    the fused loss, which returns Python counts, runs outside it on the hidden states it returns."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    histories = {}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for compile_ in (False, True):
        run_dir = tmp_path / f"run_{compile_}"
        pretrain(lm_config(corpus, run_dir, max_steps=4, eval_every=2, compile=compile_))
        histories[compile_] = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    breaks = list(torch._dynamo.utils.counters["graph_break"])
    assert not breaks, breaks
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    for eager, compiled in zip(histories[False], histories[True], strict=True):
        for key in ("train_loss", "val_loss"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-3), key


def test_generate_command_streams(tmp_path, capsys, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.txt", lines=400)
    run = pretrain(lm_config(corpus, tmp_path / "run", max_steps=4, eval_every=4))
    assert main(["generate", run.path, "the king", "我们", "--max-new-tokens", "5", "--seed", "0", "--top-k", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("the king") and any(line.startswith("我们") for line in lines)
    assert main(["generate", run.path, "the king", "--no-stream", "--temperature", "0", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the king")
    decoded_in = []  # --precision bf16 decodes with bf16 weights, and says the same text as Python would
    generate_ids = danlu.generation.generate_ids
    monkeypatch.setattr(danlu.generation, "generate_ids",
                        lambda model, *a, **k: decoded_in.append(next(model.parameters()).dtype) or generate_ids(model, *a, **k))
    assert main(["generate", run.path, "the king", "--temperature", "0", "--max-new-tokens", "5", "--precision", "bf16"]) == 0
    assert decoded_in == [torch.bfloat16]
    expected = danlu.generation.generate(danlu.load(run.path).model.to(torch.bfloat16), run.tokenizer, ["the king"],
                                         max_new_tokens=5, temperature=0)[0]
    assert capsys.readouterr().out == f"the king{expected}\n"
    assert main(["pretrain", str(tmp_path / "nope.yaml")]) == 2
    assert main(["info", run.path]) == 0
    out = capsys.readouterr().out
    assert "causal_lm" in out and "4 steps" in out and "tokens)" in out and "label column" not in out


def test_pretrain_bert_masked_lm(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = pretrain(lm_config(corpus, tmp_path / "run", task="masked_lm", max_steps=40, lr=0.005))
    rows = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5
    loaded = danlu.load(run.path)
    assert isinstance(loaded.model, BERT) and loaded.cfg.task == "masked_lm" and loaded.language_model
    assert "Masked-token predictions" in (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    held_out = danlu.evaluate_run(loaded, write_corpus(tmp_path / "more.txt", lines=300, seed=1))  # masked positions of a new file
    assert held_out["count"] > 0 and held_out["loss"] < rows[0]["val_loss"]
    with pytest.raises(ConfigError, match="a masked language model is a backbone: fine-tune it"):
        loaded.predict(["the king"])
    from danlu.serve.predictor import Predictor

    with pytest.raises(ConfigError, match="nothing to serve yet: a masked language model is a backbone"):
        Predictor.from_run(run.path)


def test_evaluate_a_language_model_on_a_corpus(tmp_path, capsys):
    """`danlu evaluate` of a language model: loss, perplexity and token accuracy over every window of a text
    file, with the run's tokenizer; text like the training corpus scores far better than scrambled text."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = pretrain(lm_config(corpus, tmp_path / "run", max_steps=30, eval_every=30))
    similar = write_corpus(tmp_path / "similar.txt", lines=300, seed=1)
    text = (tmp_path / "similar.txt").read_text(encoding="utf-8")
    scrambled = tmp_path / "scrambled.txt"
    scrambled.write_text("".join(np.random.default_rng(0).permutation(list(text))), encoding="utf-8")
    loaded = danlu.load(run.path)
    good, bad = danlu.evaluate_run(loaded, similar), danlu.evaluate_run(loaded, scrambled)
    assert good["perplexity"] == pytest.approx(math.exp(good["loss"])) and good["perplexity"] < bad["perplexity"] / 3
    stream = len(loaded.tokenizer.tokenizer_.encode(text).ids) + 1  # one document, then </s>
    assert good["count"] == (stream - 1) // 32 * 32  # every whole window of 32 predicted tokens, not a sample
    assert main(["evaluate", run.path, "--data", similar]) == 0
    out = capsys.readouterr().out
    assert f"perplexity {good['perplexity']:.4f}" in out and f"({good['count']:,} tokens)" in out
    saved = json.loads((tmp_path / "run" / "eval" / "similar" / "metrics.json").read_text())
    assert saved["perplexity"] == pytest.approx(good["perplexity"])
    assert main(["compare", run.path, str(tmp_path / "run") + "/", "--out", str(tmp_path / "cmp.png")]) == 0
    header, _, row, *_ = capsys.readouterr().out.splitlines()  # language models: their own columns
    assert header.split()[3:7] == ["val", "loss", "val", "perplexity"] and "tokens/s" in header and "MFU" in header
    assert f"{run.metrics['val']['perplexity']:.4f}" in row and " 30 " in row
    assert main(["predict", run.path, "the king"]) == 2  # a classifier's verb: a clear refusal, not a traceback
    assert "this is a language model (task causal_lm); continue text with: danlu generate" in capsys.readouterr().err


def test_pretrain_refuses_supervised_tasks(tmp_path):
    with pytest.raises(ConfigError, match="pretrain` takes causal_lm or masked_lm"):
        pretrain({"task": "classification", "run": {"dir": str(tmp_path / "r")}})


KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from danlu.training import tasks
    calls, original = [0], tasks.CausalLMTask.loss
    def loss(self, model, batch):
        calls[0] += 1
        if calls[0] == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no final checkpoint
        return original(self, model, batch)
    tasks.CausalLMTask.loss = loss
    from danlu.jobs.pretrain import pretrain
    pretrain(sys.argv[1], resume="--resume" in sys.argv)
""")


def test_resume_after_sigkill_gives_the_same_weights(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", lines=800)
    train = dict(max_steps=12, eval_every=6, checkpoint_every=4, grad_accum=2, batch_size=4, precision="fp32")
    cfg = lm_config(corpus, tmp_path / "killed", **train)
    cfg["model"]["dropout"] = 0.1  # the dropout masks must continue from the same random state
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    (tmp_path / "killer.py").write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    # loss calls: 2 per step, plus 4 evaluation batches at step 6; call 2 * 9 + 4 + 1 is in step 10,
    # after the checkpoint of step 8 and before the row of step 12
    killed = subprocess.run([sys.executable, str(tmp_path / "killer.py"), str(tmp_path / "killed.yaml"), "23"],
                            env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    state = load_tensors(tmp_path / "killed" / "checkpoints" / "last.safetensors")[1]["state"]
    assert state["step"] == 8
    resumed = subprocess.run([sys.executable, str(tmp_path / "killer.py"), str(tmp_path / "killed"), "0", "--resume"],
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "reusing the token files" in resumed.stderr

    pretrain(lm_config(corpus, tmp_path / "straight", **train), model={"dropout": 0.1})  # one thread, as killed
    a, _ = load_tensors(tmp_path / "killed" / "model.safetensors")
    b, _ = load_tensors(tmp_path / "straight" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    hist = lambda p: [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "mfu", "seconds")}  # noqa: E731
                      for line in (tmp_path / p / "history.jsonl").read_text().splitlines()]
    assert hist("killed") == hist("straight") and [r["step"] for r in hist("killed")] == [6, 12]


def test_size_presets_fill_the_keys_a_config_leaves_out():
    from danlu import config

    cfg = config.load({"task": "causal_lm", "model": {"kind": "gpt", "size": "small", "num_layers": 3}})
    assert (cfg.model.embed_dim, cfg.model.num_heads, cfg.model.num_layers) == (384, 6, 3)
    assert config.load(config.to_dict(cfg)).model == cfg.model  # the saved config reloads the same
    assert config.load({"model": {"kind": "bert", "size": "minilm"}}).model.intermediate_dim == 1536
    with pytest.raises(ConfigError, match="model.size: unknown value 'huge'; expected one of: base, llama"):
        config.load({"model": {"kind": "gpt", "size": "huge"}})
