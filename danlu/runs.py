"""The run directory: the only contract between stages.

    runs/<name>/
      config.yaml  tokenizer.json  labels.json  model.safetensors  metrics.json  history.jsonl
      report.md  report.html  plots/  checkpoints/{last,best}.safetensors

Loading a run reads YAML, JSON and safetensors only: it executes no pickled code.

>>> run = load_run("runs/seed_lstm")                      # doctest: +SKIP
>>> run.predict(["质量很好，物流也快"])[0]["label"]          # doctest: +SKIP
'正面'
"""
from __future__ import annotations

import os
import shutil

import torch

from danlu import config as config_mod
from danlu.data import DataError, TextTokenizer, encode_examples, make_spec, read_split
from danlu.data.batching import iterate
from danlu.data.sources import Examples
from danlu.files import atomic_write_json, atomic_write_text, load_tensors, load_weights, read_json, save_weights
from danlu.models import build_model
from danlu.registry import ConfigError
from danlu.training.tasks import ALL_TASKS, LM_TASKS
from danlu.training.trainer import Trainer, pick_device


def prepare_run_dir(path, overwrite=False, resume=False):
    """Create the run directory; refuse to touch an existing one unless asked."""
    if os.path.isdir(path) and os.listdir(path):
        if resume:
            return path
        if not overwrite:
            raise ConfigError(
                f"{path}: the run directory already exists. Pass --overwrite to replace it, --resume to continue "
                f"it, or choose another with run.dir=..."
            )
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    return path


def save_run(path, cfg, model, tokenizer, labels, metrics=None):
    os.makedirs(path, exist_ok=True)
    atomic_write_text(os.path.join(path, "config.yaml"), config_mod.dump(cfg))
    save_tokenizer(path, tokenizer)
    atomic_write_json(os.path.join(path, "labels.json"), list(labels))
    save_weights(os.path.join(path, "model.safetensors"), model, {"kind": cfg.model.kind})
    if metrics is not None:
        atomic_write_json(os.path.join(path, "metrics.json"), metrics)


def save_tokenizer(path, tokenizer):
    tmp = os.path.join(path, ".tokenizer.json.tmp")
    tokenizer.save(tmp)
    os.replace(tmp, os.path.join(path, "tokenizer.json"))


class Run:
    """A trained run, ready to predict: `Run.load(dir).predict(texts)`."""

    def __init__(self, path, cfg, model, tokenizer, labels, metrics=None):
        self.path, self.cfg, self.model, self.tokenizer = path, cfg, model, tokenizer
        self.labels = tuple(labels)
        self.metrics = metrics or {}
        self.task = ALL_TASKS[cfg.task](self.labels) if cfg.task in ALL_TASKS else None
        self.model.eval()

    @classmethod
    def load(cls, path, device="cpu"):
        return load_run(path, device)

    @property
    def spec(self):
        return _spec(self.cfg, self.tokenizer, self.labels)

    def generate(self, prompts, **options):
        """Continue prompts with a causal-LM run: see danlu.generation.generate for the options."""
        from danlu.generation import generate

        return generate(self.model, self.tokenizer, prompts, **options)

    def trainer(self):
        return Trainer(self.model, self.task, self.cfg.train, device=str(next(self.model.parameters()).device))

    def dataset(self, texts, labels=None):
        labels = list(labels) if labels is not None else [None] * len(texts)
        ex = Examples(list(texts), labels, [f"text {i + 1}" for i in range(len(texts))])
        return encode_examples(ex, self.tokenizer, self.labels, self.cfg.task == "regression")

    @torch.inference_mode()
    def predict_proba(self, texts, batch_size=64):
        """(N, C) class probabilities ((N,) values for regression), in the order of `texts`.

        Texts of similar length share a padded batch; no Trainer is built, so the server can call this
        once per micro-batch."""
        if self.cfg.task in LM_TASKS:
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
        """[{label, score, probabilities: {label: p}}] per text."""
        probs = self.predict_proba(texts, batch_size)
        if self.cfg.task == "regression":
            return [{"value": float(v)} for v in probs]
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            pairs = sorted(zip(self.labels, row), key=lambda p: -p[1])[: top_k or len(row)]
            out.append({"label": self.labels[best], "score": row[best], "probabilities": dict(pairs)})
        return out

    def evaluate(self, path, **data_overrides):
        """Streaming metrics on a labelled file, with the run's own tokenizer and label map; for a language
        model, loss, perplexity and token accuracy over every window of a corpus (file, folder, built-in)."""
        import dataclasses

        data_cfg = dataclasses.replace(self.cfg.data, **data_overrides)
        if self.cfg.task == "causal_lm" and os.path.exists(os.path.join(self.path, "chat_template.jinja")):
            from danlu.data.chat import is_pair_file

            if is_pair_file(path, (data_cfg.source_column, data_cfg.target_column)):  # a chat run on seq2seq pairs
                from danlu.seq2seq_job import evaluate_chat_pairs

                return evaluate_chat_pairs(self, path, data_cfg)
        if self.cfg.task in LM_TASKS:
            import tempfile

            from danlu.data.corpus import held_out_stream

            every_window = dataclasses.replace(self.cfg.train, eval_batches=0)  # not the training loop's sample
            trainer = Trainer(self.model, self.task, every_window, device=str(next(self.model.parameters()).device))
            with tempfile.TemporaryDirectory(prefix="danlu-eval-") as tokens:
                stream = held_out_stream(path, self.tokenizer, data_cfg.block_size, self.cfg.task, tokens,
                                         data_cfg.text_column, data_cfg.encoding)
                metrics = trainer.evaluate(stream)
                del stream  # the memory map, before its folder goes
            return metrics
        examples = read_split(path, data_cfg, numeric=self.cfg.task == "regression")
        return self.trainer().evaluate(encode_examples(examples, self.tokenizer, self.labels, self.cfg.task == "regression"))


