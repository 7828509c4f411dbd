"""Model compression: quantization, pruning and distillation, each a function from a model to a model,
chained by a recipe into a new run directory that ends with a before/after scorecard.

    danlu compress runs/transformer_zh_sentiment --recipe int8
    danlu compress runs/transformer_zh_sentiment --recipe prune-30 --out runs/pruned
    danlu compress runs/transformer_zh_sentiment --recipe my_recipe.yaml   # steps: [{kind: ...}, ...]

A recipe is a list of steps, applied in order:

    {kind: quantize, method: dynamic_int8, layers: [linear, lstm], skip: [], scheme: per_tensor | per_channel}
    {kind: quantize, method: weight_only, bits: 8 | 4, group_size: 64, skip: []}
    {kind: quantize, method: static_int8, calibration_batches: 16}   # CNNs: int8 convolutions
    {kind: prune, method: magnitude, amount: 0.5, scope: global | layer}
    {kind: prune, method: structured, heads: 0.25, ffn: 0.5, channels: 0.0}
    {kind: finetune, epochs: 1, lr: 0.0}           # recovery fine-tune (0: half the run's lr)
    {kind: distill, student: {kind: transformer, ...}, epochs: 3, temperature: 2.0, alpha: 0.5, lr: 0.0}

The new run directory is an ordinary run plus `compression.json` (danlu.runs.compressed), so evaluate,
predict, serve and export take it as they take any other. A distilled run's config.yaml names the student
model; a chat run keeps its chat template. A recipe that fails leaves no directory behind (and, with
--overwrite, the run it would have replaced).

>>> run = compress_run("runs/transformer_zh_sentiment", "int8")   # doctest: +SKIP
>>> print(open(run.path + "/scorecard.md").read())                # doctest: +SKIP
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import sys

import torch

from danlu.models.lora import merge_lora
from danlu.registry import ConfigError
from danlu.runs import RunDirectory, layout, load_run
from danlu.runs.compressed import read_record, save_compressed

STUDENTS = {  # presets are data: small student models for zh_sentiment-sized text classification
    "transformer": {"kind": "transformer", "embed_dim": 32, "num_heads": 2, "num_layers": 1, "intermediate_dim": 64,
                    "dropout": 0.1, "max_positions": 256},
    "textcnn": {"kind": "textcnn", "embed_dim": 32, "kernel_sizes": [3, 4, 5], "num_filters": 64, "dropout": 0.5},
    "lstm": {"kind": "lstm", "embed_dim": 32, "hidden_dim": 64},
}

RECIPES = {
    "int8": [{"kind": "quantize", "method": "dynamic_int8"}],
    "int8-per-channel": [{"kind": "quantize", "method": "dynamic_int8", "scheme": "per_channel"}],
    "static-int8": [{"kind": "quantize", "method": "static_int8"}],
    "woq-int8": [{"kind": "quantize", "method": "weight_only", "bits": 8, "group_size": 64}],
    "woq-int4": [{"kind": "quantize", "method": "weight_only", "bits": 4, "group_size": 32}],
    "distill-transformer": [{"kind": "distill", "student": STUDENTS["transformer"]}],
    "distill-textcnn": [{"kind": "distill", "student": STUDENTS["textcnn"]}],
    "distill-lstm": [{"kind": "distill", "student": STUDENTS["lstm"]}],
}
"""Named recipes; also `prune-N` (heads and feed-forward, N%, + recovery fine-tune), `prune-ffn-N`,
`prune-heads-N`, `prune-channels-N` (TextCNN), `sparse-N` (magnitude, global), `distill-X-int8` chains."""

PATTERNS = [
    (r"prune-(\d+)", lambda n: [{"kind": "prune", "method": "structured", "heads": n, "ffn": n}, {"kind": "finetune"}]),
    (r"prune-ffn-(\d+)", lambda n: [{"kind": "prune", "method": "structured", "ffn": n}, {"kind": "finetune"}]),
    (r"prune-heads-(\d+)", lambda n: [{"kind": "prune", "method": "structured", "heads": n}, {"kind": "finetune"}]),
    (r"prune-channels-(\d+)", lambda n: [{"kind": "prune", "method": "structured", "channels": n}, {"kind": "finetune"}]),
    (r"sparse-(\d+)", lambda n: [{"kind": "prune", "method": "magnitude", "amount": n}]),
]


def parse_recipe(recipe):
    """A recipe name, a YAML file (a list of steps, or {steps: [...]}), a step dict or a list -> list of steps."""
    if isinstance(recipe, dict):
        recipe = recipe.get("steps", [recipe])
    if isinstance(recipe, (list, tuple)):
        steps = [dict(s) for s in recipe]
    elif os.path.isfile(os.fspath(recipe)):
        import yaml

        with open(recipe, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
        return parse_recipe(raw if isinstance(raw, (list, dict)) else [])
    elif recipe in RECIPES:
        steps = [dict(s) for s in RECIPES[recipe]]
    else:
        steps = None
        for part in _chain(recipe):
            found = _named(part)
            if found is None:
                names = ", ".join(list(RECIPES) + ["prune-N", "prune-ffn-N", "prune-heads-N", "prune-channels-N", "sparse-N"])
                raise ConfigError(f"--recipe: unknown recipe {recipe!r}; expected a YAML file of steps or one of: {names} "
                                  f"(chain them with '+', e.g. prune-30+int8)")
            steps = (steps or []) + found
    for i, step in enumerate(steps):
        if step.get("kind") not in STEPS:
            raise ConfigError(f"recipe step {i + 1}: kind {step.get('kind')!r}; expected one of: {', '.join(STEPS)}")
    if not steps:
        raise ConfigError(f"--recipe {recipe!r}: no steps")
    return steps


def _chain(name):
    return str(name).split("+")


def _named(name):
    if name in RECIPES:
        return [dict(s) for s in RECIPES[name]]
    for pattern, make in PATTERNS:
        m = re.fullmatch(pattern, name)
        if m:
            n = int(m.group(1))
            if not 0 <= n < 100:
                raise ConfigError(f"--recipe {name}: the percentage must be in 0..99")
            return make(n / 100)
    return None


# ----------------------------------------------------------------------------------------- steps


def _quantize(model, step, ctx):
    from danlu.compress.quantize import quantize_dynamic_int8, quantize_weights

    method = step.get("method", "dynamic_int8")
    if method == "dynamic_int8":
        step.setdefault("layers", ["linear", "lstm"])
        step.setdefault("skip", [])
        step.setdefault("scheme", "per_tensor")
        return quantize_dynamic_int8(model, tuple(step["layers"]), tuple(step["skip"]), scheme=step["scheme"])
    if method == "weight_only":
        step.setdefault("bits", 8)
        step.setdefault("group_size", 64 if step["bits"] == 8 else 32)
        step.setdefault("skip", [])
        return quantize_weights(model, int(step["bits"]), int(step["group_size"]), tuple(step["skip"]))
    if method == "static_int8":
        from danlu.compress.quantize import quantize_static_int8
        from danlu.data.batching import iterate

        step.setdefault("skip", [])
        n = int(step.setdefault("calibration_batches", 16))
        train = ctx.data().train
        if hasattr(train, "pixels"):  # images: normalised pixel batches
            calibration = [(b["pixel_values"],) for _, b in zip(range(n), train.batches(32, seed=ctx.seed, shuffle=False))]
        else:
            batches = iterate(train, 32, train.pad_id, seed=ctx.seed)  # a random sample of the training data
            calibration = [(b["input_ids"], b["attention_mask"]) for _, b in zip(range(n), batches)]
        return quantize_static_int8(model, calibration, tuple(step["skip"]))
    raise ConfigError(f"quantize method: unknown value {method!r}; expected one of: dynamic_int8, static_int8, weight_only")


def _prune(model, step, ctx):
    from danlu.compress.prune import prune_magnitude, prune_structured, sparsity, structure

    method = step.get("method", "structured")
    if method == "magnitude":
        model = prune_magnitude(model, float(step.get("amount", 0.5)), step.get("scope", "global"))
        step["sparsity"] = sparsity(model)["total"]
    elif method == "structured":
        model = prune_structured(model, float(step.get("heads", 0)), float(step.get("ffn", 0)), float(step.get("channels", 0)))
        step["sizes"] = structure(model)
    else:
        raise ConfigError(f"prune method: unknown value {method!r}; expected one of: magnitude, structured")
    ctx.say(f"prune ({method}): {_count(model):,} parameters" + (f", sparsity {step['sparsity']:.1%}" if "sparsity" in step else ""))
    return model


def _finetune(model, step, ctx):
    """Recovery fine-tune with the run's own task, through the same fit-and-evaluate as every job; zeros from
    magnitude pruning stay zero."""
    from danlu.jobs.skeleton import Plan, fit_and_evaluate

    data = ctx.data()
    cfg = ctx.cfg.train
    epochs = int(step.setdefault("epochs", 1))
    lr = float(step.get("lr") or cfg.lr / 2)
    step["lr"] = lr
    train_cfg = dataclasses.replace(cfg, epochs=epochs, lr=lr, warmup_steps=min(cfg.warmup_steps, 20), device="cpu",
                                    max_steps=int(step.get("max_steps", 0)))
    zeros = {n: p == 0 for n, p in model.named_parameters() if p.dim() > 1 and (p == 0).float().mean() > 0.05}
    torch.manual_seed(ctx.seed)

    @torch.no_grad()
    def keep_zeros(model):
        for n, p in model.named_parameters():
            if n in zeros:
                p.masked_fill_(zeros[n], 0.0)

    plan = Plan(ctx.cfg, model, ctx.task, data.train, data.val)
    _, _, metrics, _ = fit_and_evaluate(plan, train_cfg, seed=ctx.seed, after_fit=keep_zeros)
    step["val"] = metrics["val"]["accuracy"]
    return model.cpu().eval()


def _distill(model, step, ctx):
    from danlu import config as config_mod
    from danlu.compress.distill import distill
    from danlu.models import build_model

    data = ctx.data()
    student = step.get("student") or "transformer"
    student = dict(STUDENTS[student]) if isinstance(student, str) else dict(student)
    step["student"] = student
    raw = config_mod.to_dict(ctx.cfg)
    raw["model"] = student
    cfg = config_mod.load(raw)
    base = cfg.train
    epochs = int(step.setdefault("epochs", base.epochs))
    lr = float(step.get("lr") or base.lr)
    step.update(lr=lr, temperature=float(step.get("temperature", 2.0)), alpha=float(step.get("alpha", 0.5)))
    train_cfg = dataclasses.replace(base, epochs=epochs, lr=lr, device="cpu", max_steps=int(step.get("max_steps", 0)))
    torch.manual_seed(ctx.seed)
    new = build_model(cfg.model, ctx.spec)
    ctx.say(f"distill: teacher {_count(model):,} -> student {cfg.model.kind} {_count(new):,} parameters "
            f"(T={step['temperature']}, alpha={step['alpha']}, {epochs} epochs)")
    student_model = distill(model, new, ctx.labels, data.train, data.val, train_cfg, step["temperature"], step["alpha"], ctx.seed)
    ctx.cfg = cfg
    return student_model.eval()


STEPS = {"quantize": _quantize, "prune": _prune, "finetune": _finetune, "distill": _distill}


def apply_steps(model, steps, ctx):
    """Run the steps in order (each takes a model and returns a model)."""
    for step in steps:
        model = STEPS[step["kind"]](model, step, ctx)
    return model


# ----------------------------------------------------------------------------------------- the verb


class _Context:
    """What steps need besides the model: the run's config, labels, task, and its data (built on first use)."""

    def __init__(self, run, seed, quick, say):
        self.run, self.cfg, self.labels, self.seed, self.quick, self.say = run, run.cfg, run.labels, seed, quick, say
        self.spec = run.spec
        self.task = make_task(run)
        self._data = None

    def data(self):
        if self._data is None:
            self._data = load_data(self.run, self.quick)
        return self._data


