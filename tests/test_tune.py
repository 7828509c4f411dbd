"""danlu tune: a search over tune.space makes one run directory per trial, a SQLite study and a report;
bad space entries fail at load; pruning stops a bad trial; a killed search resumes without repeating
finished trials; parallel trials share the free cores."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml
from conftest import make_reviews, tiny_config, write_csv

from danlu import config
from danlu.registry import ConfigError

optuna = pytest.importorskip("optuna")


def _search_config(tmp_path, rows=400, space=None, model=None, **tune):
    data = write_csv(tmp_path / "reviews.csv", make_reviews(rows))
    cfg = tiny_config(data, tmp_path / "unused", train={"epochs": 2, "batch_size": 16, "lr": 0.01})
    cfg["model"] = model or {"kind": "mlp", "embed_dim": 16, "hidden_dim": 16}
    del cfg["run"]["dir"]
    cfg["tune"] = {"space": space or {"train.lr": "loguniform(1e-3, 3e-2)", "model.kind": ["mlp", "textcnn"],
                                      "model.embed_dim": "int(8, 24, log)"},
                   "dir": str(tmp_path / "search"), **tune}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def _trials(tune_dir):
    study = optuna.load_study(study_name="danlu", storage=f"sqlite:///{tune_dir / 'study.db'}")
    return study.get_trials()


def test_a_search_of_three_trials_makes_runs_a_study_and_a_report(tmp_path, one_thread):
    from danlu.jobs.tune import tune
    from danlu.runs import load_run

    result = tune(_search_config(tmp_path), trials=3, say=lambda m: None)
    tune_dir = tmp_path / "search"
    trials = _trials(tune_dir)
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:  # each trial is an ordinary run directory, trained with the values drawn for it
        run = load_run(tune_dir / f"trial_{t.number:03d}")
        assert run.cfg.model.kind == t.params["model.kind"] and run.cfg.train.lr == t.params["train.lr"]
        assert run.cfg.model.embed_dim == t.params["model.embed_dim"]
        assert 1e-3 <= t.params["train.lr"] <= 3e-2 and 8 <= t.params["model.embed_dim"] <= 24
        assert run.metrics["val"]["accuracy"] == pytest.approx(t.value)  # the objective: the run's validation score
        assert (tune_dir / f"trial_{t.number:03d}" / "report.html").exists()
        assert "tune" not in yaml.safe_load((tune_dir / f"trial_{t.number:03d}" / "config.yaml").read_text())
    best = max(trials, key=lambda t: t.value)
    assert result["best"]["number"] == best.number and result["best"]["value"] == best.value
    summary = json.loads((tune_dir / "tune.json").read_text(encoding="utf-8"))
    assert summary["best"]["run"] == f"trial_{best.number:03d}" and summary["counts"]["complete"] == 3
    html = (tune_dir / "report.html").read_text(encoding="utf-8")
    assert f'<a href="trial_{best.number:03d}/report.html">' in html  # the best run, linked
    for t in trials:
        assert f"trial_{t.number:03d}/report.html" in html
    for png in ("history", "trials"):
        assert (tune_dir / "plots" / f"{png}.png").stat().st_size > 1000
    assert "parameter importance" in html.lower()
    markdown = (tune_dir / "report.md").read_text(encoding="utf-8")
    for kind in {t.params["model.kind"] for t in trials}:  # the best of each kind drawn, with its run
        top = max((t for t in trials if t.params["model.kind"] == kind), key=lambda t: t.value)
        assert f"| {kind} | " in markdown and f"[trial_{top.number:03d}](trial_{top.number:03d}/report.html) | " \
            f"{top.value:.4f}" in markdown


@pytest.mark.parametrize("key, spec, words", [
    ("train.lr", "loguniform(0, 1e-2)", ["tune.space.train.lr", "log scale needs low > 0"]),
    ("train.lr", "logunifrom(1e-4, 1e-2)", ["tune.space.train.lr", "loguniform(low, high)", "'logunifrom(1e-4, 1e-2)'"]),
    ("train.lr", "uniform(1e-2)", ["tune.space.train.lr", "uniform(low, high)"]),
    ("train.lr", 0.01, ["tune.space.train.lr", "a list of choices"]),
    ("train.lr", [], ["tune.space.train.lr", "non-empty list"]),
    ("train.lrr", "uniform(0.1, 0.2)", ["tune.space.train.lrr", "did you mean 'lr'"]),
    ("train.epochs", "uniform(1, 3)", ["tune.space.train.epochs", "integer", "int(low, high)"]),
    ("train.optimizer", ["adam", "adamm"], ["tune.space.train.optimizer", "did you mean 'adam'"]),
    ("model.dropout", "uniform(0, 1.5)", ["tune.space.model.dropout", "in [0, 1)"]),
    ("model.num_heads", [2, 4], ["tune.space.model.num_heads", "no model kind searched (mlp)"]),
    ("model.kind", ["mlp", "lstn"], ["tune.space.model.kind", "'lstn'", "lstm"]),
    ("model.textcnn.num_filters", [8], ["tune.space.model.textcnn.num_filters", "not among the kinds searched"]),
    ("run.dir", ["a", "b"], ["tune.space.run.dir", "run.seed is the only run key"]),
    ("data.tokenizer", [1], ["tune.space.data.tokenizer", "is a section"]),
    ("train.textcnn.lr", [0.01], ["tune.space.train.textcnn.lr", "'textcnn' is neither a train key nor",
                                  "among the kinds searched (mlp)"]),
    ("train.mlp.lrr", [0.01], ["tune.space.train.mlp.lrr", "did you mean 'lr'"]),
    ("data.mlp.tokenizer.vocab_sise", [600], ["tune.space.data.mlp.tokenizer.vocab_sise", "did you mean 'vocab_size'"]),
    ("data.lstm.max_length", [64], ["tune.space.data.lstm.max_length", "neither a data key nor among the kinds"]),
    ("train.mlp.optimizer", [["adam"]], ["tune.space.train.mlp.optimizer", "['adam']"]),
    ("model.embed_dim", [[16], "[16]"], ["tune.space.model.embed_dim", "listed twice"]),
    ("model.embed_dim", [{1, 2}], ["tune.space.model.embed_dim", "lists and mappings"]),
])
def test_a_bad_space_entry_is_a_clear_config_error(tmp_path, key, spec, words):
    path = _search_config(tmp_path, space={key: spec})
    with pytest.raises(ConfigError) as e:
        config.load(path)
    for w in words:
        assert w in str(e.value)
    assert str(path) in str(e.value)


def test_the_cli_refuses_a_bad_space_before_any_trial(tmp_path, capsys):
    from danlu.cli import main

    path = _search_config(tmp_path, space={"model.embed_dim": "int(8, 24, lg)"})
    assert main(["tune", str(path), "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: tune.space.model.embed_dim: expected int(low, high, log)") and "Traceback" not in err
    assert not (tmp_path / "search").exists()
    with pytest.raises(ConfigError, match=r"tune.metric: unknown metric 'f1' for task classification; expected one of: "
                                          r"loss, accuracy"):
        config.load(path, ["tune.space={train.lr: [0.01]}", "tune.metric=f1"])


def test_model_keys_are_drawn_only_for_the_kinds_that_have_them(tmp_path):
    """model.FIELD is drawn for the kinds that have the field, model.KIND.FIELD for that kind only; the base
    config's keys of another kind are left out of a trial (the base is lstm with hidden_dim and bidirectional)."""
    from danlu.jobs.tune import Search, sample, trial_config

    space = {"model.kind": ["lstm", "textcnn", "transformer"], "model.hidden_dim": [8, 16],
             "model.textcnn.num_filters": "int(4, 12)", "model.transformer.num_heads": [2, 4], "model.embed_dim": [16, 32]}
    raw = {"model": {"kind": "lstm", "hidden_dim": 32, "bidirectional": True}, "data": {"train": "x.csv"}}
    search = Search(str(tmp_path), raw, config.parse_space(space), "val_accuracy", True, config.TuneConfig(space=space))
    drawn = {}
    for kind, extra in (("lstm", {"model.hidden_dim": 8}), ("textcnn", {"model.textcnn.num_filters": 5}),
                        ("transformer", {"model.transformer.num_heads": 4})):
        trial = optuna.trial.FixedTrial({"model.kind": kind, "model.embed_dim": 16, **extra})
        drawn[kind] = sample(trial, search)
        cfg = trial_config(search, drawn[kind], str(tmp_path / kind))
        assert cfg.model.kind == kind and cfg.run.dir == str(tmp_path / kind) and cfg.model.embed_dim == 16
    assert drawn["lstm"] == {"model.kind": "lstm", "model.hidden_dim": 8, "model.embed_dim": 16}
    assert drawn["textcnn"] == {"model.kind": "textcnn", "model.num_filters": 5, "model.embed_dim": 16}
    assert drawn["transformer"] == {"model.kind": "transformer", "model.num_heads": 4, "model.embed_dim": 16}
    assert trial_config(search, drawn["lstm"], "r").model.bidirectional is True  # the base's own kind keeps them


