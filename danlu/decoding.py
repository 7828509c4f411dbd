"""Decoding an encoder-decoder (danlu.models.seq2seq): greedy, beam search and sampling, batched and KV-cached.

Greedy picks the most likely token each step. Beam search (as in Wu et al. 2016, GNMT §7) keeps the
`beam_size` best prefixes of each source; a prefix that ends in EOS becomes a finished hypothesis
scored by its summed log-probability divided by length ** `length_penalty` (length counts the tokens
generated, EOS included; 0 compares raw sums, > 0 favours longer outputs). A source is done once it
has `beam_size` finished hypotheses, so that beam size 1 is exactly greedy. `no_repeat_ngram` n > 0
forbids any n-gram to occur twice in an output (Paulus et al. 2018). With `temperature` > 0 (beam size 1)
tokens are sampled with the options of danlu.generation (top-k, top-p, repetition penalty).

>>> texts = translate(run.model, run.tokenizer, run.target_tokenizer, ["In the beginning was the Word."],
...                   beam_size=4)                                                        # doctest: +SKIP
"""
from __future__ import annotations

import numpy as np
import torch

from danlu.generation import decode_layout, sample
from danlu.registry import ConfigError


def translate(model, source_tokenizer, target_tokenizer, texts, *, batch_size=32, **options) -> list[str]:
    """Decode each source text into target text (in order); sources of similar length share a batch.
    `options` are decode_ids's (beam_size, length_penalty, max_new_tokens, no_repeat_ngram, temperature, ...)."""
    texts = list(texts)
    out = [""] * len(texts)
    for index, ids in decode_texts(model, source_tokenizer, target_tokenizer, texts, batch_size=batch_size, **options):
        out[index] = target_tokenizer.decode(ids)
    return out


def decode_texts(model, source_tokenizer, target_tokenizer, texts, *, batch_size=32, **options):
    """Yield (index of the text, generated target ids) batch by batch, sources sorted by length."""
    ids = encode_sources(source_tokenizer, texts)
    order = np.argsort([len(x) for x in ids], kind="stable")
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, mask = pad([ids[i] for i in rows], source_tokenizer.pad_id)
        outputs = decode_ids(model, input_ids.to(device), mask.to(device), bos_id=target_tokenizer.token_id("<s>"),
                             eos_id=target_tokenizer.token_id("</s>"), **options)
        yield from zip(rows.tolist(), outputs)


def encode_sources(tokenizer, texts):
    """Token ids of each source (int32 arrays); an empty source becomes one [UNK]."""
    unk = tokenizer.token_id("[UNK]") or 0
    return [x if len(x) else np.asarray([unk], dtype=np.int32) for x in tokenizer.encode(texts)]