def load_data(run, quick=False):
    """The run's train / val / test splits encoded with the run's own tokenizer and label map (pretrained
    language models: the held-out token stream as `test`; chat fine-tunes: their conversations)."""
    from danlu.data import encode_examples, read_splits

    cfg = run.cfg
    if hasattr(run, "preprocess"):  # images, decoded with the run's own preprocessing
        from danlu.jobs.images import image_splits

        return _Data(*image_splits(run, limit=2000 if quick else 0))
    if run.language_model and cfg.finetune.base:  # a chat fine-tune: conversations, in its own template
        from danlu.jobs.finetune import chat_data

        splits = chat_data(cfg, run.tokenizer, run.chat_template)
        held_out = splits.get("test") or splits.get("val") or splits["train"]
        return _Data(splits["train"], splits.get("val") or held_out, held_out)
    if run.language_model:
        from danlu.data.corpus import build_corpus

        corpus = build_corpus(cfg.data, os.path.join(run.path, "data"), cfg.task, run.tokenizer)
        return _Data(corpus.train, corpus.val, corpus.val)
    data_cfg = dataclasses.replace(cfg.data, limit=2000) if quick and not cfg.data.limit else cfg.data
    splits = read_splits(data_cfg, cfg.run.seed, cfg.task == "regression")
    enc = {k: encode_examples(ex, run.tokenizer, run.labels, cfg.task == "regression") for k, ex in splits.items()}
    return _Data(enc["train"], enc["val"], enc["test"])


