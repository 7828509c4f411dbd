"""Predictor: a run directory, ready to answer requests — the object the HTTP app wraps.

Classifier runs answer `classify(texts)`; language-model runs (task causal_lm) answer
`complete(prompts, ...)`, `stream(prompt, ...)` and `chat_ids(messages)`. All methods are plain
synchronous calls meant for the server's worker threads; none of them knows about HTTP.

In a chat, the text of the messages is always text: `<|im_end|>` typed by a user is encoded as the
characters it is made of, never as the control token the template writes (`chat_ids`).

>>> p = Predictor.from_run("runs/seed_lstm")                       # doctest: +SKIP
>>> p.classify(["质量很好，物流也快"])[0]["label"]                     # doctest: +SKIP
'正面'
"""
from __future__ import annotations

import os
import re
import time
import uuid

import torch

from danlu.chat_template import render_chat, stop_sequences
from danlu.registry import ConfigError
from danlu.runs import layout
from danlu.sampling import SAMPLING


class Predictor:
    def __init__(self, run, name=None):
        if run.cfg.task == "masked_lm":  # neither classes nor generation
            from danlu.runs import language_model_verbs

            raise ConfigError(f"{run.path}: nothing to serve yet: {language_model_verbs(run.path, run.cfg.task)}")
        self.run = run
        self.name = name or os.path.basename(os.path.normpath(run.path)) or "model"
        self.task = run.cfg.task
        self.kind = "language_model" if self.task == "causal_lm" else "seq2seq" if self.task == "seq2seq" else "classifier"
        self.labels = tuple(run.labels)
        self.input = "image" if hasattr(run, "preprocess") else "text"  # image runs: danlu.runs.image
        self.created = int(os.path.getmtime(layout.weights_file(run.path)))  # a LoRA run: its adapter
        self.chat_template = run.chat_template if self.kind == "language_model" else None
        self._counter = self._plain = self._max_prompt_chars = None

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

    def explain(self, texts, method="auto"):
        """[{method, tokens: [{text, start, end, score}]}] per text: what pushed each decision
        (danlu.evaluate.explain). It hooks the model's embedding, so it runs in the model thread alone."""
        from danlu.evaluate.explain import explain

        return [{"method": e["method"], "tokens": e["tokens"]} for e in explain(self.run, list(texts), method)]

    # -- language models --------------------------------------------------------------------------
    @property
    def context_length(self):
        """Most tokens (prompt + completion) the model can attend to."""
        from danlu.generation import context_length

        if self.kind == "seq2seq":  # source tokens (the output has as many positions of its own)
            return self.run.model.position_table.shape[0]
        return context_length(self.run.model)

    def complete(self, prompts, cancelled=None, **sampling):
        """[(text, completion_tokens, finish_reason)] per prompt (a string, or token ids; sampling: generate()'s
        keywords). `cancelled()` is asked before each decoding step: once it says True, decoding stops and
        the answer is None."""
        from danlu.generation import generate

        if self.kind == "seq2seq":
            return self._translate(prompts, **sampling)

        recorder = _StepRecorder(self.run.model, cancelled)
        try:
            with torch.inference_mode(), recorder:
                texts = generate(self.run.model, self.run.tokenizer, list(prompts), **sampling)
        except _Cancelled:
            return None
        return [(text, *self._finish(recorder, row, text, sampling)) for row, text in enumerate(texts)]

    def engine(self, max_batch=32, max_queue=256, on_step=None, **options):
        """The continuous-batching Engine that decodes this run's requests (danlu.serve.engine; `options`: its
        other keywords, e.g. stream_steps)."""
        from danlu.serve.engine import Engine

        return Engine(self.run.model, self.run.tokenizer, max_batch=max_batch, max_queue=max_queue, on_step=on_step,
                      **options)

    def stream(self, prompt, **sampling):
        """An iterator of text deltas; once exhausted, `.result()` is (completion_tokens, finish_reason)."""
        from danlu.generation import stream_generate

        if self.kind == "seq2seq":  # decoded whole (beam search needs the end), sent as one delta
            (text, used, finish), = self._translate([prompt], **sampling)
            return _Stream(iter([text] if text else []), _StepRecorder(self.run.model), lambda *_: (used, finish))

        it = stream_generate(self.run.model, self.run.tokenizer, prompt, **sampling)
        return _Stream(it, _StepRecorder(self.run.model), lambda rec, text: self._finish(rec, 0, text, sampling))

    def _translate(self, prompts, max_new_tokens=None, temperature=None, stop=(), **sampling):
        """A seq2seq run's outputs as complete() gives them. Without request options the run's `seq2seq`
        section decodes (beam search); a temperature > 0 samples, as generate does."""
        options = {k: v for k, v in sampling.items() if v is not None and k in ("top_k", "top_p", "repetition_penalty",
                                                                                "seed")}
        if temperature:
            options.update(temperature=temperature, beam_size=1)
        if max_new_tokens:
            options["max_new_tokens"] = max_new_tokens
        limit = options.get("max_new_tokens", self.run.cfg.seq2seq.max_new_tokens)
        out = []
        for text in self.run.generate(list(prompts), **options):
            cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
            text = text[:cut] if cut >= 0 else text
            used = len(self.run.target.encode([text])[0]) + 1  # + the end-of-text token
            out.append((text, min(used, limit), "length" if used > limit else "stop"))
        return out

    def _finish(self, recorder, row, text, sampling):
        """(completion tokens, "stop" or "length") of one row, from the tokens fed back to the model."""
        fed = recorder.row(row)
        limit = sampling.get("max_new_tokens", SAMPLING.max_new_tokens)
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

    def chat_prompt(self, messages, time_limit=None):
        """The prompt string for a list of {role, content} messages, with the run's chat template (a seq2seq
        run: the last user message, its source)."""
        if self.kind == "seq2seq":
            return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return render_chat(self.chat_template, messages, add_generation_prompt=True, time_limit=time_limit,
                           bos_token="<s>", eos_token="</s>")

    def chat_ids(self, messages, time_limit=None) -> list[int]:
        """The prompt's token ids for [{role, content}] messages: what the template writes is encoded with
        its special tokens, the messages' text as plain text.

        The template is rendered with a unique marker in place of each message's text; the markers split
        the rendered prompt into the template's pieces and the messages. A template that does not copy
        each text verbatim, or whose output depends on the text beyond copying it, gets the whole prompt
        encoded as one string."""
        started = time.monotonic()
        prompt = self.chat_prompt(messages, time_limit)
        if time_limit is not None:
            time_limit = max(1e-3, time_limit - (time.monotonic() - started))
        nonce = uuid.uuid4().hex[:12]
        marked = [{**m, "content": f"\ue000{nonce}{i}\ue001"} for i, m in enumerate(messages)]
        pieces = re.split(f"\ue000{nonce}(\\d+)\ue001", self.chat_prompt(marked, time_limit))
        order = [int(i) for i in pieces[1::2]]
        texts = [piece if k % 2 == 0 else messages[int(piece)]["content"] for k, piece in enumerate(pieces)]
        if order != sorted(set(order)) or "".join(texts) != prompt:
            return self.encode(prompt)
        ids = []
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                ids += self.encode(piece)
            else:
                ids += self.encode(messages[int(piece)]["content"], plain=True)
        return ids

    def encode(self, text, plain=False) -> list[int]:
        """Token ids of `text`, without truncation; `plain`: special-token text such as `<|im_end|>` is
        encoded as the characters it is made of."""
        if self._counter is None:
            from tokenizers import Tokenizer

            counter = Tokenizer.from_str(self.run.tokenizer.tokenizer_.to_str())
            counter.no_truncation()
            plain_counter = Tokenizer.from_str(counter.to_str())
            plain_counter.encode_special_tokens = True
            self._counter, self._plain = counter, plain_counter
        if not text:
            return []
        # encode_batch works without Python's lock: a long text does not hold up the event loop's thread
        return list((self._plain if plain else self._counter).encode_batch([text], add_special_tokens=False)[0].ids)

    @property
    def max_prompt_chars(self) -> int:
        """More characters than this cannot fit the context: the longest token, in characters, times the context."""
        if self._max_prompt_chars is None:
            longest = max((len(t) for t in self.run.tokenizer.tokenizer_.get_vocab(with_added_tokens=True)), default=1)
            self._max_prompt_chars = self.context_length * max(1, longest)
        return self._max_prompt_chars

    @property
    def chat_stop(self):
        return stop_sequences(self.chat_template or "")

    def count_tokens(self, text) -> int:
        """Tokens in `text` (a string, or token ids), without the tokenizer's truncation (for usage and
        context checks)."""
        return len(text) if isinstance(text, list) else len(self.encode(text))

    def describe(self):
        """What the playground and /health show about the model."""
        info = {"id": self.name, "kind": self.kind, "task": self.task, "model": self.run.cfg.model.kind}
        if self.kind == "classifier":
            info["labels"] = list(self.labels)
            info["input"] = self.input
        else:
            info["context_length"] = self.context_length
        return info


class _Cancelled(Exception):
    pass


class _StepRecorder:
    """Watches the model while generate() runs: the first call reads the prompt, each later call is fed
    the (B, 1) tokens just sampled, so the calls tell how many tokens each row made and whether it
    ended with </s> — what usage and finish_reason need and what generate()'s strings do not say.
    With `cancelled`, a step whose `cancelled()` is True raises _Cancelled before the model runs."""

    def __init__(self, model, cancelled=None):
        self.model, self.calls, self.handle, self.cancelled = model, [], None, cancelled

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _hook(self, module, args, kwargs):
        if self.cancelled is not None and self.cancelled():
            raise _Cancelled
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
