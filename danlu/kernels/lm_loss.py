"""The next-token loss of a language model straight from its last hidden states, without the logits.

On CPU the (tokens x vocabulary) fp32 logits of a training batch are larger than the cache (64 MB at batch
8 x 256 tokens x vocabulary 8192, twice the cache of the machine that measured it): writing them, reading
them back for the softmax and keeping them for the backward pass cost more than the matmul. Here the rows
go through in chunks and each chunk's gradient is computed on the spot, while the chunk is in cache.
benchmarks/gpt_train.py, whole training steps against transformers: 1.12x before the chunked loss, 1.23x
with it, 1.27x once each chunk takes one softmax kernel (docs/pretraining.md).
"""
import torch

LM_LOSS_CHUNK = 256  # rows of logits at a time: 256 x vocab 8192 in fp32 is 8 MB, which stays in cache


def lm_head_loss(hidden, weight, labels, ignore_index=-100):
    """Mean next-token cross-entropy of `hidden @ weight.T` without holding the (N, V) logits: the rows go
    through in chunks, and each chunk's gradient is computed on the spot (the loss is the end of the graph,
    so it is known). Returns (loss, correct, count): the loss with its gradient, how many labels have the
    highest logit (ties count as right) and how many labels there are (ignore_index excluded).

    hidden (..., C), weight (V, C), labels (...). Under autocast the matmuls run in the autocast dtype and
    the softmax in fp32, as `cross_entropy(linear(hidden, weight).float(), labels)` would; the result is the
    same, computed with a fraction of the memory traffic.

    It returns Python counts and is fused by hand: call it outside a compiled region (as CausalLMTask does,
    on the hidden states a compiled model returns).

    >>> loss, correct, count = lm_head_loss(hidden, head.weight, labels)  # doctest: +SKIP
    """
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
    return _LMHeadLoss.apply(hidden.reshape(-1, hidden.size(-1)), weight, labels.reshape(-1), ignore_index, dtype)


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
