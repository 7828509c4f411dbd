"""danlu.runs: the run directory is made without losing the run that was there; every kind of run is read
from its files alone."""
import os

import pytest

import danlu
from danlu.data import DataError
from danlu.registry import ConfigError
from danlu.runs import RunDirectory, layout, run_kind

from conftest import tiny_config


def test_overwrite_with_bad_data_keeps_the_old_run(tmp_path, reviews_csv):
    """--overwrite used to delete the old run before the new data was read: a wrong data.train left it empty."""
    cfg = tiny_config(reviews_csv, tmp_path / "run", train={"epochs": 1})
    danlu.train(cfg)
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("model.safetensors", "metrics.json")}
    bad = tiny_config(str(tmp_path / "missing.csv"), tmp_path / "run", train={"epochs": 1})
    with pytest.raises((DataError, ConfigError), match="missing.csv"):
        danlu.train(bad, overwrite=True)
    after = {name: (tmp_path / "run" / name).read_bytes() for name in before}
    assert after == before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".run.replaced")] == []  # nothing left aside


def test_a_run_that_cannot_start_leaves_no_directory(tmp_path):
    """A half-made run directory would block the corrected command ("already exists")."""
    bad = tiny_config(str(tmp_path / "missing.csv"), tmp_path / "run", train={"epochs": 1})
    with pytest.raises((DataError, ConfigError)):
        danlu.train(bad)
    assert not (tmp_path / "run").exists()


def test_overwrite_replaces_the_run_once_it_starts(tmp_path, reviews_csv):
    cfg = tiny_config(reviews_csv, tmp_path / "run", train={"epochs": 1})
    danlu.train(cfg)
    (tmp_path / "run" / "stale.txt").write_text("from the old run")
    danlu.train(cfg, overwrite=True)
    assert not (tmp_path / "run" / "stale.txt").exists()
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".run.replaced")] == []


def test_run_directory_abandon_and_started(tmp_path):
    old = tmp_path / "r"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"old")
    with pytest.raises(ConfigError, match="already exists"):
        RunDirectory(old)
    directory = RunDirectory(old, overwrite=True)
    assert os.listdir(old) == []  # the new run starts empty
    (old / "config.yaml").write_text("new")
    directory.abandon()
    assert os.listdir(old) == ["model.safetensors"] and (old / "model.safetensors").read_bytes() == b"old"
    directory = RunDirectory(old, overwrite=True)
    directory.started()
    assert sorted(os.listdir(tmp_path)) == ["r"]
    (old / "keep").write_text("x")
    resumed = RunDirectory(old, resume=True)
    resumed.abandon()  # a resumed run is never removed
    assert (old / "keep").exists()
    with pytest.raises(ConfigError, match="names a file"):
        RunDirectory(tmp_path / "r" / "keep")


def test_run_kind_from_files(tmp_path):
    assert run_kind(tmp_path) == "plain"
    (tmp_path / layout.COMPRESSION).write_text("{}")
    assert run_kind(tmp_path) == "compressed"
    (tmp_path / layout.ADAPTER).write_bytes(b"")
    assert run_kind(tmp_path) == "adapter"
    (tmp_path / layout.WEIGHTS).write_bytes(b"")
    assert run_kind(tmp_path) == "compressed"  # a merged LoRA run that was then compressed


def test_run_files_respect_the_umask(tmp_path, reviews_csv):
    """mkstemp's 0600 made reports and weights unreadable to teammates; files get 0666 less the umask."""
    old = os.umask(0o022)
    try:
        run = danlu.train(tiny_config(reviews_csv, tmp_path / "run", train={"epochs": 1}))
    finally:
        os.umask(old)
    for name in ("config.yaml", "metrics.json", "model.safetensors", "report.md", "history.jsonl"):
        assert os.stat(os.path.join(run.path, name)).st_mode & 0o777 == 0o644, name
    os.umask(0o077)
    try:
        from danlu.files import atomic_write_text

        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "private.txt").st_mode & 0o777 == 0o600


def test_thread_count_is_chosen_from_free_cores_and_said(tmp_path, reviews_csv, capsys, monkeypatch, one_thread):
    """torch's default (every core) made the README's job 7x slower on a 2-core machine with another job
    running; the count is chosen from the cores that are free, or given as train.threads, and said."""
    import torch

    from danlu.jobs.skeleton import free_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    assert free_cores() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert free_cores() == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert free_cores() == 1  # never fewer than one
    danlu.train(tiny_config(reviews_csv, tmp_path / "auto", train={"epochs": 1}))
    assert torch.get_num_threads() == 1
    assert "threads: 1 (2 cores, load 5.0" in capsys.readouterr().err
    danlu.train(tiny_config(reviews_csv, tmp_path / "two", train={"epochs": 1, "threads": 2}))
    assert torch.get_num_threads() == 2
    assert "threads: 2 (train.threads)" in capsys.readouterr().err
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    danlu.train(tiny_config(reviews_csv, tmp_path / "env", train={"epochs": 1}))
    assert torch.get_num_threads() == 1 and "threads: 1 (OMP_NUM_THREADS)" in capsys.readouterr().err


def test_resume_of_a_finished_run_says_so(tmp_path, reviews_csv, capsys):
    cfg = tiny_config(reviews_csv, tmp_path / "run", train={"epochs": 1})
    danlu.train(cfg)
    capsys.readouterr()
    danlu.train(str(tmp_path / "run"), resume=True)
    assert "finished already: nothing is left to train" in capsys.readouterr().err
    danlu.train(str(tmp_path / "run"), "train.epochs=2", resume=True)  # more epochs asked: it trains on
    err = capsys.readouterr().err
    assert "finished already" not in err and "epoch 2" in err
