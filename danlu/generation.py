"""Text generation with a causal language model: batched prompts (left-padded) decoded with the KV cache.

Sampling follows the usual recipe: repetition penalty (Keskar et al. 2019, CTRL), temperature, top-k,
nucleus top-p (Holtzman et al. 2020); temperature 0 is greedy. A row stops at the end-of-text token or
at any of the `stop` strings (which are cut from the result).

>>> run = danlu.load("runs/pretrain_gpt_zh")                                               # doctest: +SKIP
>>> generate(run.model, run.tokenizer, ["中国", "今天"], max_new_tokens=32, temperature=0.8)  # doctest: +SKIP
>>> for delta in stream_generate(run.model, run.tokenizer, "中国"): print(delta, end="")   # doctest: +SKIP

The sampling defaults live in one place, danlu.sampling.SamplingConfig (SAMPLING here).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from danlu.kernels.packed_linear import pack_linear, packable, release_freed_memory, unpack_linear
from danlu.registry import ConfigError
from danlu.sampling import SAMPLING

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens=SAMPLING.max_new_tokens,
             temperature=SAMPLING.temperature, top_k=SAMPLING.top_k, top_p=SAMPLING.top_p,
             repetition_penalty=SAMPLING.repetition_penalty, stop: list[str] = SAMPLING.stop, seed=SAMPLING.seed
             ) -> list[str]:
    """Continue each prompt (a string, or a list of token ids); returns the generated text only (without
    the prompt), one string per prompt.

    >>> generate(model, tokenizer, ["To be"], max_new_tokens=20, temperature=0)  # doctest: +SKIP
    """
    prompts, stop = list(prompts), _stops(stop)
    if not prompts:
        return []
    max_new_tokens = min(max_new_tokens, context_length(model) - 1)
    ids, mask = encode_prompts(tokenizer, prompts, context_length(model) - max_new_tokens)
    decoders = [IncrementalDecoder(tokenizer) for _ in prompts]
    texts = [""] * len(prompts)
    done = [False] * len(prompts)
    eos = tokenizer.token_id("</s>")
    steps = generate_ids(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, repetition_penalty=repetition_penalty, eos_id=eos, seed=seed)
    for next_ids in steps:
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if token == eos:
                done[row] = True
                continue
            texts[row] += decoders[row].push(token)
            texts[row], done[row] = _cut_at_stop(texts[row], stop)
        if all(done):
            steps.close()
            break
    for row, decoder in enumerate(decoders):
        if not done[row]:
            texts[row], _ = _cut_at_stop(texts[row] + decoder.flush(), stop)
    return texts


def stream_generate(model, tokenizer, prompt: str, *, max_new_tokens=SAMPLING.max_new_tokens,
                    temperature=SAMPLING.temperature, top_k=SAMPLING.top_k, top_p=SAMPLING.top_p,
                    repetition_penalty=SAMPLING.repetition_penalty, stop: list[str] = SAMPLING.stop,
                    seed=SAMPLING.seed) -> Iterator[str]:
    """Continue one prompt, yielding text deltas as they are decoded; "".join(deltas) is what `generate`
    returns. A multi-byte character is yielded whole, and text that may begin a stop string is held back
    until it is known not to.

    >>> for delta in stream_generate(model, tokenizer, "To be", temperature=0.8): print(delta, end="", flush=True)  # doctest: +SKIP
    """
    stop = _stops(stop)
    max_new_tokens = min(max_new_tokens, context_length(model) - 1)
    ids, mask = encode_prompts(tokenizer, [prompt], context_length(model) - max_new_tokens)
    decoder = IncrementalDecoder(tokenizer)
    eos = tokenizer.token_id("</s>")
    text, sent = "", 0  # all text so far, and how much of it has been yielded
    steps = generate_ids(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, repetition_penalty=repetition_penalty, eos_id=eos, seed=seed)
    try:
        for next_ids in steps:
            token = int(next_ids[0])
            if token == eos:
                break
            text, stopped = _cut_at_stop(text + decoder.push(token), stop)
            if stopped:
                break
            safe = len(text) - _held_back(text, stop)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        else:
            text, _ = _cut_at_stop(text + decoder.flush(), stop)
    finally:
        steps.close()
    if len(text) > sent:
        yield text[sent:]


# ---------------------------------------------------------------------------------------------
# the decoding loop on token ids


@torch.inference_mode()
def generate_ids(model, input_ids, attention_mask=None, *, max_new_tokens=SAMPLING.max_new_tokens,
                 temperature=SAMPLING.temperature, top_k=SAMPLING.top_k, top_p=SAMPLING.top_p,
                 repetition_penalty=SAMPLING.repetition_penalty, eos_id=None, seed=SAMPLING.seed) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) per step, decoding a left-padded batch with the KV cache.

    Stops after max_new_tokens, or once every row has produced `eos_id` (finished rows keep yielding it).
    """
    was_training = model.training
    model.eval()
    B, T = input_ids.shape
    layout = decode_layout(model, rows=B)
    layout.__enter__()
    try:
        device = model.embed.weight.device
        input_ids = input_ids.to(device)
        attention_mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)).to(device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        cache = model.new_cache(B, T + max_new_tokens)
        logits = model(input_ids, attention_mask, cache=cache, last_only=True)[:, -1]  # (B, V)
        seen = None
        if repetition_penalty != 1.0:  # which tokens each row has seen (prompt and generated)
            seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device)
            seen.scatter_(1, input_ids.masked_fill(~attention_mask, 0), attention_mask)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            next_id = sample(logits, temperature, top_k, top_p, repetition_penalty, seen, generator)  # (B,)
            if eos_id is not None:
                next_id = next_id.masked_fill(done, eos_id)
                done |= next_id == eos_id
            yield next_id
            if step + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
                return
            if seen is not None:
                seen[torch.arange(B, device=device), next_id] = True
            logits = model(next_id[:, None], cache=cache)[:, -1]  # (B, V)
    finally:
        layout.__exit__(None, None, None)
        model.train(was_training)