def test_train_and_data_keys_per_kind_and_list_choices(tmp_path):
    """train.KIND.KEY (and data.KIND.KEY) is drawn only for that kind and wins over train.KEY there; a choice may
    be a list, which
    the study holds as its JSON text and the trial's config receives as the list."""
    from danlu.jobs.tune import Search, sample, trial_config

    space = {"model.kind": ["lstm", "ngram"], "train.lr": "loguniform(1e-4, 1e-2)", "train.ngram.lr": [0.01, 0.02],
             "train.ngram.schedule": ["linear"], "train.ngram.early_stopping.patience": [1],
             "model.ngram.ngrams": [[1, 2], [1, 2, 3]], "data.ngram.tokenizer.vocab_size": [600]}
    raw = {"model": {"kind": "lstm", "hidden_dim": 32}, "data": {"train": "x.csv"},
           "train": {"lr": 0.001, "schedule": "cosine", "epochs": 3}}
    params = config.parse_space(space)
    assert {p.key: p.labels for p in params if p.kind == "categorical"}["model.ngram.ngrams"] == ("[1, 2]", "[1, 2, 3]")
    search = Search(str(tmp_path), raw, params, "val_accuracy", True, config.TuneConfig(space=space))
    ngram = sample(optuna.trial.FixedTrial({"model.kind": "ngram", "train.ngram.lr": 0.02, "train.lr": 5e-4,
                                            "train.ngram.schedule": "linear", "train.ngram.early_stopping.patience": 1,
                                            "model.ngram.ngrams": "[1, 2, 3]", "data.ngram.tokenizer.vocab_size": 600}),
                   search)
    assert ngram == {"model.kind": "ngram", "train.lr": 0.02, "train.schedule": "linear",
                     "train.early_stopping.patience": 1, "model.ngrams": [1, 2, 3], "data.tokenizer.vocab_size": 600}
    cfg = trial_config(search, ngram, str(tmp_path / "n"))
    assert cfg.model.ngrams == (1, 2, 3) and cfg.train.lr == 0.02 and cfg.train.schedule == "linear"
    assert cfg.train.early_stopping.patience == 1 and cfg.train.epochs == 3  # the rest: the base's
    assert cfg.data.tokenizer.vocab_size == 600
    lstm = sample(optuna.trial.FixedTrial({"model.kind": "lstm", "train.lr": 5e-4}), search)
    assert lstm == {"model.kind": "lstm", "train.lr": 5e-4}
    cfg = trial_config(search, lstm, str(tmp_path / "l"))
    assert cfg.train.lr == 5e-4 and cfg.train.schedule == "cosine" and cfg.data.tokenizer.vocab_size != 600
    ngrams = next(p for p in params if p.key == "model.ngram.ngrams")
    assert ngrams.value("[1, 2]") == [1, 2]
    with pytest.raises(ConfigError, match=r"tune.space.model.ngram.ngrams: '\[1, 3\]' is not one of its choices"):
        ngrams.value("[1, 3]")  # a study of another space (refused before any trial: _check_same_search)


