"""Seq2Seq: the encoder-decoder Transformer of Vaswani et al. 2017 ("Attention Is All You Need"), pre-norm.

Source tokens -> embedding (x sqrt(C), §3.4) + sinusoidal positions (§3.5) -> bidirectional blocks ->
memory. Target tokens (shifted right: BOS first) -> embedding + positions -> decoder layers, each a
causal self-attention (KV-cached while decoding), a cross-attention over the memory and a
feed-forward, every sub-layer pre-norm (Xiong et al. 2020) -> final norm -> head over the target
vocabulary. The encoder blocks and the decoder's self-attention and feed-forward are the zoo's own
(`blocks.Block`, `blocks.Attention`, `blocks.FeedForward`); only cross-attention is new here.

Tied embeddings (Press & Wolf 2017): the decoder's embedding is the output head; with one tokenizer for
both sides (`spec.target_vocab_size` 0) the encoder shares that matrix too, as Vaswani et al. §3.4 do.

With `spec.num_classes > 0` the encoder alone is a sequence classifier (mean of its states), so the
model fits every task of the zoo; with 0 it maps (source, target prefix) to next-token logits.

Incremental decoding: `memory = model.encode(ids, mask)`, `cache = model.new_cache(memory, mask, max_length)`,
then `model.decode(next_ids, cache=cache)` once per step; `cache.reorder(index)` follows beam search
(`new_cache(..., rows_per_source=beams)`: the beams of a source share its memory).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from danlu.kernels.attention import masked_attention
from danlu.models.blocks import Attention, Block, FeedForward, init_weights, make_norm, padding_mask, sinusoidal_table
from danlu.models.shapes import TransformerShape
from danlu.schema import Literal, NonNegative, Positive


@dataclass(frozen=True)
class Seq2SeqConfig(TransformerShape):
    """The shared Transformer fields (danlu.models.shapes), this family's defaults for some, and its own."""

    kind: str = "seq2seq"
    num_layers: NonNegative = 0
    """Both encoder_layers and decoder_layers when not 0 (a shorthand; the conformance sizes use it)."""
    size: str = ""
    """A preset of SIZE_PRESETS below (tiny, small, base) whose values fill the keys this section leaves out."""
    num_kv_heads: NonNegative = 0
    """Key/value heads of the attentions (0: num_heads)."""
    encoder_layers: Positive = 3
    decoder_layers: Positive = 3
    max_positions: Positive = 512
    """Rows of the sinusoidal position table; the data's max_length + 2 is used when it is larger."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"
    bias: bool = True
    tie_embeddings: bool = True
    """The output head is the decoder's embedding (and the encoder's, when both sides share a tokenizer)."""

    @property
    def layers(self):
        """(encoder layers, decoder layers)."""
        return (self.num_layers, self.num_layers) if self.num_layers else (self.encoder_layers, self.decoder_layers)


# Presets are data: field overrides for Seq2SeqConfig.
SIZE_PRESETS = {
    "tiny": dict(embed_dim=64, num_heads=2, encoder_layers=2, decoder_layers=2, max_positions=256),  # for tests
    "small": dict(embed_dim=256, num_heads=4, encoder_layers=3, decoder_layers=3, intermediate_dim=1024),
    "base": dict(embed_dim=512, num_heads=8, encoder_layers=6, decoder_layers=6, intermediate_dim=2048),  # Vaswani base
}


class CrossAttention(nn.Module):
    """Decoder queries over the encoder memory (Vaswani et al. §3.2.3). The memory's keys and values are
    computed once per source (`memory_kv`) and reused at every decoding step. When the queries have
    `g` rows per source (beam search's beams), x has g times the rows of the memory: the g rows of a
    source then attend as g x T queries of that one source, so the memory is never copied per beam
    (attention over the memory has no order among queries, so the result is the same)."""

    def __init__(self, embed_dim, num_heads, num_kv_heads, bias=True, dropout=0.0):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, embed_dim // num_heads
        self.dropout = dropout
        self.q = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.kv = nn.Linear(embed_dim, 2 * num_kv_heads * self.head_dim, bias=bias)
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_dropout = nn.Dropout(dropout)

    def memory_kv(self, memory):
        """memory (B, S, C) -> keys, values (B, K, S, D) each."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2 * self.num_kv_heads, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        return k, v  # (B, K, S, D) each

    def forward(self, x, kv, mask=None):
        """x (B*g, T, C), the g rows of each source adjacent; kv = memory_kv(memory) of B sources;
        mask bool (B, 1, 1, S), True = a real source token."""
        N, T, C = x.shape
        B = kv[0].shape[0]
        q = self.q(x).view(B, N // B * T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, g*T, D)
        y = masked_attention(q, kv[0], kv[1], mask, self.dropout if self.training else 0.0)  # (B, H, g*T, D)
        return self.out_dropout(self.out(y.transpose(1, 2).reshape(N, T, C)))  # (B*g, T, C)


class DecoderLayer(nn.Module):
    """x + self_attn(norm(x)) (causal), x + cross_attn(norm(x), memory), x + ffn(norm(x))."""

    def __init__(self, c: Seq2SeqConfig):
        super().__init__()
        C = c.embed_dim
        self.attn_norm = make_norm(c.norm, C, c.norm_eps, c.bias)
        self.attn = Attention(C, c.num_heads, c.kv_heads, c.bias, c.dropout, causal=True)
        self.cross_norm = make_norm(c.norm, C, c.norm_eps, c.bias)
        self.cross = CrossAttention(C, c.num_heads, c.kv_heads, c.bias, c.dropout)
        self.ffn_norm = make_norm(c.norm, C, c.norm_eps, c.bias)
        self.ffn = FeedForward(C, c.ffn_dim, c.mlp, c.bias, c.dropout)

    def forward(self, x, memory_kv, memory_mask, kv=None, start=0):
        x = x + self.attn(self.attn_norm(x), None, None, kv, start)  # (B, T, C)
        x = x + self.cross(self.cross_norm(x), memory_kv, memory_mask)  # (B, T, C)
        return x + self.ffn(self.ffn_norm(x))  # (B, T, C)


class Seq2SeqCache:
    """What decoding keeps: the decoder's self-attention keys and values of every row, and every layer's
    memory keys and values and key mask, once per source (a source's `rows // sources` rows share them).

    The self-attention slots are stored position-major, (2L, S, rows, K, D) (keys and values of each
    layer), so that `reorder` gathers the filled slots into a second buffer in one index_select and swaps
    the two: beam search's per-step reordering is one copy of the filled slots, with no temporaries.
    `layer(i)` hands Attention the usual (rows, K, S, D) views of them."""

    def __init__(self, slots, memory_kv, memory_mask, length=0):
        """slots (2L, S, rows, K, D), of which the first `length` positions are filled; memory_kv one (keys,
        values) pair (B, K, S_source, D) per layer; memory_mask (B, 1, 1, S_source) bool or None."""
        self.slots, self.spare = slots, None
        self.memory_kv, self.memory_mask = memory_kv, memory_mask
        self.length = length

    @property
    def max_length(self):
        return self.slots.shape[1]

    def layer(self, index):
        """The (keys, values) buffers of one layer, each a (rows, K, S, D) view."""
        return self.slots[2 * index].permute(1, 2, 0, 3), self.slots[2 * index + 1].permute(1, 2, 0, 3)

    def reorder(self, index):
        """Keep rows `index` (N,) of the filled slots; every row must stay among its own source's rows
        (beam search), since the memory is not reordered."""
        n = self.length
        if self.spare is None:
            self.spare = torch.empty_like(self.slots)
        torch.index_select(self.slots[:, :n], 2, index, out=self.spare[:, :n])  # (2L, n, N, K, D)
        self.slots, self.spare = self.spare, self.slots


class Seq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig, spec):
        super().__init__()
        self.config = config
        self.num_classes = spec.num_classes
        c, C = config, config.embed_dim
        target_vocab = getattr(spec, "target_vocab_size", 0) or spec.vocab_size
        self.shared_vocab = target_vocab == spec.vocab_size and not getattr(spec, "target_vocab_size", 0)
        self.embed = nn.Embedding(spec.vocab_size, C)  # the encoder's (source) embedding
        self.register_buffer("position_table", sinusoidal_table(max(c.max_positions, spec.max_length + 2), C),
                             persistent=False)  # (P, C): fixed, recomputed on load
        self.dropout = nn.Dropout(c.dropout)
        encoder_layers, decoder_layers = c.layers
        self.encoder = nn.ModuleList(Block(C, c.num_heads, c.kv_heads, c.ffn_dim, c.mlp, c.norm, c.norm_eps, c.bias,
                                           c.dropout) for _ in range(encoder_layers))
        self.encoder_norm = make_norm(c.norm, C, c.norm_eps, c.bias)
        if spec.num_classes > 0:  # an encoder classifier: no decoder at all
            self.head = nn.Linear(C, spec.num_classes)
            init_weights(self, num_layers=encoder_layers)
            return
        self.target_embed = nn.Embedding(target_vocab, C)
        self.decoder = nn.ModuleList(DecoderLayer(c) for _ in range(decoder_layers))
        self.decoder_norm = make_norm(c.norm, C, c.norm_eps, c.bias)
        self.head = nn.Linear(C, target_vocab, bias=False)
        init_weights(self, num_layers=encoder_layers + decoder_layers)
        if c.tie_embeddings:
            self.head.weight = self.target_embed.weight
            if self.shared_vocab:
                self.embed.weight = self.target_embed.weight

    def _embed(self, table, ids, start=0):
        T = ids.shape[1]
        if start + T > self.position_table.shape[0]:
            raise ValueError(f"{start + T} positions needed; the model has {self.position_table.shape[0]} "
                             f"(model.max_positions)")
        x = table(ids) * math.sqrt(self.config.embed_dim) + self.position_table[start : start + T]  # (B, T, C)
        return self.dropout(x)

    def encode(self, input_ids, attention_mask=None):
        """Source ids (B, S), mask (B, S) bool (True = real token) -> memory (B, S, C)."""
        mask = padding_mask(attention_mask) if attention_mask is not None and not attention_mask.all() else None
        return self.encode_with_key_mask(input_ids, mask)

    def encode_with_key_mask(self, input_ids, key_mask):
        """`encode` given the key mask (B, 1, 1, S) itself (or None): no branch on the data (graph capture)."""
        x = self._embed(self.embed, input_ids)  # (B, S, C)
        for block in self.encoder:
            x = block(x, key_mask)  # (B, S, C)
        return self.encoder_norm(x)

    def decode(self, decoder_input_ids, memory=None, attention_mask=None, cache=None):
        """Next-token logits (B, T, V) of target prefixes (B, T) (right padding needs no mask: under
        causality real tokens never see it). Without `cache`, over `memory` (B, S, C) with source mask
        `attention_mask` (B, S); with it, decoder_input_ids are the T tokens after those cached."""
        return self.head(self.decoder_states(decoder_input_ids, memory, attention_mask, cache))  # (B, T, V)

    def decoder_states(self, decoder_input_ids, memory=None, attention_mask=None, cache=None):
        """The decoder's final (normed) hidden states (B, T, C); `decode` without the head."""
        if cache is None:
            mask = padding_mask(attention_mask) if attention_mask is not None and not attention_mask.all() else None
            memory_kv, start, kv = [layer.cross.memory_kv(memory) for layer in self.decoder], 0, None
        else:
            memory_kv, mask, start = cache.memory_kv, cache.memory_mask, cache.length
            if start and decoder_input_ids.shape[1] > 1:  # SDPA's is_causal would align the queries to key 0
                raise ValueError("after the first step, decode one token at a time with the cache")
            if start + decoder_input_ids.shape[1] > cache.max_length:
                raise ValueError(f"KV cache holds {cache.max_length} tokens; more needed")
        x = self._embed(self.target_embed, decoder_input_ids, start)  # (B, T, C)
        for i, layer in enumerate(self.decoder):
            kv = cache.layer(i) if cache is not None else None
            x = layer(x, memory_kv[i], mask, kv, start)  # (B, T, C)
        if cache is not None:
            cache.length = start + decoder_input_ids.shape[1]
        return self.decoder_norm(x)  # (B, T, C)

    @property
    def lm_head(self):
        """The output layer when it is one plain bias-free linear map, so that `hidden @ lm_head.weight.T` are the
        logits of `forward(..., return_hidden=True)`'s states (Seq2SeqTask's loss reads it); None otherwise."""
        head = self.head
        return head if self.num_classes == 0 and type(head) is nn.Linear and head.bias is None else None

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, return_hidden=False):
        """Logits (B, T, target vocab) for the target prefixes decoder_input_ids (B, T) given the source
        input_ids (B, S); a classifier (spec.num_classes > 0): logits (B, num_classes) of the source.
        With `return_hidden`, the decoder's final (normed) states (B, T, C) that the head maps to logits."""
        memory = self.encode(input_ids, attention_mask)  # (B, S, C)
        if self.num_classes > 0:
            if attention_mask is None:
                return self.head(memory.mean(1))  # (B, num_classes)
            weights = attention_mask.unsqueeze(-1).to(memory.dtype)  # (B, S, 1)
            return self.head((memory * weights).sum(1) / weights.sum(1).clamp(min=1.0))  # (B, num_classes)
        if decoder_input_ids is None:
            raise ValueError("a seq2seq model needs decoder_input_ids (the target shifted right, BOS first)")
        if return_hidden:
            return self.decoder_states(decoder_input_ids, memory, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask)

    def new_cache(self, memory, attention_mask, max_length, rows_per_source=1):
        """A Seq2SeqCache for decoding up to `max_length` target tokens after the source memory (B, S, C), with
        `rows_per_source` adjacent rows per source (beam search's beams) sharing that source's memory."""
        c, B = self.config, memory.shape[0]
        mask = padding_mask(attention_mask) if attention_mask is not None and not attention_mask.all() else None
        slots = memory.new_zeros(2 * len(self.decoder), max_length, B * rows_per_source, c.kv_heads, c.head_dim)
        return Seq2SeqCache(slots, [layer.cross.memory_kv(memory) for layer in self.decoder], mask)  # (2L, S, N, K, D)
