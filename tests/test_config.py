import pytest
import yaml

from danlu import config
from danlu.registry import ConfigError


def test_load_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"kind": "lstm", "hidden_dim": 64}, "train": {"epochs": 5}}))
    cfg = config.load(path, ["train.epochs=3", "train.lr=1e-3", "data.train=my.csv", "run.dir=runs/x"])
    assert cfg.train.epochs == 3
    assert cfg.train.lr == pytest.approx(1e-3)  # YAML reads 1e-3 as a string; the float field converts it
    assert cfg.model.hidden_dim == 64 and cfg.model.kind == "lstm"
    assert cfg.data.train == "my.csv" and cfg.run.dir == "runs/x"
    assert cfg.data.text_column == "text" and cfg.data.label_column == "label"


def test_frozen():
    cfg = config.load({"run": {"dir": "runs/x"}})
    with pytest.raises(Exception):
        cfg.train.epochs = 3


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.epoch=3", ["train", "'epoch'", "did you mean 'epochs'", "batch_size"]),
        ("train.epochs=three", ["train.epochs", "expected an integer", "three"]),
        ("train.optimizer_x=adam", ["unknown key"]),
        ("model.kind=resnet9000", ["model.kind", "resnet9000", "lstm", "mlp"]),
        ("model.hidden=3", ["model", "'hidden'", "hidden_dim"]),
        ("train.bucket=maybe", ["train.bucket", "true or false"]),
        ("tasks=classification", ["top level", "'tasks'"]),
        ("task=detection", ["task", "classification", "regression"]),
    ],
)
def test_bad_keys_and_types_name_the_key(tmp_path, override, words):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  kind: lstm\n")
    with pytest.raises(ConfigError) as e:
        config.load(path, [override])
    for w in words:
        assert w in str(e.value)
    assert str(path) in str(e.value)


def test_dump_round_trip(tmp_path):
    cfg = config.load({"run": {"dir": "runs/x"}, "model": {"kind": "mlp", "hidden_dim": 32}, "train": {"log": ["tensorboard"]}})
    path = tmp_path / "config.yaml"
    path.write_text(config.dump(cfg))
    again = config.load(path)
    assert again == cfg


def test_default_run_dir_never_reuses_a_full_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "seed").mkdir(parents=True)
    (tmp_path / "runs" / "seed" / "model.safetensors").write_text("x")
    path = tmp_path / "seed.yaml"
    path.write_text("model:\n  kind: lstm\n")
    assert config.load(path).run.dir == "runs/seed-2"