def test_a_search_with_list_choices_and_per_kind_train_keys(tmp_path, one_thread):
    """End to end: the list choice reaches the trial's run, the study and the report show it as [1, 2, 3]."""
    from danlu.jobs.tune import tune
    from danlu.runs import load_run

    path = _search_config(tmp_path, model={"kind": "ngram", "embed_dim": 8, "buckets": 1024},
                          space={"model.ngrams": [[1], [1, 2, 3]], "train.ngram.epochs": [1],
                                 "train.ngram.lr": "loguniform(0.01, 0.05)"}, sampler="random", seed=0)
    tune(path, trials=3, say=lambda m: None)
    trials = _trials(tmp_path / "search")
    assert {t.params["model.ngrams"] for t in trials} == {"[1]", "[1, 2, 3]"}, "the seeded sampler drew both"
    for t in trials:
        run = load_run(tmp_path / "search" / f"trial_{t.number:03d}")
        assert list(run.cfg.model.ngrams) == json.loads(t.params["model.ngrams"])
        assert run.cfg.train.epochs == 1 and run.cfg.train.lr == t.params["train.ngram.lr"]
        assert run.metrics["epochs_run"] == 1
    markdown = (tmp_path / "search" / "report.md").read_text(encoding="utf-8")
    assert "[1, 2, 3]" in markdown and "train.ngram.lr" in markdown


def test_pruning_stops_a_trial_that_falls_below_the_threshold(tmp_path, one_thread):
    """A learning rate of 1e-6 cannot reach 0.9 validation accuracy after one epoch: the threshold pruner stops
    those trials after their first epoch, while the trials at 0.05 reach it and complete."""
    from danlu.jobs.tune import tune

    path = _search_config(tmp_path, space={"train.lr": [1e-6, 0.05]}, sampler="random", seed=1, pruner="threshold",
                          threshold=0.9, warmup_epochs=1)
    result = tune(path, ["train.epochs=3"], trials=4, say=lambda m: None)
    trials = _trials(tmp_path / "search")
    lrs = {t.params["train.lr"] for t in trials}
    assert lrs == {1e-6, 0.05}, "the seeded sampler drew both rates"
    for t in trials:
        history = (tmp_path / "search" / f"trial_{t.number:03d}" / "history.jsonl").read_text().splitlines()
        if t.params["train.lr"] == 1e-6:
            assert t.state.name == "PRUNED" and len(history) == 1 and t.intermediate_values[1] < 0.9
        else:
            assert t.state.name == "COMPLETE" and len(history) == 3 and t.value >= 0.9
    assert result["counts"]["pruned"] == sum(t.params["train.lr"] == 1e-6 for t in trials)


