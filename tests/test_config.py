import re

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


BAD_KEYS_AND_TYPES = [  # an override, and words its error must contain
    ("train.epoch=3", ["train", "'epoch'", "did you mean 'epochs'", "batch_size"]),
    ("train.epochs=three", ["train.epochs", "expected an integer", "three"]),
    ("train.optimizer_x=adam", ["unknown key"]),
    ("model.kind=resnet9000", ["model.kind", "resnet9000", "lstm", "mlp"]),
    ("model.hidden=3", ["model", "'hidden'", "hidden_dim"]),
    ("train.bucket=maybe", ["train.bucket", "true or false"]),
    ("tasks=classification", ["top level", "'tasks'"]),
    ("task=detection", ["task", "classification", "regression"]),
]


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


# ------------------------------------------------------------------------------- choices and ranges


CHOICES_AND_RANGES = [
    ("train.precision=fp16", ["train.precision", "'fp16'", "did you mean 'bf16'", "fp32, bf16, auto"]),
    ("train.optimizer=adamm", ["train.optimizer", "'adamm'", "did you mean 'adam'", "sgd, momentum, adam, adamw"]),
    ("train.schedule=cosin", ["train.schedule", "did you mean 'cosine'"]),
    ("train.device=gpu", ["train.device", "'gpu'", "auto, cpu, cuda"]),
    ("train.distributed=dpp", ["train.distributed", "did you mean 'ddp'"]),
    ("train.log=[tensorbord]", ["train.log[0]", "did you mean 'tensorboard'"]),
    ("data.on_bad_rows=skipp", ["data.on_bad_rows", "error, skip"]),
    ("data.tokenizer.kind=sentencepiece", ["data.tokenizer.kind", "char, bpe, wordpiece, imported"]),
    ("finetune.method=adapters", ["finetune.method", "full, lora, freeze"]),
    ("finetune.save=merge", ["finetune.save", "did you mean 'merged'"]),
    ("finetune.pooling=maen", ["finetune.pooling", "did you mean 'mean'", "'', cls, mean, last"]),
    ("model.pooling=avg", ["model.pooling", "'avg'", "last, mean, max"]),
    ("train.epochs=0", ["train.epochs", "expected an integer >= 1, got 0"]),
    ("train.epochs=-1", ["train.epochs", ">= 1", "-1"]),
    ("train.lr=-1", ["train.lr", "expected a number > 0, got -1"]),
    ("data.val_fraction=1", ["data.val_fraction", "in [0, 1)", "got 1.0"]),
    ("data.encoding=klingon", ["data.encoding", "unknown encoding 'klingon'"]),
] + [  # the model families' own choices and ranges, and those of the Transformer fields they share
    (f"model.kind={kind} {override}", words)
    for kind, cases in {
        "seq2seq": {"model.norm=batchnorm": ["model.norm", "'batchnorm'", "layernorm, rmsnorm"],
                    "model.mlp=relu": ["model.mlp", "gelu, gelu_tanh, swiglu"],
                    "model.encoder_layers=0": ["model.encoder_layers", "expected an integer >= 1, got 0"],
                    "model.dropout=1.5": ["model.dropout", "in [0, 1)"]},
        "vit": {"model.norm=layer_norm": ["model.norm", "did you mean 'layernorm'"],
                "model.grid=0": ["model.grid", ">= 1"], "model.patch_size=-1": ["model.patch_size", ">= 0"]},
        "cnn": {"model.pooling=max": ["model.pooling", "'max'", "avg, flatten"],
                "model.channels=[32,0]": ["model.channels[1]", ">= 1"],
                "model.kernel_size=4": ["model.kernel_size", "an odd number, got 4"]},
        "bert": {"model.norm_eps=0": ["model.norm_eps", "> 0"]},
        "transformer": {"model.embed_dim=130": ["model.embed_dim (130) must be divisible by model.num_heads (4)"]},
        "gpt": {"model.num_kv_heads=4": ["model.num_heads (6) must be divisible by model.num_kv_heads (4)"]},
    }.items()
    for override, words in cases.items()
] + [  # the key, and the bound the error states
    (override, [override.split("=")[0], bound])
    for bound, overrides in {
        ">= 1": ["train.batch_size=0", "train.grad_accum=0", "data.tokenizer.max_length=0", "model.hidden_dim=0",
                 "finetune.lora_r=0", "finetune.max_length=0"],
        ">= 0": ["train.max_steps=-5", "train.warmup_steps=-1", "train.early_stopping.patience=-1"],
        "> 0": ["train.lr=0"],
        "in [0, 1)": ["train.momentum=1.5", "data.test_fraction=-0.1", "model.dropout=1", "finetune.lora_dropout=1.2"],
    }.items()
    for override in overrides
]