DECODE_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # sampling.DecodePrecision


def set_decode_precision(model, precision):
    """Cast a language model's weights (and so its KV cache) for decoding: `fp32`, `bf16` or `fp16`. A
    decoding step reads every weight once, so 16 bits nearly halve its time once the weights outgrow the
    CPU's cache (where the hardware computes in bf16), at the cost of slightly different numbers."""
    if precision not in DECODE_PRECISIONS:
        raise ConfigError(f"precision: unknown value {precision!r}; expected one of: {', '.join(DECODE_PRECISIONS)}")
    if precision != "fp32" and any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()):
        raise ConfigError(f"--precision {precision}: this run's int8 layers (dynamic quantization) compute in fp32 "
                          f"only; decode it in fp32 (its weights are 8-bit already)")
    return model.to(DECODE_PRECISIONS[precision])


LAYOUT_MIN_ROWS = 4
"""Fewest rows per decoding step for which `decode_layout` packs or re-lays the weights."""


@contextlib.contextmanager
def decode_layout(model, rows=None):
    """While decoding on CPU, give fp32 Linear layers the weight layout fastest for a few rows a step (same values).

    A decoding step multiplies one row per sequence by every weight matrix. With `rows` (the rows of every step,
    fixed for the whole decode) of LAYOUT_MIN_ROWS or more, each plain fp32 nn.Linear computes from a copy of its
    weight packed by MKL for exactly that many rows (`danlu.kernels.packed_linear`; a prompt's forward, with
    another row count, uses the plain weight): at 8 rows the qkv, MLP and head products run 11-23% faster than
    with the transposed layout below (docs/results/generate.md), and packing takes about half as long as
    transposing, with nothing to undo on exit. The copies, about the size of the weights, are held until exit,
    and their pages given back then. Without MKL (another CPU, another build) the layers are re-laid instead.

    Without `rows` (a batch that changes size from step to step), fp32 Linear weights are kept transposed in
    memory (same shapes): at 4 rows or more the BLAS reads a weight stored (in, out) about a third faster than
    nn.Linear's (out, in) (AVX-512 with MKL, 8 rows: 0.96 against 1.8 ms for a 8192x384 head, 0.18 against 0.28
    ms for 1536x384), and the layout goes back on exit; weights that are already non-contiguous (another decode
    in progress) are left alone. A head tied to the token embedding gets its own transposed copy instead:
    re-laying the shared matrix would make every embedding lookup a strided gather.

    With `rows` under LAYOUT_MIN_ROWS nothing changes: at 1 row every layout runs as fast, at 2 the (out, in)
    one is the fastest, and the copies would cost as much as ten decoding steps of a small model.
    """
    changed, swapped, packed = [], [], []
    wanted = rows is None or rows >= LAYOUT_MIN_ROWS
    # the copies are made outside inference mode (generate_ids runs in it): an inference tensor left as a weight
    # would refuse requires_grad, and so any training or LoRA merge of the model afterwards
    if wanted and next(model.parameters()).device.type == "cpu":
        with torch.no_grad(), torch.inference_mode(False):
            embedded = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
            for module in model.modules():
                if rows is not None and packable(module):
                    pack_linear(module, rows)
                    packed.append(module)
                    continue
                w = module.weight if isinstance(module, nn.Linear) else None
                if w is None or w.dtype != torch.float32 or not w.is_contiguous() or w.shape[0] <= 1 or \
                        any(w is c for c in changed):
                    continue
                if any(w is e for e in embedded):
                    module.weight = nn.Parameter(w.t().contiguous().t(), requires_grad=False)
                    swapped.append((module, w))
                else:
                    w.data = w.data.t().contiguous().t()  # (out, in) shape, (in, out) in memory
                    changed.append(w)
    try:
        yield
    finally:
        with torch.no_grad(), torch.inference_mode(False):
            for module in packed:
                unpack_linear(module)
            if packed:
                release_freed_memory()
            for w in changed:
                w.data = w.data.contiguous()
            for module, w in swapped:
                module.weight = w