def pad(rows, pad_id):
    """Right-padded ids (B, S) and mask (B, S) bool of token lists."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
        mask[i, : len(r)] = True
    return ids, mask


def decode_ids(model, input_ids, attention_mask=None, *, bos_id, eos_id, max_new_tokens=128, beam_size=1,
               length_penalty=1.0, no_repeat_ngram=0, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
               seed=None, use_cache=True) -> list[list[int]]:
    """Generated target ids of each source row of input_ids (B, S), without BOS and EOS.

    use_cache=False recomputes the decoder over the whole prefix each step (for checking the cache)."""
    if beam_size < 1:
        raise ConfigError(f"beam_size must be at least 1, got {beam_size}")
    if beam_size > 1 and temperature > 0:
        raise ConfigError("sampling (temperature > 0) draws one output per source: use beam_size 1")
    was_training = model.training
    model.eval()
    try:
        # fp32 weights transposed in memory while decoding on CPU (danlu.generation.decode_layout); entered
        # outside inference mode, so that the weights it puts back are ordinary tensors that can train again
        with decode_layout(model), torch.inference_mode():
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
            memory = model.encode(input_ids, attention_mask)  # (B, S, C)
            if beam_size == 1:
                return _greedy(model, memory, attention_mask, bos_id, eos_id, max_new_tokens, no_repeat_ngram,
                               temperature, top_k, top_p, repetition_penalty, seed, use_cache)
            return _beam(model, memory, attention_mask, bos_id, eos_id, max_new_tokens, beam_size, length_penalty,
                         no_repeat_ngram, use_cache)
    finally:
        model.train(was_training)


class _Steps:
    """Next-token log-probabilities (N, V) of N growing prefixes, `rows_per_source` adjacent ones per source
    of memory (B, S, C), with the KV cache or without it."""

    def __init__(self, model, memory, mask, bos_id, max_new_tokens, use_cache, rows_per_source=1):
        self.model, self.use_cache = model, use_cache
        N = memory.shape[0] * rows_per_source
        self.tokens = torch.full((N, 1), bos_id, dtype=torch.long, device=memory.device)  # (N, 1+t)
        if use_cache:  # the cache keeps the memory's keys and values once per source
            self.cache = model.new_cache(memory, mask, max_new_tokens + 1, rows_per_source)
        else:  # recomputed each step over the whole prefix: one copy of the memory per row
            self.memory = memory.repeat_interleave(rows_per_source, 0)  # (N, S, C)
            self.mask = mask.repeat_interleave(rows_per_source, 0)  # (N, S)

    def logprobs(self):
        if self.use_cache:
            logits = self.model.decode(self.tokens[:, -1:], cache=self.cache)  # (N, 1, V)
        else:
            logits = self.model.decode(self.tokens, self.memory, self.mask)  # (N, 1+t, V)
        return logits[:, -1].float().log_softmax(-1)  # (N, V)

    def push(self, next_ids, rows=None):
        """Append next_ids (N,) to the prefixes `rows` (N,) (beam search's survivors, each within its source's
        group of rows; None: all, in order)."""
        if rows is not None:
            self.tokens = self.tokens.index_select(0, rows)
            if self.use_cache:
                self.cache.reorder(rows)
        self.tokens = torch.cat([self.tokens, next_ids[:, None]], dim=1)


def _greedy(model, memory, mask, bos_id, eos_id, max_new_tokens, no_repeat_ngram, temperature, top_k, top_p,
            repetition_penalty, seed, use_cache):
    B, device = memory.shape[0], memory.device
    steps = _Steps(model, memory, mask, bos_id, max_new_tokens, use_cache)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    seen = None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        scores = steps.logprobs()  # (B, V)
        if no_repeat_ngram:
            scores = _ban_repeats(scores, steps.tokens[:, 1:], no_repeat_ngram)
        if repetition_penalty != 1.0:
            seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, steps.tokens[:, 1:], True)
        if temperature > 0 or seen is not None:
            next_ids = sample(scores, temperature, top_k, top_p, repetition_penalty, seen, generator)  # (B,)
        else:
            next_ids = scores.argmax(-1)  # (B,)
        next_ids = next_ids.masked_fill(done, eos_id)
        done |= next_ids == eos_id
        steps.push(next_ids)
        if bool(done.all()):
            break
    return [_strip(row, eos_id) for row in steps.tokens[:, 1:].tolist()]


def _beam(model, memory, mask, bos_id, eos_id, max_new_tokens, k, length_penalty, no_repeat_ngram, use_cache):
    B, device = memory.shape[0], memory.device
    steps = _Steps(model, memory, mask, bos_id, max_new_tokens, use_cache, rows_per_source=k)  # B*k rows
    beam_scores = torch.full((B, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # every beam starts as the same BOS: only the first is live at step one
    finished = [[] for _ in range(B)]  # (normalized score, ids) per source
    done = [False] * B
    for step in range(max_new_tokens):
        logprobs = steps.logprobs()  # (B*k, V)
        if no_repeat_ngram:
            logprobs = _ban_repeats(logprobs, steps.tokens[:, 1:], no_repeat_ngram)
        V = logprobs.shape[-1]
        # each beam's best 2k tokens in their exact order, then the 2k best of those k * 2k by total score:
        # a stable sort, so that equal totals keep each beam's order (beam size 1 is then exactly greedy)
        top, token = logprobs.topk(min(2 * k, V), dim=-1)  # (B*k, 2k)
        total = (beam_scores.view(-1, 1) + top).view(B, -1)  # (B, k*2k)
        order = total.sort(dim=-1, descending=True, stable=True).indices[:, : 2 * k]  # (B, 2k)
        cand_scores = total.gather(1, order).tolist()
        cand_beams = (order // top.shape[1]).tolist()
        cand_tokens = token.view(B, -1).gather(1, order).tolist()
        rows, next_ids, next_scores = [], [], []
        for b in range(B):
            chosen = []  # (row, token, score) of the beams this source keeps
            for rank, (score, beam, tok) in enumerate(zip(cand_scores[b], cand_beams[b], cand_tokens[b])):
                if done[b] or score == float("-inf") or len(chosen) == k:
                    break
                if tok != eos_id:
                    chosen.append((b * k + beam, tok, score))
                elif rank < k:  # an EOS counts only among the k best of this step, as a live beam would
                    ids = steps.tokens[b * k + beam, 1:].tolist()
                    finished[b].append((score / (len(ids) + 1) ** length_penalty, ids))
            done[b] = done[b] or len(finished[b]) >= k
            if done[b]:
                chosen = []
            # a finished source (or one short of live beams) is filled with dead beams, never chosen again
            chosen += [(b * k, eos_id, float("-inf"))] * (k - len(chosen))
            for row, tok, score in chosen:
                rows.append(row)
                next_ids.append(tok)
                next_scores.append(score)
        if all(done):
            break
        beam_scores = torch.tensor(next_scores, device=device).view(B, k)
        steps.push(torch.tensor(next_ids, device=device), torch.tensor(rows, device=device))
    out = []
    for b in range(B):
        if not done[b]:  # ran out of length: the live beams compete too
            for beam in range(k):
                score = float(beam_scores[b, beam])
                if score > float("-inf"):
                    ids = steps.tokens[b * k + beam, 1:].tolist()
                    finished[b].append((score / max(len(ids), 1) ** length_penalty, ids))
        best = max(finished[b], key=lambda item: item[0]) if finished[b] else (0.0, [])
        out.append(_strip(best[1], eos_id))
    return out


def _ban_repeats(scores, tokens, n):
    """-inf for every token that would repeat an n-gram already in its row of `tokens` (N, t)."""
    t = tokens.shape[1]
    if t < n - 1 or n < 1:
        return scores
    rows = tokens.tolist()
    banned_rows, banned_ids = [], []
    for r, row in enumerate(rows):
        prefix = tuple(row[t - n + 1 :]) if n > 1 else ()
        for i in range(t - n + 1):
            if tuple(row[i : i + n - 1]) == prefix:
                banned_rows.append(r)
                banned_ids.append(row[i + n - 1])
    if banned_rows:
        scores = scores.clone()
        scores[banned_rows, banned_ids] = float("-inf")
    return scores


def _strip(ids, eos_id):
    return ids[: ids.index(eos_id)] if eos_id in ids else ids
