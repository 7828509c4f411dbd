"""Transformer blocks shared by the zoo: norms, positions, attention, feed-forward, the pre-norm block.

Written once and composed by `transformer.py` (encoder classifier), `gpt.py` (decoder) and `bert.py`
(post-norm encoder). Shapes: B batch, T query length, S key length, C = embed_dim, H heads,
K key/value heads, D head_dim.

Attention masks are boolean and broadcast to (B, H, T, S); True means "may attend". `None` means no
mask at all, which lets `scaled_dot_product_attention` take its fastest kernels (with `is_causal=True`
for a decoder).
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from danlu.kernels.attention import causal_attention, masked_attention
from danlu.kernels.table_gelu import gelu


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019) exactly as Hugging Face Llama computes it:
    statistics in fp32, the normalized value cast back to the input dtype, then `weight * x`."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(kind, dim, eps=1e-5, bias=True):
    """`layernorm` or `rmsnorm` over the last dimension."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    raise ValueError(f"norm: unknown value {kind!r}; expected one of: layernorm, rmsnorm")


def make_dropout(p):
    """nn.Dropout(p), or for p == 0 an nn.Identity: a dropout of 0 still costs an op and a module call at every
    layer of every decoding step (about 2% of a one-row step of benchmarks/generate.py's model)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


# ----------------------------------------------------------------------------------------- positions


def sinusoidal_table(length, dim):
    """Fixed positions of Vaswani et al. 2017 §3.5: sin on even channels, cos on odd ones. (length, dim)"""
    position = torch.arange(length, dtype=torch.float32)[:, None]  # (L, 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)  # (L, ceil(dim/2))
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])  # (L, floor(dim/2))
    return table


def rope_tables(positions, head_dim, theta=10000.0, dtype=torch.float32):
    """cos and sin tables of rotary embeddings (Su et al. 2021, RoFormer) for `positions` (B, T).

    Computed in fp32 from the position ids each call (cheap, and exact at any length), with the
    Hugging Face Llama frequencies and half-split layout; returns two (B, 1, T, D) tensors in `dtype`.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (D/2,)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (B, T, D)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]  # (B, 1, T, D) each


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)  # (..., D/2) each
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate query or key heads x (B, H, T, D) by their positions' angles."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # no-ops outside autocast
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------- masks


def padding_mask(attention_mask):
    """(B, S) bool, True = real token -> (B, 1, 1, S) key mask for bidirectional attention.

    A row with no real token at all attends to everything instead of nothing, so that it stays finite.
    """
    keys = attention_mask | ~attention_mask.any(-1, keepdim=True)  # (B, S)
    return keys[:, None, None, :]


def causal_padding_mask(key_mask, start=0):
    """Causal mask for queries in slots start..S-1 over keys 0..S-1 of `key_mask` (B, S) -> (B, 1, T, S).

    Padded keys are masked out; each query also sees itself, so a padding query never has an empty
    row (its output is ignored anyway). Works for left padding, the layout of batched generation.
    """
    S = key_mask.shape[-1]
    query_slot = torch.arange(start, S, device=key_mask.device)[:, None]  # (T, 1)
    key_slot = torch.arange(S, device=key_mask.device)[None, :]  # (1, S)
    allowed = (key_slot <= query_slot) & key_mask[:, None, None, :]  # (B, 1, T, S)
    return allowed | (key_slot == query_slot)


def mean_over_tokens(x, attention_mask=None):
    """(B, T, C) -> (B, C): the mean over each row's real tokens (`attention_mask` (B, T) bool, True = real;
    None: all T). A row with no real token gives zeros."""
    if attention_mask is None:
        return x.mean(1)  # (B, C)
    weights = attention_mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, C)


