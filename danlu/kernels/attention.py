"""Causal self-attention over one whole window, and attention under a padding mask, by the fastest path on
the device.

bf16 on CPU, short windows, no dropout: torch's fused CPU kernel (flash attention, computing in fp32) is
slower there than three plain ops on the bf16 matmul kernels. `benchmarks/gpt_train.py` measures a whole
training step both ways at context 256 (its "fused SDPA only" row: 1.51x against 1.24x transformers, see
docs/pretraining.md). Longer windows favour the fused kernel, which never holds the (T, T) scores; fp32
stays on it too.

The same holds, more so, for attention under a boolean mask (the encoder's padding, a decoder's
cross-attention over a padded source): at verse length (B 64, 4 heads, 45 x 45, head 64, bf16) torch's
fused CPU kernel takes 78 ms for forward and backward, `unfused_masked_attention` 20 ms.
"""
import torch
from torch.nn import functional as F

UNFUSED_MAX_LENGTH = 512
"""Longest window that runs unfused (0: never)."""


def causal_attention(q, k, v, dropout_p=0.0):
    """`F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)` for queries and keys of
    the same window: q (B, H, T, D), k and v (B, K, T, D) with K dividing H (grouped-query heads are
    broadcast by SDPA). Returns (B, H, T, D)."""
    if unfused_is_faster(q, k, dropout_p):
        return unfused_causal_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                          enable_gqa=k.size(1) != q.size(1))  # no repeat_interleave copy


def unfused_is_faster(q, k, dropout_p=0.0):
    """Whether `unfused_causal_attention` beats SDPA here: bf16 on CPU, as many key heads as query heads,
    no dropout and a window of at most UNFUSED_MAX_LENGTH tokens."""
    return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and k.size(1) == q.size(1) and not dropout_p
            and q.size(-2) <= UNFUSED_MAX_LENGTH)


_CAUSAL_BIAS = {}  # (device, dtype) -> (L, L): 0 on and below the diagonal, -inf above; L the longest window yet


def _causal_bias(T, device, dtype):
    """The (T, T) causal bias: the top-left corner of one cached bias, so that windows of many lengths
    (bucketed batches) share one tensor instead of keeping one each."""
    bias = _CAUSAL_BIAS.get((device, dtype))
    if bias is None or bias.size(0) < T:
        future = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
        bias = _CAUSAL_BIAS[(device, dtype)] = torch.zeros(T, T, dtype=dtype, device=device).masked_fill_(future, float("-inf"))
    return bias[:T, :T]


def unfused_causal_attention(q, k, v):
    """softmax(q k^T / sqrt(D) + causal mask) v for (B, H, T, D) inputs. The mask is added as a bias
    inside the first matmul (baddbmm), so no pass of its own forward or backward. The softmax runs on
    the scores in their own dtype: torch's CPU kernel computes a bf16 row in fp32 and rounds once on
    writing, as an fp32 softmax cast back to bf16 would, without that cast-and-copy round trip."""
    B, H, T, D = q.shape
    bias = _causal_bias(T, q.device, q.dtype)
    scores = torch.baddbmm(bias.expand(B * H, T, T), q.reshape(B * H, T, D), k.reshape(B * H, T, D).transpose(1, 2),
                           alpha=D**-0.5)  # (B*H, T, T)
    return (scores.softmax(-1) @ v.reshape(B * H, T, D)).view(B, H, T, D)


def masked_attention(q, k, v, mask=None, dropout_p=0.0):
    """`F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)` without causality:
    q (B, H, T, D), k and v (B, K, S, D) with K dividing H, mask bool broadcastable to (B, H, T, S) (True = a
    key the query sees; every query must see one) or None. Returns (B, H, T, D)."""
    if unfused_is_faster(q, k, dropout_p) and k.size(-2) <= UNFUSED_MAX_LENGTH and (mask is None or mask.dtype == torch.bool):
        return unfused_masked_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=k.size(1) != q.size(1))


def unfused_masked_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(D) + bias) v for q (B, H, T, D), k and v (B, H, S, D), the bias -inf where the
    boolean mask is False (broadcast over heads and queries as the mask is). As in unfused_causal_attention
    the softmax runs in the scores' own dtype."""
    scores = (q @ k.transpose(-1, -2)).mul_(q.size(-1) ** -0.5)  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v  # (B, H, T, D)
