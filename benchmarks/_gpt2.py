"""Shared by the GPT benchmarks: the same network as a transformers GPT2LMHeadModel, with danlu's weights.

danlu's `gpt` with learned positions, LayerNorm, tanh-GELU, biases and tied embeddings is GPT-2; the
checkpoint-compatibility names (wte, c_attn, ...) live here only. transformers' Conv1D stores weights
as (in, out), hence the transposes.
"""
from __future__ import annotations

import torch


def gpt2_model(model, attn_implementation="sdpa"):
    """A GPT2LMHeadModel with the shape and the weights of danlu GPT `model` (GPT-2 recipe)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    if c.positions != "learned" or c.norm != "layernorm" or c.mlp != "gelu_tanh" or not c.bias or c.kv_heads != c.num_heads:
        raise ValueError("only the GPT-2 recipe (learned positions, layernorm, gelu_tanh, biases, no GQA) maps to GPT2LMHeadModel")
    config = GPT2Config(vocab_size=model.embed.num_embeddings, n_positions=model.positions.num_embeddings,
                        n_embd=c.embed_dim, n_layer=c.num_layers, n_head=c.num_heads, n_inner=c.ffn_dim,
                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        layer_norm_epsilon=c.norm_eps, tie_word_embeddings=c.tie_embeddings, bos_token_id=None,
                        eos_token_id=None, pad_token_id=None)
    config._attn_implementation = attn_implementation
    hf = GPT2LMHeadModel(config)
    src = model.state_dict()
    dst = {"transformer.wte.weight": src["embed.weight"], "transformer.wpe.weight": src["positions.weight"],
           "transformer.ln_f.weight": src["norm.weight"], "transformer.ln_f.bias": src["norm.bias"]}
    for i in range(c.num_layers):
        a, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
            dst[h + theirs + ".weight"] = src[a + ours + ".weight"]
            dst[h + theirs + ".bias"] = src[a + ours + ".bias"]
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"), ("ffn.up", "mlp.c_fc"),
                             ("ffn.down", "mlp.c_proj")):
            dst[h + theirs + ".weight"] = src[a + ours + ".weight"].t().contiguous()
            dst[h + theirs + ".bias"] = src[a + ours + ".bias"]
    dst["lm_head.weight"] = src["head.weight"]
    missing, unexpected = hf.load_state_dict(dst, strict=False)
    missing = [k for k in missing if not k.endswith(".attn.bias") and not k.endswith("masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf


@torch.no_grad()
def max_logit_difference(model, hf, vocab_size, length=32):
    """Largest |logit| difference of the two models on one random sequence (fp32): a check of the mapping."""
    ids = torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    ids = ids.to(device)
    was = model.training, hf.training
    model.eval(), hf.eval()
    diff = (model(ids).float() - hf(input_ids=ids).logits.float()).abs().max().item()
    model.train(was[0]), hf.train(was[1])
    return diff


def sync(device):
    """Wait for queued GPU work, so that a timer reads the time it took (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