def language_model_verbs(path, task):
    """What one can do with a language-model run, for messages that refuse a classifier's verb."""
    if task == "masked_lm":
        return (f"a masked language model is a backbone: fine-tune it for a task (finetune.base: {path}), "
                f"or score a corpus with: danlu evaluate {path} --data FILE")
    return f"continue text with: danlu generate {path} \"prompt\", or score a corpus with: danlu evaluate {path} --data FILE"


def load_run(path, device="cpu") -> Run:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: not a run directory (it does not exist)")
    adapter_only = os.path.exists(os.path.join(path, "adapter.safetensors")) and not os.path.exists(
        os.path.join(path, "model.safetensors"))  # a LoRA run: its base + adapter.safetensors
    for name in ("config.yaml", "tokenizer.json") + (() if adapter_only else ("model.safetensors",)):
        if not os.path.exists(os.path.join(path, name)):
            raise ConfigError(f"{path}: not a finished run: {name} is missing" +
                              (f" (an interrupted run resumes with: danlu {'pretrain' if _is_lm(path) else 'train'} RUN --resume)"
                               if name == "model.safetensors" else ""))
    cfg = config_mod.load(os.path.join(path, "config.yaml"))
    if cfg.task == "seq2seq":  # text to text: its own run class (target tokenizer, decoding)
        from danlu.seq2seq_job import load_seq2seq_run

        return load_seq2seq_run(path, cfg, device)
    tokenizer = TextTokenizer.load(os.path.join(path, "tokenizer.json"))
    labels_file = os.path.join(path, "labels.json")
    labels = read_json(labels_file) if os.path.exists(labels_file) else []
    spec = _spec(cfg, tokenizer, labels)
    if adapter_only:
        from danlu.finetune import load_adapter_model

        model = load_adapter_model(path, cfg, spec)
    else:
        model = build_model(cfg.model, spec)
        tensors, _ = load_tensors(os.path.join(path, "model.safetensors"))
        if os.path.exists(os.path.join(path, "compression.json")):  # a compressed run: rebuild its shapes and layers first
            from danlu.compress import load_compressed, read_record

            model = load_compressed(model, read_record(path), tensors, where=os.path.join(path, "model.safetensors"))
        else:
            load_weights(model, tensors, where=os.path.join(path, "model.safetensors"))
    model.to(pick_device(device) if device == "auto" else torch.device(device))
    metrics_file = os.path.join(path, "metrics.json")
    metrics = read_json(metrics_file) if os.path.exists(metrics_file) else {}
    return Run(path, cfg, model, tokenizer, labels, metrics)


def _spec(cfg, tokenizer, labels):
    if cfg.task in LM_TASKS:  # a language model: no classes, positions for its training windows
        from danlu.data.corpus import lm_spec

        return lm_spec(tokenizer, cfg.data.block_size)
    return make_spec(tokenizer, labels, cfg.task == "regression")


def _is_lm(path):
    try:
        return config_mod.load(os.path.join(path, "config.yaml")).task in LM_TASKS
    except ConfigError:
        return False


__all__ = ["Run", "load_run", "save_run", "prepare_run_dir", "DataError"]
