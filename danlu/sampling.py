"""How a language model picks each next token: `SamplingConfig`, the one place for the sampling defaults.

`generate` / `stream_generate` (danlu.generation), the `danlu generate` flags and the HTTP API take theirs
from `SAMPLING`; `danlu chat` and the playground from `CHAT_SAMPLING`. This module imports no torch, so that
the CLI can build its flags, and the HTTP schemas their defaults, without it.

>>> SamplingConfig(temperature=0.8, top_k=50)  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass

from danlu.schema import Annotated, Literal, NonNegative, Positive, Range


@dataclass(frozen=True)
class SamplingConfig:
    """Repetition penalty (Keskar et al. 2019, CTRL), temperature, top-k, nucleus top-p (Holtzman et al.
    2020); `danlu generate` has one flag per field, with these defaults."""

    max_new_tokens: Positive = 64
    """Most tokens to generate (fewer where the model's context ends)."""
    temperature: Annotated[float, Range(ge=0)] = 1.0
    """Divides the logits; 0 picks the most likely token (greedy)."""
    top_k: NonNegative = 0
    """Sample among the k most likely tokens (0: all)."""
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    """Nucleus sampling: among the smallest set of tokens whose probability reaches p (1: all)."""
    repetition_penalty: Annotated[float, Range(gt=0)] = 1.0
    """Above 1 discourages tokens already seen (CTRL, Keskar et al. 2019)."""
    stop: tuple[str, ...] = ()
    """Stop at this text, which is cut from the result (repeatable)."""
    seed: int | None = None
    """Seed of the sampler, for repeatable samples (none: a fresh sample each time)."""


SAMPLING = SamplingConfig()
CHAT_SAMPLING = SamplingConfig(max_new_tokens=256, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1)
"""`danlu chat`'s defaults: a little cooler, with a mild repetition penalty, as chat models are usually run."""

DecodePrecision = Literal["fp32", "bf16", "fp16"]
"""Weights while decoding (danlu.generation.set_decode_precision)."""
