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
    query heads. One fused qkv projection; the heads run in one `scaled_dot_product_attention` call."""

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
        self.out_dropout = nn.Dropout(dropout)

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
        if self.causal and mask is None and kv is None and _unfused_is_faster(q, K == H, self.training and self.dropout):
            y = unfused_causal_attention(q, k, v)  # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                # one query (a decoding step) sees every cached key; SDPA's is_causal would align it to key 0
                is_causal=self.causal and mask is None and (kv is None or T > 1),
                enable_gqa=K != H,  # SDPA broadcasts the shared heads; no repeat_interleave copy
            )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.out_dropout(self.out(y))  # (B, T, C)


UNFUSED_MAX_LENGTH = 512


def _unfused_is_faster(q, same_heads, dropout):
    """bf16 on CPU, short windows, no dropout: torch's fused CPU kernel (flash attention, computing in
    fp32) is slower there than three plain ops on the bf16 matmul kernels (benchmarks/gpt_train.py
    measures a whole training step both ways, at context 256). Longer windows favour the fused kernel,
    which never holds the (T, T) scores; fp32 stays on it too."""
    return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and same_heads and not dropout
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


LM_LOSS_CHUNK = 256  # rows of logits at a time: 256 x vocab 8192 in fp32 is 8 MB, which stays in cache


def lm_head_loss(hidden, weight, labels, ignore_index=-100):
    """Mean next-token cross-entropy of `hidden @ weight.T` without holding the (N, V) logits: the rows go
    through in chunks, and each chunk's gradient is computed on the spot (the loss is the end of the graph,
    so it is known). Returns (loss, correct, count): the loss with its gradient, how many labels have the
    highest logit (ties count as right) and how many labels there are (IGNORE excluded).

    hidden (..., C), weight (V, C), labels (...). Under autocast the matmuls run in the autocast dtype and
    the softmax in fp32, as `cross_entropy(linear(hidden, weight).float(), labels)` would; the result is the
    same, computed with a fraction of the memory traffic (on CPU the (N, V) fp32 logits of a GPT-2-sized
    vocabulary are much larger than the cache)."""
    return (_uncompiled_loss or _lm_head_loss)(hidden, weight, labels, ignore_index)


def _lm_head_loss(hidden, weight, labels, ignore_index):
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
    return _LMHeadLoss.apply(hidden.reshape(-1, hidden.size(-1)), weight, labels.reshape(-1), ignore_index, dtype)


_uncompiled_loss = None


def keep_loss_uncompiled():
    """Have torch.compile run the LM loss as written (it returns Python counts, and is fused by hand),
    instead of breaking its graph inside it with a long warning. Called before compiling
    (danlu.models.compile_model), not at import: torch.compiler.disable loads torch._dynamo, about a
    second, which every process would pay."""
    global _uncompiled_loss
    if _uncompiled_loss is None:
        _uncompiled_loss = torch.compiler.disable(_lm_head_loss)


class _LMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(dtype) if dtype is not None else hidden
            w = weight.to(dtype) if dtype is not None else weight.to(hidden.dtype)
            valid = labels != ignore_index
            count = int(valid.sum())
            scale = 1.0 / max(count, 1)
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            correct = torch.zeros((), dtype=torch.long, device=hidden.device)  # read once at the end: one sync
            for start in range(0, h.size(0), LM_LOSS_CHUNK):
                rows = slice(start, start + LM_LOSS_CHUNK)
                y, keep = labels[rows].clamp(min=0), valid[rows]
                logits = (h[rows] @ w.t()).float()  # (n, V)
                top = logits.amax(-1)  # (n,)
                target = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (n,)
                # One row-at-a-time softmax kernel instead of logsumexp and a separate exp pass (on CPU
                # that kernel's exp is vectorized and a row stays in L1). The log-sum-exp is the top
                # logit minus the log of the largest probability, which is at least 1 / V: no underflow.
                probs = logits.softmax(-1)  # (n, V)
                lse = top - probs.amax(-1).log()  # (n,)
                total += ((lse - target) * keep).sum()
                correct += ((target >= top) & keep).sum()
                if need_h or need_w:
                    probs[torch.arange(probs.size(0), device=probs.device), y] -= 1.0
                    # d(mean loss) / d logits, 0 on ignored rows, written once in the matmul dtype
                    out = probs if w.dtype == probs.dtype else torch.empty_like(probs, dtype=w.dtype)
                    grad = torch.mul(probs, (keep * scale).unsqueeze(-1), out=out)
                    if need_h:
                        grad_h[rows] = grad @ w
                    if need_w:
                        grad_w.add_(grad.t() @ h[rows])  # a 16-bit product is added in fp32
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.have = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total * scale, int(correct), count

    @staticmethod
    def backward(ctx, grad_loss, _correct, _count):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_loss if ctx.have[0] else None
        grad_w = (saved.pop(0) * grad_loss).to(ctx.weight_dtype) if ctx.have[1] else None
        return grad_h, grad_w, None, None, None


TABLE_GELU_MIN_SIZE = 1 << 16  # smaller inputs (a decode step) are not worth the lookup's set-up


def gelu(x, approximate="none"):
    """`F.gelu`, with the same results. On CPU the tanh approximation of a 16-bit float tensor (bf16
    autocast) is looked up in a table of all 65,536 inputs instead: torch's kernel computes an exact
    fp32 `tanh` per element, which made it the largest cost of a small GPT's training step after
    the matmuls. The table is filled by torch's own kernel, so the values are bit for bit the same."""
    if (approximate != "tanh" or x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16)
            or x.numel() < TABLE_GELU_MIN_SIZE):
        return F.gelu(x, approximate=approximate)
    return _TableGELU.apply(x)


