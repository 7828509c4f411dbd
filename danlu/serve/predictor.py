"""Predictor: a run directory, ready to answer requests — the object the HTTP app wraps.

Classifier runs answer `classify(texts)`; language-model runs (task causal_lm) answer
`complete(prompts, ...)`, `stream(prompt, ...)` and `chat_prompt(messages)`. All methods are plain
synchronous calls meant for the server's single model thread; none of them knows about HTTP.

>>> p = Predictor.from_run("runs/seed_lstm")                       # doctest: +SKIP
>>> p.classify(["质量很好，物流也快"])[0]["label"]                     # doctest: +SKIP
'正面'
"""
from __future__ import annotations

import os

import torch

from danlu.chat_template import load_template, render_chat, stop_sequences
from danlu.registry import ConfigError

LM_TASKS = ("causal_lm",)


class Predictor:
    def __init__(self, run, name=None):
        if run.cfg.task == "masked_lm":  # neither classes nor generation
            from danlu.runs import language_model_verbs

            raise ConfigError(f"{run.path}: nothing to serve yet: {language_model_verbs(run.path, run.cfg.task)}")
        self.run = run
        self.name = name or os.path.basename(os.path.normpath(run.path)) or "model"
        self.task = run.cfg.task
        self.kind = "language_model" if self.task in LM_TASKS else "classifier"
        self.labels = tuple(run.labels)
        self.input = "image" if hasattr(run, "preprocess") else "text"  # image runs: danlu.vision
        weights = [os.path.join(run.path, n) for n in ("model.safetensors", "adapter.safetensors", "config.yaml")]
        self.created = int(os.path.getmtime(next(w for w in weights if os.path.exists(w))))  # a LoRA run: its adapter
        self.chat_template = load_template(run.path) if self.kind == "language_model" else None
        self._counter = None

    @classmethod
    def from_run(cls, path, device="cpu", name=None, precision="fp32"):
        """Load a run; `precision` bf16 / fp16 casts a language model for decoding (set_decode_precision)."""
        from danlu.generation import set_decode_precision
        from danlu.runs import load_run

        run = load_run(path, device=device)
        predictor = cls(run, name=name)  # refuses a masked LM, saying what to do with it
        if precision != "fp32":
            if predictor.kind != "language_model":
                raise ConfigError(f"--precision {precision}: for language-model runs; {path} is a {run.cfg.task} run")
            set_decode_precision(run.model, precision)
        return predictor

    # -- classifiers ------------------------------------------------------------------------------
    def classify(self, texts, top_k=None):
        """[{label, score, probabilities}] (or [{value}] for regression), one per text; the server calls
        it once per micro-batch."""
        return self.run.predict(list(texts), batch_size=64, top_k=top_k)

    # -- language models --------------------------------------------------------------------------
    @property
    def context_length(self):
        """Most tokens (prompt + completion) the model can attend to."""
        from danlu.generation import context_length

        return context_length(self.run.model)

    def complete(self, prompts, **sampling):
        """[(text, completion_tokens, finish_reason)] per prompt (sampling: generate()'s keywords)."""
        from danlu.generation import generate

        recorder = _StepRecorder(self.run.model)
        with torch.inference_mode(), recorder:
            texts = generate(self.run.model, self.run.tokenizer, list(prompts), **sampling)
        return [(text, *self._finish(recorder, row, text, sampling)) for row, text in enumerate(texts)]

    def stream(self, prompt, **sampling):
        """An iterator of text deltas; once exhausted, `.result()` is (completion_tokens, finish_reason)."""
        from danlu.generation import stream_generate

        it = stream_generate(self.run.model, self.run.tokenizer, prompt, **sampling)
        return _Stream(it, _StepRecorder(self.run.model), lambda rec, text: self._finish(rec, 0, text, sampling))

    def _finish(self, recorder, row, text, sampling):
        """(completion tokens, "stop" or "length") of one row, from the tokens fed back to the model."""
        fed = recorder.row(row)
        limit = sampling.get("max_new_tokens", 64)
        if fed is None:  # decoding did not look like one token per step: count the text instead
            used = self.count_tokens(text)
            return used, "length" if used >= limit else "stop"
        eos = self.run.tokenizer.token_id("</s>")
        if eos in fed:
            return fed.index(eos), "stop"
        used = len(fed) + 1  # the last sampled token is never fed back
        stops = [s for s in sampling.get("stop", ()) if s]
        if used < limit or any(s in self.run.tokenizer.decode(fed) for s in stops):
            return used, "stop"
        return used, "length"

    def chat_prompt(self, messages):
        """The prompt string for a list of {role, content} messages, with the run's chat template."""
        return render_chat(self.chat_template, messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")

    @property
    def chat_stop(self):
        return stop_sequences(self.chat_template or "")

    def count_tokens(self, text) -> int:
        """Tokens in `text`, without the tokenizer's truncation (for usage and context checks)."""
        if self._counter is None:
            from tokenizers import Tokenizer

            counter = Tokenizer.from_str(self.run.tokenizer.tokenizer_.to_str())
            counter.no_truncation()
            self._counter = counter
        return len(self._counter.encode(text, add_special_tokens=False).ids)

    def describe(self):
        """What the playground and /health show about the model."""
        info = {"id": self.name, "kind": self.kind, "task": self.task, "model": self.run.cfg.model.kind}
        if self.kind == "classifier":
            info["labels"] = list(self.labels)
            info["input"] = self.input
        else:
            info["context_length"] = self.context_length
        return info


class _StepRecorder:
    """Watches the model while generate() runs: the first call reads the prompt, each later call is fed
    the (B, 1) tokens just sampled, so the calls tell how many tokens each row made and whether it
    ended with </s> — what usage and finish_reason need and what generate()'s strings do not say."""

    def __init__(self, model):
        self.model, self.calls, self.handle = model, [], None

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _hook(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            self.calls.append(ids.detach().to("cpu"))

    def row(self, row):
        """Token ids fed back for `row` after its prompt, or None when the calls are not one token a step."""
        fed = self.calls[1:]
        if not self.calls or any(c.dim() != 2 or c.shape[1] != 1 for c in fed):
            return None
        return [int(c[row, 0]) for c in fed]


class _Stream:
    """Each `next()` runs in inference mode, with the recorder watching only this stream's steps (other
    requests interleave with it in the same model thread)."""

    def __init__(self, it, recorder, finish):
        self.it, self.recorder, self.finish = it, recorder, finish
        self.text = ""

    def __iter__(self):
        return self

    def __next__(self):
        with torch.inference_mode(), self.recorder:
            delta = next(self.it)
        self.text += delta
        return delta

    def result(self):
        return self.finish(self.recorder, self.text)

    def close(self):
        with torch.inference_mode(), self.recorder:
            self.it.close()
