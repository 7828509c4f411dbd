"""Text-to-text runs (task seq2seq): an encoder-decoder and its tokenizer(s).

    runs/<name>/  config.yaml  tokenizer.json  [tokenizer_target.json]  model.safetensors  metrics.json ...

One tokenizer for both sides, or one per side (tokenizer_target.json). Training and scoring them is
danlu.jobs.seq2seq's; decoding is danlu.decoding's.

>>> run = load_run("runs/translate_en_de")                             # doctest: +SKIP
>>> run.predict(["In the beginning was the Word."])[0]["text"]         # doctest: +SKIP
"""
from __future__ import annotations

import os

import torch

from danlu.data import TextTokenizer
from danlu.data.seq2seq import seq2seq_spec
from danlu.files import load_tensors, load_weights, read_json
from danlu.models import build_model
from danlu.registry import ConfigError
from danlu.runs import layout
from danlu.runs.run import Run, save_tokenizer


def save_tokenizers(path, tokenizer, target_tokenizer=None):
    save_tokenizer(path, tokenizer)
    if target_tokenizer is not None:
        tmp = os.path.join(path, f".{layout.TARGET_TOKENIZER}.tmp")
        target_tokenizer.save(tmp)
        os.replace(tmp, os.path.join(path, layout.TARGET_TOKENIZER))


def load_tokenizers(path):
    target = os.path.join(path, layout.TARGET_TOKENIZER)
    return (TextTokenizer.load(os.path.join(path, layout.TOKENIZER)),
            TextTokenizer.load(target) if os.path.exists(target) else None)


class Seq2SeqRun(Run):
    """A trained text-to-text run: `predict(texts)` -> [{"text": generated}] (scoring it: danlu.jobs.evaluate)."""

    def __init__(self, path, cfg, model, tokenizer, labels=(), metrics=None, target_tokenizer=None):
        super().__init__(path, cfg, model, tokenizer, labels, metrics)
        self.target_tokenizer = target_tokenizer

    @property
    def target(self):
        return self.target_tokenizer or self.tokenizer

    @property
    def spec(self):
        return seq2seq_spec(self.tokenizer, self.target_tokenizer)

    def generate(self, prompts, **options):
        """Generated text of each source; options override the run's `seq2seq` section (beam_size, ...)."""
        from danlu.decoding import translate

        known = self.cfg.seq2seq.decode_options()
        unknown = set(options) - set(known) - {"batch_size", "seed"}
        if unknown:
            raise ConfigError(f"unknown decoding options: {', '.join(sorted(unknown))}; expected: {', '.join(known)}")
        batch_size = options.pop("batch_size", self.cfg.seq2seq.batch_size)
        return translate(self.model, self.tokenizer, self.target, prompts, batch_size=batch_size, **{**known, **options})

    def predict(self, texts, batch_size=None, top_k=None, **options):
        """[{"text": generated}] per source text, decoded as the run's `seq2seq` section says."""
        texts = list(texts)
        return [{"text": t} for t in self.generate(texts, batch_size=batch_size or self.cfg.seq2seq.batch_size, **options)]

    def predict_proba(self, texts, batch_size=64):
        raise ConfigError(f"{self.path}: a seq2seq run generates text; use predict (danlu predict RUN \"text\")")


def load_seq2seq_run(path, cfg, device="cpu") -> Seq2SeqRun:
    """A seq2seq run directory -> Seq2SeqRun (load_run hands it a config with task seq2seq)."""
    tokenizer, target_tokenizer = load_tokenizers(path)
    model = build_model(cfg.model, seq2seq_spec(tokenizer, target_tokenizer))
    weights = os.path.join(path, layout.WEIGHTS)
    load_weights(model, load_tensors(weights)[0], where=weights)
    model.to(torch.device(device) if device != "auto" else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    metrics_file = os.path.join(path, layout.METRICS)
    metrics = read_json(metrics_file) if os.path.exists(metrics_file) else {}
    return Seq2SeqRun(path, cfg, model, tokenizer, (), metrics, target_tokenizer=target_tokenizer)
