"""A trained run: the Run object that predicts, and `save_run` / `write_run_files` (load_run is in load.py).

>>> run = load_run("runs/seed_lstm")                      # doctest: +SKIP
>>> run.predict(["质量很好，物流也快"])[0]["label"]          # doctest: +SKIP
'正面'
"""
from __future__ import annotations

import os

import torch

from danlu import config as config_mod
from danlu.data import encode_examples, make_spec
from danlu.data.batching import iterate
from danlu.data.sources import Examples
from danlu.files import atomic_write_json, atomic_write_text, save_weights
from danlu.registry import TASKS, ConfigError
from danlu.runs import layout


class Run:
    """A trained run, ready to predict: `load_run(dir).predict(texts)` (danlu.runs.load)."""

    def __init__(self, path, cfg, model, tokenizer, labels, metrics=None):
        self.path, self.cfg, self.model, self.tokenizer = path, cfg, model, tokenizer
        self.labels = tuple(labels)
        self.metrics = metrics or {}
        self.model.eval()

    @property
    def spec(self):
        return run_spec(self.cfg, self.tokenizer, self.labels)

    @property
    def chat_template(self) -> str:
        """The prompt format the run was trained with (chat_template.jinja), else ChatML."""
        from danlu.chat_template import DEFAULT_TEMPLATE

        return read_chat_template(self.path) or DEFAULT_TEMPLATE

    @property
    def language_model(self) -> bool:
        return TASKS[self.cfg.task].language_model

    def generate(self, prompts, **options):
        """Continue prompts with a causal-LM run: see danlu.generation.generate for the options."""
        from danlu.generation import generate

        return generate(self.model, self.tokenizer, prompts, **options)

    def dataset(self, texts, labels=None):
        """Texts (and labels) encoded with the run's own tokenizer and label map."""
        if not all(isinstance(t, str) for t in texts):  # bytes, PIL images, arrays: images, not texts
            from danlu.data.images import refuse_images_for_text_run

            refuse_images_for_text_run(self, texts)
        labels = list(labels) if labels is not None else [None] * len(texts)
        ex = Examples(list(texts), labels, [f"text {i + 1}" for i in range(len(texts))])
        return encode_examples(ex, self.tokenizer, self.labels, self.cfg.task == "regression")

    @torch.inference_mode()
    def predict_proba(self, texts, batch_size=64):
        """(N, C) class probabilities ((N,) values for regression), in the order of `texts`.

        Texts of similar length share a padded batch; no Trainer is built, so the server can call this
        once per micro-batch."""
        if self.language_model:
            raise ConfigError(f"{self.path}: predict classifies texts, and this is a language model (task "
                              f"{self.cfg.task}); {language_model_verbs(self.path, self.cfg.task)}")
        data = self.dataset(texts)
        regression = self.cfg.task == "regression"
        out = torch.empty(len(data)) if regression else torch.empty(len(data), len(self.labels))
        device = next(self.model.parameters()).device
        self.model.eval()
        for batch in iterate(data, batch_size, data.pad_id, shuffle=False):
            logits = self.model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()
            out[batch["index"]] = (logits.squeeze(-1) if regression else logits.softmax(-1)).cpu()
        return out

    def predict(self, texts, batch_size=64, top_k=None):
        """[{label, score, probabilities: {label: p}}] per text ([{value}] for regression)."""
        probs = self.predict_proba(texts, batch_size)
        if self.cfg.task == "regression":
            return [{"value": float(v)} for v in probs]
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            pairs = sorted(zip(self.labels, row), key=lambda p: -p[1])[: top_k or len(row)]
            out.append({"label": self.labels[best], "score": row[best], "probabilities": dict(pairs)})
        return out


def language_model_verbs(path, task):
    """What one can do with a language-model run, for messages that refuse a classifier's verb."""
    if task == "masked_lm":
        return (f"a masked language model is a backbone: fine-tune it for a task (finetune.base: {path}), "
                f"or score a corpus with: danlu evaluate {path} --data FILE")
    return f"continue text with: danlu generate {path} \"prompt\", or score a corpus with: danlu evaluate {path} --data FILE"


def read_chat_template(path):
    """The text of a run's chat_template.jinja, or None when it has none."""
    file = os.path.join(os.fspath(path), layout.TEMPLATE)
    if not os.path.exists(file):
        return None
    with open(file, encoding="utf-8") as f:
        return f.read()


def run_spec(cfg, tokenizer, labels):
    """The DataSpec a run's model was built for, from what the run directory holds."""
    if TASKS[cfg.task].language_model:  # no classes; positions for its training windows
        from danlu.data.corpus import lm_spec

        return lm_spec(tokenizer, cfg.data.block_size)
    return make_spec(tokenizer, labels, cfg.task == "regression")


# ---------------------------------------------------------------------------------------------
# saving and loading


def write_run_files(path, cfg, tokenizer, labels=(), extra=None):
    """config.yaml, tokenizer.json, labels.json and any extra text files (name -> text): written first, so
    that an interrupted run can be resumed and inspected."""
    atomic_write_text(os.path.join(path, layout.CONFIG), config_mod.dump(cfg))
    if tokenizer is not None:  # image runs keep their preprocessing instead
        save_tokenizer(path, tokenizer)
    atomic_write_json(os.path.join(path, layout.LABELS), list(labels))
    for name, text in (extra or {}).items():
        atomic_write_text(os.path.join(path, name), text)


def save_run(path, cfg, model, tokenizer, labels, metrics=None):
    """A plain run: the run files, model.safetensors and metrics.json."""
    os.makedirs(path, exist_ok=True)
    write_run_files(path, cfg, tokenizer, labels)
    save_weights(os.path.join(path, layout.WEIGHTS), model, {"kind": cfg.model.kind})
    if metrics is not None:
        atomic_write_json(os.path.join(path, layout.METRICS), metrics)


def save_tokenizer(path, tokenizer):
    tmp = os.path.join(path, f".{layout.TOKENIZER}.tmp")
    tokenizer.save(tmp)
    os.replace(tmp, os.path.join(path, layout.TOKENIZER))