@pytest.mark.parametrize("override, words", BAD_KEYS_AND_TYPES + CHOICES_AND_RANGES)
def test_a_bad_value_fails_at_load_naming_the_key(tmp_path, override, words):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  kind: lstm\n")
    with pytest.raises(ConfigError) as e:
        config.load(path, override.split())  # one override, or the model kind and one
    for w in words:
        assert w in str(e.value)
    assert str(path) in str(e.value)


def test_held_out_fractions_leave_something_to_train_on():
    with pytest.raises(ConfigError, match=r"data.val_fraction \+ data.test_fraction: expected less than 1.*0.5 \+ 0.5"):
        config.load({"data": {"val_fraction": 0.5, "test_fraction": 0.5}})
    assert config.load({"data": {"val_fraction": 0.5, "test_fraction": 0.4}}).data.val_fraction == 0.5


@pytest.mark.parametrize("override, key", [("model.kernel_sizes=[3,0]", "model.kernel_sizes[1]"),
                                           ("model.num_filters=0", "model.num_filters")])
def test_model_ranges_inside_lists(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"{key}: expected an integer >= 1")):
        config.load({"model": {"kind": "textcnn"}}, [override])


def test_a_bad_value_fails_before_data_is_read_or_a_run_directory_is_made(tmp_path, capsys):
    from danlu.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"kind": "lstm"}, "data": {"train": str(tmp_path / "missing.csv")}}))
    for override in ("train.precision=fp16", "train.optimizer=adamm", "train.epochs=0", "train.lr=-1",
                     "train.batch_size=0"):
        assert main(["train", str(path), override, f"run.dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: {override.split('=')[0]}: ") and "Traceback" not in err
        assert not (tmp_path / "run").exists()


def test_registries_match_the_choices_the_schema_allows():
    """Each choice field names the entries of the table that dispatches on it: adding an optimizer,
    schedule, tokenizer, logger, distributed mode or task means adding it to both, or this fails."""
    import typing

    from danlu.data.tokenizer import KINDS
    from danlu.evaluate.tracking import LOGGERS
    from danlu.schema import choices
    from danlu.training.distributed import MODES
    from danlu.training.optim import OPTIMIZERS, SCHEDULES

    hints = typing.get_type_hints(config.TrainConfig, include_extras=True)
    assert set(choices(hints["optimizer"])) == set(OPTIMIZERS)
    assert set(choices(hints["schedule"])) == set(SCHEDULES)
    assert set(choices(hints["distributed"])) == set(MODES)
    assert set(choices(typing.get_args(hints["log"])[0])) == set(LOGGERS)
    assert set(choices(typing.get_type_hints(config.TokenizerConfig)["kind"])) == set(KINDS) | {"imported"}
    with pytest.raises(ConfigError, match="data.tokenizer.kind: imported means the tokenizer of finetune.base"):
        config.load({"data": {"tokenizer": {"kind": "imported"}}})
    fine_tuned = config.load({"data": {"tokenizer": {"kind": "imported"}}, "finetune": {"base": "runs/x"}})
    assert fine_tuned.data.tokenizer.kind == "imported"  # what a fine-tuned run records, loaded back


def _config_classes():
    from danlu.models import MODELS

    return list(config.SECTIONS.values()) + [config.TokenizerConfig, config.EarlyStopping] + \
        [entry[0] for entry in MODELS.values()]


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_every_default_satisfies_its_own_schema(cls):
    import dataclasses

    instance = cls()
    again = config._make(cls, dataclasses.asdict(instance), "x")
    assert again == instance


# ------------------------------------------------------------------------------- shipped configs

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.y*ml"))


def test_the_shipped_configs_are_found():
    assert len(SHIPPED) >= 10 and "configs/seed_lstm.yaml" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_and_names_data_that_exists(name, monkeypatch):
    """Every YAML file under configs/ (at any depth) loads and validates, and names data that exists: a
    file in the repository, or a built-in data set; a fine-tuning base is a package or another config's run."""
    from danlu.data.builtin import CLASSIFICATION_DATASETS
    from danlu.data.corpus import CORPORA

    monkeypatch.chdir(ROOT)
    cfg = config.load(name, fresh_dir=False)
    from danlu.data.images import IMAGE_DATASETS
    from danlu.data.seq2seq import SEQ2SEQ_DATASETS

    builtin = CORPORA if cfg.task in ("causal_lm", "masked_lm") and not cfg.finetune.base else CLASSIFICATION_DATASETS
    builtin = {**builtin, **IMAGE_DATASETS, **SEQ2SEQ_DATASETS}
    for split in ("train", "val", "test"):
        source = getattr(cfg.data, split)
        assert not source or source in builtin or (ROOT / source).exists(), f"{name}: data.{split}={source}"
    base = cfg.finetune.base
    if base and not base.startswith("pkg:"):
        assert base in {f"runs/{p.rsplit('/', 1)[-1].rsplit('.', 1)[0]}" for p in SHIPPED}, f"{name}: finetune.base={base}"