@dataclasses.dataclass
class _Data:
    train: object
    val: object
    test: object


def compress_run(run_dir, recipe, out=None, *, quick=False, measure=True, overwrite=False, seed=0, say=None):
    """Compress a run with a recipe into a new run directory `out` (default RUN-RECIPE) with a scorecard;
    returns the new Run (loaded back through load_run), with `.scorecard` the scorecard dict."""
    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    run_dir = os.fspath(run_dir).rstrip("/")
    steps = parse_recipe(recipe)
    name = os.path.splitext(os.path.basename(os.fspath(recipe)))[0] if isinstance(recipe, (str, os.PathLike)) else "compressed"
    out = out or f"{run_dir}-{name}"
    if os.path.abspath(out) == os.path.abspath(run_dir):
        raise ConfigError("--out: the compressed run needs a directory of its own")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:  # refused before the work, not after
        raise ConfigError(f"{out}: the output run directory already exists; pass --overwrite to replace it, "
                          f"or choose another with --out")
    source = load_run(run_dir)
    directory = RunDirectory(out, overwrite=overwrite)  # a failed recipe leaves no half-written run behind
    try:
        ctx = _Context(source, seed, quick, say)
        model = merge_lora(copy.deepcopy(source.model))  # the source model stays the "before"
        if ctx.cfg.finetune.method == "lora":  # what finetune writes by default: compress the merged weights
            ctx.cfg = dataclasses.replace(ctx.cfg, finetune=dataclasses.replace(ctx.cfg.finetune, method="full"))
        model = apply_steps(model, steps, ctx)
        earlier = read_record(run_dir)  # compressing a compressed run: the record keeps its earlier steps too
        steps = (earlier["steps"] if earlier else []) + steps
        cfg = dataclasses.replace(ctx.cfg, run=dataclasses.replace(ctx.cfg.run, dir=out))
        record = {"source": run_dir, "recipe": recipe if isinstance(recipe, str) else None, "steps": steps}
        extra = {}  # a chat run keeps its prompt format, an image run its preprocessing
        for name in (layout.TEMPLATE, layout.PREPROCESS):
            if os.path.exists(os.path.join(run_dir, name)):
                with open(os.path.join(run_dir, name), encoding="utf-8") as f:
                    extra[name] = f.read()
        save_compressed(out, cfg, model, source.tokenizer, source.labels, record, {"compression": record}, extra)
    except BaseException:
        directory.abandon()
        raise
    directory.started()
    compressed = load_run(out)  # measured as load_run gives it: the round trip is part of the test
    compressed.scorecard = None
    if measure:
        from danlu.compress.scorecard import write_scorecard

        card = measure_runs(source, compressed, ctx.data(), steps, quick=quick)
        path = write_scorecard(out, card)
        compressed.scorecard = card
        compressed.metrics = {"test": card["after_metrics"], "compression": record}
        from danlu.files import atomic_write_json

        atomic_write_json(os.path.join(out, "metrics.json"), compressed.metrics)
        say(f"scorecard: {path}")
    return compressed