def sample(logits, temperature=SAMPLING.temperature, top_k=SAMPLING.top_k, top_p=SAMPLING.top_p,
           repetition_penalty=SAMPLING.repetition_penalty, seen=None, generator=None):
    """Pick the next token (B,) from logits (B, V)."""
    logits = logits.float()
    if seen is not None and repetition_penalty != 1.0:  # CTRL: shrink the logits of tokens already seen
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        limit = torch.finfo(logits.dtype).max  # a penalty near 0 (5e-324 is a float) overflows: keep it finite
        logits = torch.where(seen, penalized, logits).clamp(-limit, limit)
    if temperature <= 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    if not bool(scaled.isfinite().all()):  # a temperature so near 0 that logits overflow: its limit, greedy
        return logits.argmax(-1)
    logits = scaled
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keeps the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# ---------------------------------------------------------------------------------------------
# text in and out


def context_length(model):
    """How many positions the model can attend over (its learned position table, or max_positions)."""
    positions = getattr(model, "positions", None)
    if isinstance(positions, torch.nn.Embedding):
        return positions.num_embeddings
    return model.config.max_positions


def encode_prompts(tokenizer, prompts, max_prompt_tokens):
    """Left-padded ids (B, T) and mask (B, T); an empty prompt starts after the end-of-text token (the
    start of a document), and a prompt longer than max_prompt_tokens keeps its last tokens."""
    eos, pad = tokenizer.token_id("</s>"), tokenizer.pad_id
    encoder = tokenizer.tokenizer_
    rows = []
    for enc in encoder.encode_batch(list(prompts), add_special_tokens=False):
        ids = list(enc.ids) or [eos]
        rows.append(ids[-max(1, max_prompt_tokens):])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = True
    return ids, mask


class IncrementalDecoder:
    """Token ids in, text out, never splitting a character: text is released only when the ids decoded so
    far do not end in an incomplete UTF-8 sequence (byte-level BPE can cut a 3-byte Chinese character
    across tokens). Each step decodes only the ids since the last released text and the one before it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = []
        self.prefix = 0  # ids[prefix:read] decode to text already released (context for the next piece)
        self.read = 0

    def push(self, token_id) -> str:
        self.ids.append(int(token_id))
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character decodes to U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


def _stops(stop):
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


def _cut_at_stop(text, stop):
    """(text up to the first stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _held_back(text, stop):
    """Length of the longest end of `text` that could be the start of a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest
