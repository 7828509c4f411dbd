"""GPT: a decoder-only Transformer language model (Radford et al. 2018/2019), nanoGPT-shaped.

Token embedding -> pre-norm causal blocks -> final norm -> head. The same class covers the GPT-2
recipe (learned positions, LayerNorm, GELU, biases) and the Llama recipe (RoPE, Su et al. 2021;
RMSNorm; SwiGLU, Shazeer 2020; grouped-query attention, Ainslie et al. 2023; no biases), whose math
follows Hugging Face Llama so that checkpoints such as SmolLM2-135M load into it.

With `spec.num_classes == 0` it returns next-token logits (B, T, vocab); otherwise it is a sequence
classifier reading the hidden state of each row's last real token, (B, num_classes).

`forward(..., return_hidden=True)` returns the final hidden states (B, T, C) instead, before the head. A
language model's loss can then multiply them by the head's weight itself (`lm_head`), a chunk at a time,
and never hold the (B, T, vocab) logits: CausalLMTask does so with `danlu.kernels.lm_head_loss` while
training. The loss stays outside the model, and the states go through the forward of whatever wraps the
model: DDP (gradient sync), FSDP2 (the root module keeps its gathered weights, the head's among them,
from the forward to the backward) and torch.compile (the loss, fused by hand, is not traced).

Incremental decoding: `cache = model.new_cache(B, max_length)`, then call the model on the prompt
and on each new token with `cache=cache`; the cache remembers which slots are padding, so a
left-padded batch decodes with the right positions and never attends to its padding.
"""
from dataclasses import dataclass

import torch
from torch import nn

from danlu.models.blocks import (Block, KVCache, causal_padding_mask, init_weights, make_dropout, make_norm,
                                 mean_over_tokens, rope_tables)
from danlu.models.shapes import TransformerShape
from danlu.registry import ConfigError
from danlu.schema import Annotated, Fraction, Literal, NonNegative, Positive, Range