def measure_runs(before, after, data, steps, quick=False):
    """Measure two runs side by side on the same inputs -> scorecard dict."""
    from danlu.compress.scorecard import build_scorecard, latency_rows, metric_values, model_stats, peak_memory_mb

    torch.manual_seed(0)
    models = {"before": before.model.cpu().eval(), "after": after.model.cpu().eval()}
    b1, b32, length = _latency_inputs(data.test, before.cfg, quick)
    timing = latency_rows(models, b1, b32, repeats=1 if quick else 5)
    cards, evals = {}, {}
    for key, run in (("before", before), ("after", after)):
        evals[key] = _evaluate(run, data.test, quick)
        card = {"size_mb": _weights_mb(run), **model_stats(run.model),
                **timing[key], "peak_memory_mb": peak_memory_mb(run.path, length), **metric_values(evals[key])}
        cards[key] = card
    out = build_scorecard(cards["before"], cards["after"], steps, before.path, after.path)
    out["after_metrics"] = {k: v for k, v in evals["after"].items() if k not in ("confusion_matrix",)}
    out["before_metrics"] = {k: v for k, v in evals["before"].items() if k not in ("confusion_matrix",)}
    return out


def _evaluate(run, dataset, quick):
    from danlu.training.trainer import Trainer

    trainer = Trainer(run.model, make_task(run), run.cfg.train, device="cpu")
    return trainer.evaluate(dataset, max_batches=4 if quick else run.cfg.train.eval_batches or None)