def _states(db):
    """The trials' states as the study file holds them (read with sqlite3: what any reader of the file sees)."""
    try:
        with sqlite3.connect(db) as con:
            return [row[0] for row in con.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.OperationalError:  # the study's tables are still being made
        return []


def test_a_killed_search_resumes_without_repeating_finished_trials(tmp_path):
    path = _search_config(tmp_path, rows=800, space={"train.lr": "loguniform(1e-3, 3e-2)",
                                                      "model.hidden_dim": [8, 16, 32]}, pruner="none")
    tune_dir = tmp_path / "search"
    cmd = [sys.executable, "-m", "danlu", "tune", str(path), "--trials", "2", "train.epochs=3", "model.kind=lstm"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # the first trial finished and the second one started
        states = _states(tune_dir / "study.db") if (tune_dir / "study.db").exists() else []
        if states[:1] == ["COMPLETE"] and len(states) > 1 and (tune_dir / "trial_001" / "config.yaml").exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _states(tune_dir / "study.db") == ["COMPLETE", "RUNNING"], "the second trial finished before the kill"
    first = (tune_dir / "trial_000" / "model.safetensors").stat().st_mtime_ns
    before = _trials(tune_dir)

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "interrupted trial(s) 1 marked failed and re-run" in resumed.stderr
    trials = _trials(tune_dir)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]  # two finished, as asked
    assert trials[0].params == before[0].params and trials[0].value == before[0].value
    assert (tune_dir / "trial_000" / "model.safetensors").stat().st_mtime_ns == first  # not trained again
    assert trials[1].user_attrs["interrupted"] and trials[2].user_attrs["rerun_of"] == 1
    assert trials[2].params == before[1].params  # the killed trial's values, run again
    assert not (tune_dir / "trial_001" / "model.safetensors").exists()
    assert all((tune_dir / f"trial_{n:03d}" / "model.safetensors").exists() for n in (0, 2))
    summary = json.loads((tune_dir / "tune.json").read_text(encoding="utf-8"))
    assert summary["counts"] == {"complete": 2, "pruned": 0, "failed": 1}
    assert "failed (interrupted; run again)" in (tune_dir / "report.md").read_text(encoding="utf-8")
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)  # nothing is left to do
    assert again.returncode == 0 and len(_trials(tune_dir)) == 3


def test_a_continued_search_draws_new_values(tmp_path, one_thread):
    """Raising --trials continues the search; the resumed sampler does not start its seeded draws over (it would
    repeat the first trials' values while the sampler is still drawing at random)."""
    from danlu.jobs.tune import tune

    for sampler in ("random", "tpe"):
        path = _search_config(tmp_path, rows=120, space={"train.lr": "loguniform(1e-3, 3e-2)"}, sampler=sampler,
                              dir=str(tmp_path / sampler))
        tune(path, ["train.epochs=1"], trials=2, say=lambda m: None)
        tune(path, ["train.epochs=1"], trials=4, say=lambda m: None)
        lrs = [t.params["train.lr"] for t in _trials(tmp_path / sampler)]
        assert len(lrs) == 4 and len(set(lrs)) == 4, lrs


def test_parallel_trials_share_the_free_cores(tmp_path, monkeypatch):
    from danlu.jobs import tune as tune_mod

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(tune_mod, "free_cores", lambda limit=8: 8)
    assert tune_mod.threads_per_trial(0, 2) == 4 and tune_mod.threads_per_trial(0, 3) == 2
    assert tune_mod.threads_per_trial(0, 16) == 1 and tune_mod.threads_per_trial(0, 1) == 0  # one trial: as train
    assert tune_mod.threads_per_trial(3, 2) == 3  # train.threads, when set, is the user's
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert tune_mod.threads_per_trial(0, 2) == 1


def test_two_trials_at_once_in_processes(tmp_path):
    path = _search_config(tmp_path, rows=200, space={"train.lr": "loguniform(1e-3, 3e-2)"})
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-m", "danlu", "tune", str(path), "--trials", "2", "--jobs", "2"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "2 trials at once" in done.stderr
    trials = _trials(tmp_path / "search")
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for t in trials:
        threads = config.load(tmp_path / "search" / f"trial_{t.number:03d}").train.threads
        assert 1 <= threads <= max(1, usable // 2)  # never more than a half of the cores each