@dataclass(frozen=True)
class GPTConfig(TransformerShape):
    """The shared Transformer fields (danlu.models.shapes), GPT's defaults for some, and GPT's own."""

    kind: str = "gpt"
    embed_dim: Positive = 384
    num_heads: Positive = 6
    num_layers: Positive = 6
    dropout: Fraction = 0.0
    size: str = ""
    """A preset of SIZE_PRESETS below (tiny, small, base, llama) whose values fill the keys this section leaves out."""
    num_kv_heads: NonNegative = 0
    """Key/value heads for grouped-query attention (0: num_heads, plain multi-head attention)."""
    positions: Literal["learned", "rope"] = "learned"
    """learned (GPT-2's table of max_positions rows) or rope (rotary, Su et al. 2021)."""
    max_positions: Positive = 1024
    """Rows of the learned position table; the data's max_length is used when it is larger."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"
    """gelu (erf), gelu_tanh (GPT-2's approximation) or swiglu (Shazeer 2020)."""
    bias: bool = True
    """Biases in the linear layers and LayerNorms (GPT-2: yes; Llama: no)."""
    tie_embeddings: bool = True
    """The output head shares the token embedding matrix (Press & Wolf 2017)."""
    rope_theta: Annotated[float, Range(gt=0)] = 10000.0
    """Base of the rotary frequencies (SmolLM2: 100000)."""
    pooling: Literal["last", "mean"] = "last"
    """Classifier input: last (the last real token's state, as GPT-1 fine-tuning) or mean (over real tokens)."""

    def __post_init__(self):
        super().__post_init__()
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.positions=rope needs an even head size, got {self.head_dim}")

    @property
    def ffn_dim(self):
        if self.mlp == "swiglu" and not self.intermediate_dim:  # the parameter count of a 4x GELU MLP (Shazeer 2020)
            return (8 * self.embed_dim // 3 + 63) // 64 * 64
        return super().ffn_dim


# Presets are data: field overrides for GPTConfig, e.g. GPTConfig(**SIZE_PRESETS["base"]).
SIZE_PRESETS = {
    "tiny": dict(num_layers=2, embed_dim=64, num_heads=2, max_positions=256),  # for tests
    "small": dict(num_layers=6, embed_dim=384, num_heads=6),
    "base": dict(  # GPT-2 small (124M with its 50257-token vocabulary)
        num_layers=12, embed_dim=768, num_heads=12, max_positions=1024, positions="learned",
        norm="layernorm", mlp="gelu_tanh", bias=True, tie_embeddings=True,
    ),
    "llama": dict(  # SmolLM2-135M's shape (vocabulary 49152 comes from its tokenizer)
        num_layers=30, embed_dim=576, num_heads=9, num_kv_heads=3, intermediate_dim=1536,
        positions="rope", rope_theta=100000.0, max_positions=8192, norm="rmsnorm", norm_eps=1e-5,
        mlp="swiglu", bias=False, tie_embeddings=True,
    ),
}


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, spec):
        super().__init__()
        self.config = config
        self.num_classes = spec.num_classes
        C = config.embed_dim
        self.embed = nn.Embedding(spec.vocab_size, C)
        if config.positions == "learned":
            self.positions = nn.Embedding(max(config.max_positions, spec.max_length), C)
        self.dropout = make_dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(C, config.num_heads, config.kv_heads, config.ffn_dim, config.mlp, config.norm,
                  config.norm_eps, config.bias, config.dropout, causal=True)
            for _ in range(config.num_layers)
        )
        self.norm = make_norm(config.norm, C, config.norm_eps, config.bias)
        if spec.num_classes > 0:
            self.head = nn.Linear(C, spec.num_classes)
        else:
            self.head = nn.Linear(C, spec.vocab_size, bias=False)
        init_weights(self, num_layers=config.num_layers)
        if spec.num_classes == 0 and config.tie_embeddings:
            self.head.weight = self.embed.weight

    def new_cache(self, batch_size, max_length, dtype=None):
        """An empty KVCache for `batch_size` rows of up to `max_length` tokens (prompt + generated)."""
        c, weight = self.config, self.embed.weight
        return KVCache(c.num_layers, batch_size, c.kv_heads, max_length, c.head_dim, dtype or weight.dtype,
                       weight.device)

    @property
    def lm_head(self):
        """The output layer of a language model when it is one plain linear map (no bias, no adapter), so
        that `hidden @ lm_head.weight.T` are the logits of `forward(..., return_hidden=True)`'s states;
        None for a classifier or a head that is anything else (e.g. LoRA-wrapped)."""
        head = self.head
        return head if self.num_classes == 0 and type(head) is nn.Linear and head.bias is None else None

    def forward(self, input_ids, attention_mask=None, cache=None, positions=None, return_hidden=False,
                last_only=False):
        """input_ids (B, T); attention_mask (B, T) bool, True = real token, padding on either side.

        With `cache`, input_ids are the next T tokens after those already cached (the whole prompt
        first, then one token per step); attention_mask covers these T tokens (or all tokens so far)
        and defaults to all real. `positions` (B, T) overrides the position ids, which otherwise
        count real tokens from each row's first one. Returns logits (B, T, vocab) or (B, num_classes);
        with `return_hidden`, the final (normed) hidden states (B, T, C) that the head maps to logits.
        `last_only` (a language model's) keeps the last position alone, (B, 1, vocab) or (B, 1, C): a prompt's
        forward pass before decoding needs no other, and the head over every prompt token costs as much as
        dozens of decoding steps' heads.
        """
        B, T = input_ids.shape
        mask, start, end = None, 0, T  # mask None: plain causal attention, SDPA's fastest path
        if cache is not None:
            start, end = cache.length, cache.length + T
            if end > cache.max_length:
                raise ValueError(f"KV cache holds {cache.max_length} tokens; {end} needed")
            if attention_mask is not None:
                cache.mask[:, start:end] = attention_mask[:, -T:]
                cache.padded = cache.padded or not bool(attention_mask[:, -T:].all())
            else:
                cache.mask[:, start:end] = True
            if cache.padded or (start > 0 and T > 1):
                seen = cache.mask[:, :end]  # (B, S) real slots so far
                mask = causal_padding_mask(seen, start)  # (B, 1, T, S)
                if positions is None:
                    positions = (seen.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T)
            elif positions is None:  # no padding: the prompt is plain causal, a single new token sees all
                positions = torch.arange(start, end, device=input_ids.device)[None]  # (1, T)
        elif attention_mask is not None and not attention_mask[:, 0].all():
            # Left padding: mask the padded keys and start each row's positions at its first real
            # token. (Right padding needs neither: under causality real tokens never see it.)
            mask = causal_padding_mask(attention_mask)  # (B, 1, T, T)
            if positions is None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        if positions is None:
            positions = torch.arange(T, device=input_ids.device)[None]  # (1, T)

        x = self.embed(input_ids)  # (B, T, C)
        rope = None
        if self.config.positions == "learned":
            x = x + self.positions(positions)  # (B, T, C)
        else:
            rope = rope_tables(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, rope, cache.layer(i) if cache is not None else None, start)  # (B, T, C)
        if cache is not None:
            cache.length = end
        if last_only and self.num_classes == 0:
            x = x[:, -1:]  # (B, 1, C)
        x = self.norm(x)  # (B, T, C)
        if return_hidden:
            return x  # (B, T, C)
        if self.num_classes > 0:
            if self.config.pooling == "mean":
                x = mean_over_tokens(x, None if attention_mask is None else attention_mask[:, -T:])  # (B, C)
            elif attention_mask is None:
                x = x[:, -1]  # (B, C)
            else:  # each row's last real token, wherever the padding is
                last = T - 1 - attention_mask[:, -T:].flip(-1).int().argmax(-1)  # (B,)
                x = x[torch.arange(B, device=x.device), last]  # (B, C)
        return self.head(x)  # (B, T, vocab) or (B, num_classes)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, temperature=0.0, top_k=0,
                 eos_id=None):
        """Continue a (left-padded) batch of prompts with the KV cache; returns the new tokens (B, N).

        temperature 0 picks the most likely token (greedy); otherwise sample from softmax(logits / t),
        among the top_k tokens when top_k > 0. Rows that produced `eos_id` keep producing it.

        >>> new = model.eval().generate(ids, mask, max_new_tokens=20, temperature=0.8, top_k=50)
        """
        B, T = input_ids.shape
        cache = self.new_cache(B, T + max_new_tokens)
        logits = self(input_ids, attention_mask, cache=cache, last_only=True)[:, -1]  # (B, vocab)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        tokens = []
        for step in range(max_new_tokens):
            if temperature > 0:
                logits = logits / temperature
                if top_k > 0:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(logits.float().softmax(-1), 1)[:, 0]  # (B,)
            else:
                next_id = logits.argmax(-1)  # (B,)
            if eos_id is not None:
                next_id = next_id.masked_fill(done, eos_id)
                done |= next_id == eos_id
            tokens.append(next_id)
            if step + 1 == max_new_tokens or (eos_id is not None and done.all()):
                break
            logits = self(next_id[:, None], cache=cache)[:, -1]  # (B, vocab)
        return torch.stack(tokens, dim=1)  # (B, N)
