"""Hand-fused CPU kernels behind danlu's layers and losses. Each computes what a plain torch expression
computes (tests/test_kernels.py checks each against it) and exists only because it is measurably faster
on CPU; benchmarks/gpt_train.py times whole training steps with them against transformers.

- `lm_loss.lm_head_loss(hidden, weight, labels)`: the next-token cross-entropy of `hidden @ weight.T`
  over chunks of 256 rows, each chunk's gradient computed on the spot, so the (tokens x vocabulary) fp32
  logits are never held. Used by CausalLMTask while training. 1.12x transformers before it, 1.27x after.
- `attention.causal_attention(q, k, v)`: causal self-attention of one window. In bf16 on CPU, for
  windows up to 512 tokens, three plain ops with the mask added inside the first matmul
  (`unfused_causal_attention`) instead of torch's fused kernel, which computes in fp32 there. Used by
  models.blocks.Attention. The benchmark's ablation row: 1.24x transformers without it, 1.51x with it.
- `attention.masked_attention(q, k, v, mask)`: attention under a boolean (padding) mask, unfused the same
  way in bf16 on CPU: a bidirectional `blocks.Attention` (encoders) and the seq2seq cross-attention.
  78 -> 20 ms forward and backward at verse length; the translation training step 1.24x faster.
- `table_gelu.gelu(x, approximate)`: F.gelu, with the tanh approximation of 16-bit CPU tensors looked
  up in a table of all 65,536 inputs, bit for bit torch's values and gradients. Used by
  models.blocks.FeedForward. +1.7-2.0%, then +3.0% for chunked lookups.
- `maxpool.max_pool2d(x, kernel_size, ...)`: F.max_pool2d, with a 2x2, stride-2 pool of a contiguous
  float32 CPU tensor computed by a C kernel (maxpool2x2.c, compiled on first use with the system C
  compiler; torch's pool wherever it cannot run or DANLU_NATIVE_KERNELS=0). Bit for bit torch's values and
  gradients. Used by models.cnn's plain stages; measured in docs/results/cnn.md.
- `packed_linear.pack_linear(layer, rows)`: an fp32 nn.Linear computed from MKL's copy of its weight packed for
  `rows` rows (other row counts: the plain weight), for decoding a fixed batch. Used by
  danlu.generation.decode_layout; the batch-8 decoding step 1.09-1.18x -> 1.44x transformers'
  (docs/results/generate.md).

Measured in docs/pretraining.md (the pool: docs/results/cnn.md). This package sits below danlu.models
and danlu.training and imports torch and danlu.files only.
"""
from danlu.kernels.attention import (
    causal_attention,
    masked_attention,
    unfused_causal_attention,
    unfused_masked_attention,
)
from danlu.kernels.lm_loss import lm_head_loss
from danlu.kernels.maxpool import max_pool2d
from danlu.kernels.table_gelu import gelu

__all__ = ["causal_attention", "gelu", "lm_head_loss", "masked_attention", "max_pool2d", "unfused_causal_attention",
           "unfused_masked_attention"]
