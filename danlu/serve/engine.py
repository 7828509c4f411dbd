"""Continuous batching for generation: requests join and leave one shared decoding batch step by step.

The engine owns the model thread of a language-model server. Each request (a streamed or a plain
completion, one per prompt and choice) becomes a row of one shared KV cache; every decoding step runs
the model once on the last token of every row, and between two steps finished or cancelled rows leave
and waiting requests join (the iteration-level scheduling of Orca, Yu et al. 2022, with a slot per
request in a preallocated cache rather than vLLM's pages). A short request is therefore never stuck
behind a long one, and a stream gets its tokens at the batch's pace.

The cache: rows × columns, all rows writing their next token into the same column. The requests that
arrive between two steps join together: their prompts run as one left-padded batch (one prefill call,
at most `prefill_tokens` tokens with padding; the others wait for the next step, so that a step's
length stays bounded, the decode-first idea of Sarathi, Agrawal et al. 2023), and each prompt's keys
and values are copied into the P columns before the current one, its earlier columns masked out: to
the model that is a left-padded row, whose positions count from its first real token (`GPT.forward`
with a cache). A step reads the columns from its oldest row's first one on, so that short rows stop
paying for a long row once it has left. When a prompt is longer than the columns behind the current
one, every row moves right; when the columns run out, every row moves left by the padding all rows
share. A row that leaves is filled by the last row, so that the model only ever runs the first n rows.

Streamed rows go first (`stream_steps`, default 3): while the streamed rows are at most half the batch,
they take stream_steps - 1 more steps alone after each step of the whole batch, and the other rows wait.
On a CPU a step of 16 rows of a small GPT costs about 1.75 steps of one row, and the prefills of joining
prompts fall before the steps of the whole batch only, so a stream among completions gets its tokens at
nearly the pace of a stream alone, and the completions one token per stream_steps steps while it runs.
A waiting row's column of such a step is masked out: positions count real tokens, so the row decodes
exactly as it would alone. Holding some requests back step by step for others is the iteration-level
preemption of FastServe (Wu et al. 2023); here the priority is fixed: streams first.

Sampling settings are per row: rows with the same settings (and no seed) are sampled in one call, and
a seeded row alone with its own generator, as `generate_ids` does, so a seeded reply does not depend
on its neighbours.

Log probabilities (`sampling["logprobs"] = k`, OpenAI's logprobs / top_logprobs) are the log-softmax of
the model's logits at each step, before temperature, top-k, top-p and the repetition penalty reshape
them for sampling: the sampled token's and the k most likely ones', all rows that ask in one call.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import torch

from danlu.serve.batching import ModelThread, Overloaded

PREFILL_TOKENS = 512  # prompt tokens (padding included) prefilled between two decoding steps; the first prompt always
STREAM_STEPS = 3  # steps of the streamed rows per step of the whole batch, while they are at most half of it


@dataclass
class Request:
    """One generation: prompt token ids, generate()'s sampling keywords, and where its output goes.

    `emit(kind, value)` is called in the engine thread: ("delta", text) for a stream's pieces (only with
    `stream=True`), each after ("logprobs", [Logprob]) for the tokens it holds when `sampling["logprobs"]`
    is set, then ("done", (text, completion_tokens, finish_reason, logprobs)) or ("error", exception);
    logprobs is the list of Logprob of the tokens in text (None without `sampling["logprobs"]`).
    Setting `cancelled` removes the row before the next decoding step."""

    ids: list
    sampling: dict
    emit: object
    stream: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Logprob:
    """One generated token: its text, log probability and UTF-8 bytes, the k most likely tokens at that step
    as (text, logprob, bytes), and where its text starts in the completion (characters)."""

    token: str
    logprob: float
    bytes: list
    top: list
    offset: int


class _Row:
    """A request inside the batch: its text so far, its decoder, its sampling state."""

    def __init__(self, request, decoder, eos, vocab, device):
        s = request.sampling
        self.request, self.decoder, self.eos = request, decoder, eos
        self.limit = s.get("max_new_tokens", 64)
        self.stop = [t for t in ([s["stop"]] if isinstance(s.get("stop"), str) else s.get("stop") or ()) if t]
        self.temperature, self.top_k = s.get("temperature", 1.0), s.get("top_k", 0)
        self.top_p, self.penalty = s.get("top_p", 1.0), s.get("repetition_penalty", 1.0)
        seed = s.get("seed")
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device) if self.penalty != 1.0 else None
        if self.seen is not None:
            self.seen[torch.tensor(request.ids, device=device)] = True
        self.key = None if seed is not None else (self.temperature, self.top_k, self.top_p, self.penalty)
        self.text, self.sent, self.used, self.last = "", 0, 0, None
        self.start = 0  # the cache column of its first prompt token
        self.holes = False  # whether it waited through a step of the streamed rows (a masked column)
        self.top_logprobs = s.get("logprobs")  # None: no log probabilities; k >= 0: the k most likely too
        self.logprobs, self.logprobs_sent = [], 0

    def take(self, token, scored=None):
        """Feed one sampled token (and its (logprob, top) when the row asked); returns the finish reason once
        the row is done, else None."""
        if token == self.eos:
            return "stop"
        self.used += 1
        if scored is not None:
            logprob, top = scored
            text, raw = token_piece(self.decoder.tokenizer, token)
            self.logprobs.append(Logprob(text, logprob, raw, top, len(self.text)))
        if self.seen is not None:
            self.seen[token] = True
        self.text, stopped = cut_at_stop(self.text + self.decoder.push(token), self.stop)
        if stopped:
            return "stop"
        if self.used >= self.limit:
            self.text, stopped = cut_at_stop(self.text + self.decoder.flush(), self.stop)
            return "stop" if stopped else "length"
        if self.request.stream:
            safe = len(self.text) - held_back(self.text, self.stop)
            if safe > self.sent:
                self._send_logprobs(safe)
                self.request.emit("delta", self.text[self.sent : safe])
                self.sent = safe
        self.last = token
        return None

    def _send_logprobs(self, upto):
        """A stream's ("logprobs", [...]) event for the tokens whose text starts before `upto`."""
        if self.top_logprobs is None:
            return
        end = self.logprobs_sent
        while end < len(self.logprobs) and self.logprobs[end].offset < upto:
            end += 1
        self.request.emit("logprobs", self.logprobs[self.logprobs_sent : end])
        self.logprobs_sent = end

    def finish(self, reason):
        if self.request.stream and len(self.text) > self.sent:
            self._send_logprobs(len(self.text))
            self.request.emit("delta", self.text[self.sent :])
        logprobs = None
        if self.top_logprobs is not None:  # the tokens of a cut stop string are not part of the text
            logprobs = [lp for lp in self.logprobs if lp.offset < len(self.text)]
        self.request.emit("done", (self.text, self.used, reason, logprobs))