# ----------------------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to `max_length` slots.

    `mask` (B, S) records which filled slots hold real tokens (False for left padding), so position ids
    and key masks of later steps follow from it; `length` is the number of slots filled so far.
    Built by a model's `new_cache(batch_size, max_length)`.
    """

    def __init__(self, num_layers, batch_size, num_kv_heads, max_length, head_dim, dtype, device):
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, K, S, D)
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, K, S, D)
        self.mask = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)  # (B, S)
        self.length = 0
        self.padded = False  # whether any filled slot is padding (else decoding needs no mask at all)

    @property
    def max_length(self):
        return self.mask.shape[1]

    def layer(self, index):
        """The (keys, values) buffers of one layer, each (B, K, S, D)."""
        return self.keys[index], self.values[index]


# ----------------------------------------------------------------------------------------- layers


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017) with grouped-query heads
    (Ainslie et al. 2023): `num_kv_heads` key/value heads, each shared by num_heads / num_kv_heads
    query heads. One fused qkv projection; the heads run in one `scaled_dot_product_attention` call, or
    for a whole causal window in `danlu.kernels.causal_attention`, bidirectional (padding masked) in
    `danlu.kernels.masked_attention` (the same results, faster on CPU in bf16)."""

    def __init__(self, embed_dim, num_heads, num_kv_heads=None, bias=True, dropout=0.0, causal=False):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if embed_dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}), "
                f"and num_heads by num_kv_heads ({num_kv_heads})"
            )
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=bias)
        self.out = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias)
        self.out_dropout = make_dropout(dropout)

    def forward(self, x, mask=None, rope=None, kv=None, start=0):
        """x (B, T, C); mask bool (B, 1, T, S) or None; rope = (cos, sin) or None;
        kv = one layer's cache buffers (keys, values): this step's keys go to slots start..start+T-1
        and attention reads slots 0..start+T-1 (a mask is then required)."""
        B, T, C = x.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, K * D, K * D], dim=-1)  # (B, T, H*D), (B, T, K*D) x 2
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is not None:
            keys, values = kv  # (B, K, S_max, D) each
            keys[:, :, start : start + T] = k
            values[:, :, start : start + T] = v
            k, v = keys[:, :, : start + T], values[:, :, : start + T]  # (B, K, S, D)
        dropout = self.dropout if self.training else 0.0
        if self.causal and mask is None and kv is None:  # one whole window
            y = causal_attention(q, k, v, dropout)  # (B, H, T, D)
        elif not self.causal and kv is None:  # bidirectional (an encoder), padding masked
            y = masked_attention(q, k, v, mask, dropout)  # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                # a cached prompt is causal from slot 0; one query (a decoding step) sees every cached key,
                # where SDPA's is_causal would align it to key 0
                is_causal=self.causal and mask is None and T > 1,
                enable_gqa=K != H,  # SDPA broadcasts the shared heads; no repeat_interleave copy
            )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.out_dropout(self.out(y))  # (B, T, C)


class FeedForward(nn.Module):
    """Position-wise MLP. `gelu` (erf), `gelu_tanh` (GPT-2's approximation) or `swiglu`
    (Shazeer 2020: down(silu(gate(x)) * up(x)), gate and up fused into one projection). The GELU is
    `danlu.kernels.gelu`: F.gelu's values, a table lookup for 16-bit inputs on CPU."""

    def __init__(self, embed_dim, intermediate_dim, activation="gelu", bias=True, dropout=0.0):
        super().__init__()
        if activation not in ("gelu", "gelu_tanh", "swiglu"):
            raise ValueError(f"mlp: unknown value {activation!r}; expected one of: gelu, gelu_tanh, swiglu")
        self.activation = activation
        width = 2 * intermediate_dim if activation == "swiglu" else intermediate_dim
        self.up = nn.Linear(embed_dim, width, bias=bias)
        self.down = nn.Linear(intermediate_dim, embed_dim, bias=bias)
        self.dropout = make_dropout(dropout)

    def forward(self, x):
        h = self.up(x)  # (B, T, I) or (B, T, 2I)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)  # (B, T, I) each
            h = F.silu(gate) * up
        else:
            h = gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.dropout(self.down(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm Transformer block (Xiong et al. 2020; GPT-2): x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(
        self,
        embed_dim,
        num_heads,
        num_kv_heads=None,
        intermediate_dim=None,
        mlp="gelu",
        norm="layernorm",
        norm_eps=1e-5,
        bias=True,
        dropout=0.0,
        causal=False,
    ):
        super().__init__()
        self.attn_norm = make_norm(norm, embed_dim, norm_eps, bias)
        self.attn = Attention(embed_dim, num_heads, num_kv_heads, bias, dropout, causal)
        self.ffn_norm = make_norm(norm, embed_dim, norm_eps, bias)
        self.ffn = FeedForward(embed_dim, intermediate_dim or 4 * embed_dim, mlp, bias, dropout)

    def forward(self, x, mask=None, rope=None, kv=None, start=0):
        x = x + self.attn(self.attn_norm(x), mask, rope, kv, start)  # (B, T, C)
        return x + self.ffn(self.ffn_norm(x))  # (B, T, C)


def init_weights(model, std=0.02, num_layers=0):
    """GPT-2 initialisation: linears and embeddings ~ N(0, std), biases zero, norms at identity.

    With `num_layers`, the projections that write into the residual stream (attention `out`,
    feed-forward `down`) get std / sqrt(2 * num_layers), so the stream's variance does not grow with
    depth (Radford et al. 2019, §2.3).
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            scaled = num_layers and name.endswith(("attn.out", "ffn.down"))
            nn.init.normal_(module.weight, 0.0, std / math.sqrt(2 * num_layers) if scaled else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