_GELU_TABLES = {}  # dtype -> (values, slopes), each indexed by an input's 16 bits read as an unsigned integer


def _gelu_tables(dtype):
    if dtype not in _GELU_TABLES:
        inputs = torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16).view(dtype)  # every 16-bit value
        values = F.gelu(inputs, approximate="tanh")
        # torch's backward for 16-bit inputs is float(grad) * slope(float(x)), rounded once: keep slopes in fp32
        slopes = torch.ops.aten.gelu_backward(torch.ones(inputs.shape), inputs.float(), approximate="tanh")
        _GELU_TABLES[dtype] = values, slopes
    return _GELU_TABLES[dtype]


TABLE_GELU_CHUNK = 1 << 17  # elements looked up at a time: their int64 indices (1 MB) stay in cache


def _bits(x):
    return x.reshape(-1).view(torch.uint16)  # each value's 16 bits: its row in the tables


def _chunks(x, *others):
    """(index, pieces): x's elements and the same elements of `others` (all flat), a chunk at a time, with
    each chunk's 16-bit patterns as int64 indices (index_select takes int32 or int64, and is faster with int64)."""
    bits = _bits(x)
    index = torch.empty(min(bits.numel(), TABLE_GELU_CHUNK), dtype=torch.long, device=x.device)
    for start in range(0, bits.numel(), TABLE_GELU_CHUNK):
        end = min(start + TABLE_GELU_CHUNK, bits.numel())
        yield index[: end - start].copy_(bits[start:end]), [t[start:end] for t in others]


class _TableGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        values, _ = _gelu_tables(x.dtype)
        if torch.compiler.is_compiling():  # one gather, which the compiler fuses with computing its indices
            return values.index_select(0, _bits(x).long()).view(x.shape)
        out = torch.empty(x.shape, dtype=x.dtype)
        for index, (piece,) in _chunks(x, out.view(-1)):
            torch.index_select(values, 0, index, out=piece)
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        _, slopes = _gelu_tables(x.dtype)
        if torch.compiler.is_compiling():
            return (slopes.index_select(0, _bits(x).long()).view(x.shape) * grad).to(grad.dtype)
        out = torch.empty(x.shape, dtype=grad.dtype)
        slope = torch.empty(min(x.numel(), TABLE_GELU_CHUNK))  # fp32
        for index, (g, piece) in _chunks(x, grad.reshape(-1), out.view(-1)):
            s = torch.index_select(slopes, 0, index, out=slope[: index.numel()])
            torch.mul(s, g, out=piece)  # computed in fp32, rounded once
        return out


class FeedForward(nn.Module):
    """Position-wise MLP. `gelu` (erf), `gelu_tanh` (GPT-2's approximation) or `swiglu`
    (Shazeer 2020: down(silu(gate(x)) * up(x)), gate and up fused into one projection)."""

    def __init__(self, embed_dim, intermediate_dim, activation="gelu", bias=True, dropout=0.0):
        super().__init__()
        if activation not in ("gelu", "gelu_tanh", "swiglu"):
            raise ValueError(f"mlp: unknown value {activation!r}; expected one of: gelu, gelu_tanh, swiglu")
        self.activation = activation
        width = 2 * intermediate_dim if activation == "swiglu" else intermediate_dim
        self.up = nn.Linear(embed_dim, width, bias=bias)
        self.down = nn.Linear(intermediate_dim, embed_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

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