class Engine:
    """The model thread of a language-model server, decoding every admitted request in one batch.

    `submit(request)` queues a Request (Overloaded when `max_queue` are waiting); at most `max_batch` rows
    decode at once, and the prompts joining between two steps are prefilled in one call of at most
    `prefill_tokens` tokens (padding included; the first prompt joins whatever its length). `on_step(rows)`
    is called after each decoding step (metrics), `flush()` after each step's emits (a server hands the
    step's events to its event loop in one call). With `paused=True` the thread starts only at `resume()`,
    so that requests queued before join the first batch together. `stream_steps` is how many steps the
    streamed rows take for each step of the batch when they are at most half of it (1: no priority; the
    module's docstring)."""

    def __init__(self, model, tokenizer, max_batch=32, max_queue=256, on_step=None, paused=False,
                 prefill_tokens=PREFILL_TOKENS, flush=None, stream_steps=STREAM_STEPS):
        from danlu.generation import context_length

        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.on_step, self.flush = max(1, max_batch), max_queue, on_step, flush
        self.prefill_tokens = max(1, prefill_tokens)
        self.stream_steps = max(1, stream_steps)
        self.context = context_length(model)
        self.eos = tokenizer.token_id("</s>")
        self._queue = queue.SimpleQueue()
        self._thread, self._closed, self._paused = ModelThread(self._work), False, paused
        self.cache, self._rows, self._pending = None, [], []
        self.active = 0  # rows decoding now (read by metrics from other threads)

    @property
    def depth(self):
        """Requests waiting to join the batch."""
        return self._queue.qsize()

    def submit(self, request: Request):
        if self._closed:
            raise Overloaded("server shutting down")
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded()
        self._queue.put(request)
        if not self._paused:
            self.resume()

    def resume(self):
        """Start the model thread (once)."""
        self._paused = False
        self._thread.start()

    def close(self):
        self._closed = True
        self._queue.put(None)

    # -- the model thread ---------------------------------------------------------------------------
    def _work(self):
        from danlu.generation import decode_layout

        while True:
            first = self._queue.get()
            if first is None:
                return
            try:
                with torch.inference_mode(), decode_layout(self.model):
                    was_training = self.model.training
                    self.model.eval()
                    try:
                        if not self._decode(first):
                            return
                    finally:
                        self.model.train(was_training)
            except Exception as e:  # noqa: BLE001  a failure of the batch: every request in it answers 500
                for request in [row.request for row in self._rows] + self._pending:
                    request.emit("error", e)
                if self.flush is not None:
                    self.flush()
            finally:
                self.cache, self._rows, self._pending, self.active = None, [], [], 0

    def _decode(self, first):
        """Decode until no row is left and nobody waits; False once the engine is closed."""
        device = self.model.embed.weight.device
        self.cache = self.model.new_cache(1, 64)  # grows (rows, columns) as requests join: _room
        rows, column, pending, open_ = [], 0, [first], True
        self._rows, self._pending = rows, pending  # what a failure must answer
        while rows or pending:
            while open_ and len(rows) + len(pending) < self.max_batch:  # whoever arrived joins now
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
                if entry is None:
                    open_ = False
                    self._closed = True
                else:
                    pending.append(entry)
            pending[:] = [request for request in pending if not request.cancelled.is_set()]
            if pending:  # the prompts that fit this step's prefill budget, in one call; the others wait
                joining = self._within_budget(pending)
                del pending[: len(joining)]
                column = self._join(joining, rows, column, device)
            self.active = len(rows)
            if rows:
                column = self._step(rows, column, device)
            if self.flush is not None:  # this step's events, handed over together
                self.flush()
            for _ in range(self.stream_steps - 1):
                streamed = [i for i, row in enumerate(rows) if row.request.stream]
                if not streamed or 2 * len(streamed) > len(rows):
                    break
                column = self._step(rows, column, device, only=streamed)  # the streamed rows' own step
                if self.flush is not None:
                    self.flush()
        self.active = 0
        return open_

    def _step(self, rows, column, device, only=None):
        """One decoding step of every row (or of the rows at the indices `only`, the others' column masked out);
        the rows that are done or cancelled leave. Returns the next column."""
        column = self._room(rows, column)
        cache = self.cache
        if only is None:
            stepping = rows
            lead = min(row.start for row in rows)
            view = _view(cache, len(rows), lead, column, any(row.start != lead or row.holes for row in rows))
        else:  # the rows' keys and values up to the new column, gathered; the new column is written back below
            stepping = [rows[i] for i in only]
            lead = min(row.start for row in stepping)
            index = torch.tensor(only, device=cache.mask.device)
            view = _view(cache, len(rows), lead, column, True, index)
        ids = torch.tensor([[row.last] for row in stepping], device=device)  # (n, 1)
        logits = self.model(ids, cache=view)[:, -1]  # (n, V)
        if only is not None:
            new = slice(column - lead, column - lead + 1)
            cache.keys[:, index, :, column : column + 1] = view.keys[:, :, :, new]
            cache.values[:, index, :, column : column + 1] = view.values[:, :, :, new]
            cache.mask[: len(rows), column] = False
            cache.mask[index, column] = True
            for i, row in enumerate(rows):
                row.holes = row.holes or i not in only
        column += 1
        tokens = self._sample(stepping, logits)
        scores = self._score(stepping, logits, tokens)
        for i, row in enumerate(stepping):
            row.done = row.take(tokens[i], scores[i])
        if self.on_step is not None:
            self.on_step(len(stepping))
        self._drop(rows, column, lambda row: row.done is not None or row.request.cancelled.is_set())
        return column

    def _prompt(self, request):
        """The prompt tokens the model reads (the last context - 1), its max_new_tokens cut to what fits."""
        prompt = list(request.ids)[-(self.context - 1):] or [self.eos]
        limit = min(request.sampling.get("max_new_tokens", 64), self.context - len(prompt))
        request.sampling = {**request.sampling, "max_new_tokens": max(1, limit)}
        return prompt

    def _within_budget(self, pending):
        """The first waiting requests whose prompts, left-padded to the longest, hold at most `prefill_tokens`
        tokens (at least one request): the bound on the prefill work between two decoding steps."""
        width, count = 0, 0
        for request in pending:
            width = max(width, min(len(request.ids), self.context - 1))
            if count and (count + 1) * width > self.prefill_tokens:
                break
            count += 1
        return pending[:count]

    def _room(self, rows, column, extra=1, height=None, at_least=0):
        """Make the cache hold `height` rows (default len(rows)) and `needed` columns: first by moving every row
        left by the padding they all share, then by a larger cache (columns at most twice the context: a row
        spans at most the context, so after the move at least a context's worth is free). Returns the column."""
        cache, n = self.cache, len(rows)
        needed = max(column + extra, at_least)
        lead = min((row.start for row in rows), default=0)
        if needed > cache.max_length and lead > 0:
            keep = column - lead
            cache.keys[:, :n, :, :keep] = cache.keys[:, :n, :, lead:column].clone()
            cache.values[:, :n, :, :keep] = cache.values[:, :n, :, lead:column].clone()
            cache.mask[:n, :keep] = cache.mask[:n, lead:column].clone()
            cache.mask[:n, keep:] = False
            for row in rows:
                row.start -= lead
            column = keep
            needed = max(column + extra, at_least)
        height = height or n
        if needed > cache.max_length or height > cache.keys.shape[1]:
            width = min(2 * self.context, max(cache.max_length, 2 * needed))
            grown = self.model.new_cache(min(self.max_batch, max(cache.keys.shape[1], 2 * height)), width)
            grown.keys[:, :n, :, :column] = cache.keys[:, :n, :, :column]
            grown.values[:, :n, :, :column] = cache.values[:, :n, :, :column]
            grown.mask[:n, :column] = cache.mask[:n, :column]
            self.cache = grown
        return column

    def _prefill(self, prompts, device):
        """Run `prompts` as one left-padded batch (positions count from each row's first real token) ->
        (their KVCache (m, width), the logits of each prompt's last token (m, V))."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)  # (m, width)
        real = torch.zeros(len(prompts), width, dtype=torch.bool)  # (m, width)
        for j, prompt in enumerate(prompts):
            ids[j, width - len(prompt):] = torch.tensor(prompt)
            real[j, width - len(prompt):] = True
        cache = self.model.new_cache(len(prompts), width)
        mask = None if bool(real.all()) else real.to(device)
        head = getattr(self.model, "lm_head", None)  # only the last token's logits: (m, V), not (m, width, V)
        if head is None:
            return cache, self.model(ids.to(device), mask, cache=cache)[:, -1]
        hidden = self.model(ids.to(device), mask, cache=cache, return_hidden=True)[:, -1]  # (m, C)
        return cache, head(hidden)

    def _join(self, requests, rows, column, device):
        """Prefill `requests` in one call and copy each one's keys and values into a new row ending at `column`;
        their first tokens are sampled from the prefill's logits. If the call fails, each prompt runs alone,
        so that only the request whose prompt fails answers with the error. Returns the current column."""
        from danlu.generation import IncrementalDecoder

        prompts = [self._prompt(request) for request in requests]
        try:
            single, logits = self._prefill(prompts, device)
            joining = [_Row(request, IncrementalDecoder(self.tokenizer), self.eos, logits.shape[-1], device)
                       for request in requests]
            tokens = self._sample(joining, logits)
            scores = self._score(joining, logits, tokens)
        except Exception as e:  # noqa: BLE001  the prompt that fails answers alone
            if len(requests) == 1:
                requests[0].emit("error", e)
                return column
            for request in requests:
                column = self._join([request], rows, column, device)
            return column
        staying = []
        for j, row in enumerate(joining):
            try:
                done = row.take(tokens[j], scores[j])
            except Exception as e:  # noqa: BLE001  e.g. a tokenizer that cannot decode this token
                row.request.emit("error", e)
                continue
            if done is not None:
                row.finish(done)
            elif not row.request.cancelled.is_set():
                staying.append(j)
        if not staying:
            return column
        P = max(len(prompts[j]) for j in staying)
        column = self._room(rows, column, height=len(rows) + len(staying), at_least=P + 1)
        cache, n = self.cache, len(rows)
        if column < P:  # move every row right, to make room for the prompts before the current column
            shift = P - column
            cache.keys[:, :n, :, shift : shift + column] = cache.keys[:, :n, :, :column].clone()
            cache.values[:, :n, :, shift : shift + column] = cache.values[:, :n, :, :column].clone()
            cache.mask[:n, shift : shift + column] = cache.mask[:n, :column].clone()
            cache.mask[:n, :shift] = False
            for row in rows:
                row.start += shift
            column = P
        width = single.max_length
        for j in staying:
            i, p, row = len(rows), len(prompts[j]), joining[j]
            cache.keys[:, i, :, column - p : column] = single.keys[:, j, :, width - p :]
            cache.values[:, i, :, column - p : column] = single.values[:, j, :, width - p :]
            cache.mask[i, :column] = False
            cache.mask[i, column - p : column] = True
            row.done, row.start = None, column - p
            rows.append(row)
        return column

    def _drop(self, rows, column, leaving):
        """Finish the rows that are done, forget the cancelled ones; the last row fills each gap."""
        cache = self.cache
        i = 0
        while i < len(rows):
            row = rows[i]
            if not leaving(row):
                i += 1
                continue
            if row.done is not None:
                row.finish(row.done)
            last = len(rows) - 1
            if i != last:
                cache.keys[:, i, :, :column] = cache.keys[:, last, :, :column]
                cache.values[:, i, :, :column] = cache.values[:, last, :, :column]
                cache.mask[i, :column] = cache.mask[last, :column]
                rows[i] = rows[last]
            rows.pop()

    @staticmethod
    def _score(rows, logits, tokens):
        """(logprob of the sampled token, [(text, logprob, bytes)] of the k most likely) for each row that asks
        for log probabilities (None for the others): one log-softmax over all of them."""
        asking = [i for i, row in enumerate(rows) if row.top_logprobs is not None]
        out = [None] * len(rows)
        if not asking:
            return out
        index = torch.tensor(asking, device=logits.device)
        logprobs = logits.index_select(0, index).float().log_softmax(-1)  # (m, V)
        chosen = logprobs.gather(1, torch.tensor([[tokens[i]] for i in asking], device=logits.device))[:, 0].tolist()
        k = max(rows[i].top_logprobs for i in asking)
        top_values, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1) if k else (None, None)
        for j, i in enumerate(asking):
            top = []
            if rows[i].top_logprobs:
                tokenizer = rows[i].decoder.tokenizer
                for value, token in zip(top_values[j, : rows[i].top_logprobs].tolist(),
                                        top_ids[j, : rows[i].top_logprobs].tolist()):
                    text, raw = token_piece(tokenizer, token)
                    top.append((text, value, raw))
            out[i] = (chosen[j], top)
        return out

    @staticmethod
    def _sample(rows, logits):
        """One token per row (a list of ints): rows with the same settings in one call, seeded rows alone."""
        from danlu.generation import sample

        out = [0] * len(rows)
        groups = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.key if row.key is not None else ("seeded", i), []).append(i)
        for members in groups.values():
            row = rows[members[0]]
            index = torch.tensor(members, device=logits.device)
            seen = torch.stack([rows[i].seen for i in members]) if row.seen is not None else None
            picked = sample(logits.index_select(0, index), row.temperature, row.top_k, row.top_p, row.penalty, seen,
                            row.generator).tolist()
            for i, token in zip(members, picked):
                out[i] = int(token)
        return out


def _view(cache, n, lead, column, padded, index=None):
    """The first n rows of `cache` from column `lead` on, as a cache whose next token goes to `column` (writes go
    through). Every row's tokens start at `lead` or later: attention, whose cost grows with the columns it
    reads, skips the padding all rows share, and positions count real tokens, so they do not change. Without
    `padded` (all rows start at `lead`, no masked column between) the step needs no mask. With `index`, the
    rows at those indices instead, columns `lead` to `column` copied (writes stay in the copy)."""
    from danlu.models.blocks import KVCache

    view = KVCache.__new__(KVCache)
    if index is None:
        view.keys, view.values = cache.keys[:, :n, :, lead:], cache.values[:, :n, :, lead:]
        view.mask = cache.mask[:n, lead:]
    else:
        view.keys, view.values = cache.keys[:, index, :, lead : column + 1], cache.values[:, index, :, lead : column + 1]
        view.mask = cache.mask[index, lead : column + 1]
    view.length, view.padded = column - lead, padded
    return view


def _byte_level_table():
    """GPT-2's byte-level alphabet (Radford et al. 2019) read backwards: printable Latin-1 bytes stand for
    themselves, the other bytes for the characters 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_table()


def token_piece(tokenizer, token):
    """(text, UTF-8 bytes as a list of ints) of one token id. A byte-level BPE token may hold part of a
    character: its bytes are exact and its text shows the missing part as U+FFFD."""
    from tokenizers import decoders

    tok = tokenizer.tokenizer_
    piece = tok.id_to_token(token) or ""
    if isinstance(tok.decoder, decoders.ByteLevel) and all(c in _BYTE_LEVEL for c in piece):
        raw = bytes(_BYTE_LEVEL[c] for c in piece)
    else:
        raw = tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")
    return raw.decode("utf-8", errors="replace"), list(raw)


def cut_at_stop(text, stop):
    """(text up to the first stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def held_back(text, stop):
    """Length of the longest end of `text` that could be the start of a stop string (not yet sent)."""
    for n in range(min(max((len(s) for s in stop), default=1) - 1, len(text)), 0, -1):
        if any(s.startswith(text[-n:]) for s in stop):
            return n
    return 0