def make_task(run):
    """The task a run was trained with, for its evaluation and recovery fine-tuning."""
    if run.language_model:
        from danlu.jobs.pretrain import make_task as make_lm_task

        return make_lm_task(run.cfg.task, run.spec)
    from danlu.training.tasks import TASKS

    return TASKS[run.cfg.task](run.labels)


def _weights_mb(run):
    """The size of the weights a run serves with: its weights file, or for an adapter run the base and the
    adapter together (what model.safetensors holds once they are merged)."""
    if layout.run_kind(run.path) == "adapter":
        return sum(t.numel() * t.element_size() for t in merge_lora(copy.deepcopy(run.model)).state_dict().values()) / 1e6
    return os.path.getsize(layout.weights_file(run.path)) / 1e6


def _latency_inputs(dataset, cfg, quick):
    """(batch-1 inputs, batch-32 inputs, typical length) from real test examples: single examples in file
    order; batches of 32 as danlu's predict and evaluate form them (sorted by length, so little padding),
    taken evenly across the length range. Language models: windows of block_size tokens."""
    n1, n32 = (8, 2) if quick else (60, 8)
    if hasattr(dataset, "pixels"):  # images: pixel batches (B, C, H, W) in file order
        b32 = [(b["pixel_values"],) for _, b in zip(range(n32), dataset.batches(32, shuffle=False))]
        b1 = [(b32[i // 32][0][i % 32 : i % 32 + 1],) for i in range(min(n1, sum(len(b[0]) for b in b32)))]
        return b1, b32, 0
    if hasattr(dataset, "batches"):  # a token stream: windows of block_size
        batches = dataset.batches(32, shuffle=False)
        b32 = [(b["input_ids"], None) for _, b in zip(range(n32), batches)]
        b1 = [(b32[i // 32][0][i % 32 : i % 32 + 1], None) for i in range(min(n1, 32 * len(b32)))]
        return b1, b32, b32[0][0].shape[1]
    from danlu.data.batching import batch_order, collate

    pad = dataset.pad_id
    b1 = [_args(collate(dataset, [i], pad)) for i in range(min(n1, len(dataset)))]
    order = [b for b in batch_order(dataset.lengths, 32, shuffle=False) if len(b) == 32] or batch_order(dataset.lengths, 32, shuffle=False)
    picks = sorted({round(i * (len(order) - 1) / max(n32 - 1, 1)) for i in range(n32)})
    b32 = [_args(collate(dataset, order[i], pad)) for i in picks]
    lengths = sorted(int(a[1].sum(1).max()) for a in b32)
    return b1, b32, lengths[len(lengths) // 2]


def _args(batch):
    return batch["input_ids"], batch["attention_mask"]


def _count(model):
    from danlu.compress.scorecard import model_stats

    return model_stats(model)["parameters"]


__all__ = ["RECIPES", "STEPS", "apply_steps", "compress_run", "make_task", "measure_runs", "parse_recipe"]
