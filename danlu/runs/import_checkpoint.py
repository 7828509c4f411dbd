"""Import pretrained checkpoints into danlu's own model classes: Hugging Face folders and GGUF files.

This is the one place where checkpoint-compatibility names live (`encoder.layer.0.attention.self.query`,
`model.layers.0.self_attn.q_proj`, `blk.0.attn_q`). Each importer returns the danlu model config, a
state dict in danlu's names, the tokenizer (a TextTokenizer wrapping the checkpoint's own) and the
chat template the checkpoint carries, if any. transformers is never imported.

    BERT family   (HF folder, model_type bert)   -> danlu.models.bert.BERT
    Llama family  (HF folder, model_type llama)  -> danlu.models.gpt.GPT (rmsnorm, swiglu, rope, GQA)
    Llama family  (GGUF file, architecture llama, any quantization gguf can dequantize) -> GPT
    GPT-2 family  (GGUF file, architecture gpt2: learned positions, LayerNorm, tanh GELU) -> GPT

>>> imported = import_checkpoint("path/to/SmolLM2-135M-Instruct.Q4_1.gguf")   # doctest: +SKIP
>>> imported.config.num_layers, imported.tokenizer.vocab_size_                # doctest: +SKIP
(30, 49152)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from danlu.data.tokenizer import TextTokenizer
from danlu.models.bert import BERTConfig
from danlu.models.gpt import GPTConfig
from danlu.registry import ConfigError


@dataclass
class Imported:
    config: object  # BERTConfig or GPTConfig
    weights: dict  # danlu parameter name -> tensor (backbone; no classification head)

    def build(self, num_classes=0, labels=(), **config_changes):
        """The danlu model with these weights: a language model, or a classifier with a new head."""
        import dataclasses

        from danlu.data.spec import DataSpec
        from danlu.models import build_model

        config = dataclasses.replace(self.config, **config_changes)
        spec = DataSpec(vocab_size=self.tokenizer.vocab_size_, pad_id=self.tokenizer.pad_id or 0,
                        num_classes=num_classes, max_length=self.tokenizer.max_length or 1, labels=tuple(labels))
        model = build_model(config, spec)
        load_backbone(model, self.weights, where=self.source)
        return model
    tokenizer: TextTokenizer
    chat_template: str | None
    source: str  # "hf" or "gguf"


def is_checkpoint(path) -> bool:
    """A GGUF file, or a Hugging Face folder (config.json next to safetensors weights)."""
    path = os.fspath(path)
    return (os.path.isfile(path) and path.endswith(".gguf")) or os.path.isfile(os.path.join(path, "config.json"))


def import_checkpoint(path, max_length=512) -> Imported:
    """Read a GGUF file or a Hugging Face folder; `max_length` truncates the tokenizer (0: none)."""
    path = os.fspath(path)
    if path.endswith(".gguf"):
        return import_gguf(path, max_length)
    if os.path.isfile(os.path.join(path, "config.json")):
        return import_hf(path, max_length)
    raise ConfigError(f"finetune.base: {path} is neither a GGUF file nor a Hugging Face folder (config.json missing)")


def load_backbone(model, weights, where="weights"):
    """Load `weights` into `model`, strictly except for what a new task adds: the classification head
    and pooler may be missing (they keep their fresh initialisation); a tied LM head is the embedding.
    Returns the names left at their initial values."""
    own = model.state_dict()
    weights = {k: v for k, v in weights.items() if k in own or not k.startswith("pooler.")}  # unused by mean pooling
    unexpected = sorted(set(weights) - set(own))
    fresh = sorted(set(own) - set(weights))
    tied = getattr(model, "head", None) is not None and model.head.weight is model.embed.weight
    fresh = [n for n in fresh if not (tied and n == "head.weight")]
    missing = [n for n in fresh if not n.startswith(("head.", "pooler.", "mlm."))]
    if unexpected or missing:
        raise ConfigError(f"{where}: weights do not match the model"
                          + (f"; missing: {', '.join(missing[:10])}" if missing else "")
                          + (f"; unexpected: {', '.join(unexpected[:10])}" if unexpected else ""))
    for name, t in weights.items():
        if own[name].shape != t.shape:
            raise ConfigError(f"{where}: {name} has shape {tuple(t.shape)}, the model expects {tuple(own[name].shape)}")
    model.load_state_dict(weights, strict=False)
    return fresh


# ---------------------------------------------------------------------------------------------
# Hugging Face folders


def import_hf(folder, max_length=512) -> Imported:
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    kind = hf.get("model_type")
    if kind not in HF_FAMILIES:
        raise ConfigError(f"{folder}: model_type {kind!r} is not supported; supported: {', '.join(HF_FAMILIES)}")
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        raise ConfigError(f"{folder}: no .safetensors weights (pickled .bin files are not read)")
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(folder, name)))
    config_fn, weights_fn = HF_FAMILIES[kind]
    config = config_fn(hf)
    weights = weights_fn(tensors, config)
    tokenizer, template = _hf_tokenizer(folder, config, max_length)
    return Imported(config, weights, tokenizer, template, "hf")


def bert_config(hf) -> BERTConfig:
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError("BERT import: only hidden_act gelu with absolute positions is supported")
    return BERTConfig(embed_dim=hf["hidden_size"], num_heads=hf["num_attention_heads"], num_layers=hf["num_hidden_layers"],
                      intermediate_dim=hf["intermediate_size"], dropout=hf.get("hidden_dropout_prob", 0.1),
                      max_positions=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
                      norm_eps=hf.get("layer_norm_eps", 1e-12))


def bert_weights(tensors, config):
    """BertModel (with or without the `bert.` prefix of BertFor* heads) -> danlu BERT names."""
    t = {k.removeprefix("bert."): v for k, v in tensors.items()}
    out = {
        "embed.weight": t["embeddings.word_embeddings.weight"],
        "positions.weight": t["embeddings.position_embeddings.weight"],
        "token_types.weight": t["embeddings.token_type_embeddings.weight"],
        "embed_norm.weight": t["embeddings.LayerNorm.weight"],
        "embed_norm.bias": t["embeddings.LayerNorm.bias"],
    }
    for i in range(config.num_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        for p in ("weight", "bias"):
            out[dst + f"attn.qkv.{p}"] = torch.cat([t[src + f"attention.self.{n}.{p}"] for n in ("query", "key", "value")])
            out[dst + f"attn.out.{p}"] = t[src + f"attention.output.dense.{p}"]
            out[dst + f"attn_norm.{p}"] = t[src + f"attention.output.LayerNorm.{p}"]
            out[dst + f"ffn.up.{p}"] = t[src + f"intermediate.dense.{p}"]
            out[dst + f"ffn.down.{p}"] = t[src + f"output.dense.{p}"]
            out[dst + f"ffn_norm.{p}"] = t[src + f"output.LayerNorm.{p}"]
    if "pooler.dense.weight" in t:  # used by cls pooling
        out["pooler.weight"], out["pooler.bias"] = t["pooler.dense.weight"], t["pooler.dense.bias"]
    return out


def llama_config(hf) -> GPTConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"Llama import: hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
    # rope scaling (Llama 3.1's "llama3", "linear", "dynamic", "yarn", ...) changes the rotary frequencies, which
    # danlu's GPT computes plainly: such a checkpoint would load and give wrong logits, so it is refused by name.
    # transformers < 5 writes it as `rope_scaling`, transformers 5 as `rope_parameters.rope_type`.
    for key in ("rope_scaling", "rope_parameters"):
        scaling = hf.get(key) or {}
        kind = scaling.get("rope_type") or scaling.get("type") or ("default" if key == "rope_parameters" else None)
        if scaling and kind != "default":
            raise ConfigError(f"Llama import: {key} of type {kind!r} (factor {scaling.get('factor')}) is not supported: "
                              "danlu's GPT computes plain rotary positions, and this checkpoint needs scaled ones")
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return GPTConfig(embed_dim=hf["hidden_size"], num_heads=hf["num_attention_heads"],
                     num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                     num_layers=hf["num_hidden_layers"], intermediate_dim=hf["intermediate_size"], dropout=0.0,
                     positions="rope", max_positions=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
                     norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", bias=False,
                     tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=float(theta))


def llama_weights(tensors, config):
    """LlamaForCausalLM -> danlu GPT names: q, k, v fused into qkv, gate and up into ffn.up."""
    t = {k.removeprefix("model."): v for k, v in tensors.items()}
    return _llama_to_gpt(t, config, "hf")


# danlu GPT name -> its tensors in a Hugging Face Llama and in a GGUF llama file (several: concatenated in that
# order, the fused q/k/v and gate/up); "{i}" is the layer
LLAMA_NAMES = {
    "embed.weight": (["embed_tokens.weight"], ["token_embd.weight"]),
    "norm.weight": (["norm.weight"], ["output_norm.weight"]),
    "head.weight": (["lm_head.weight"], ["output.weight"]),
    "blocks.{i}.attn_norm.weight": (["layers.{i}.input_layernorm.weight"], ["blk.{i}.attn_norm.weight"]),
    "blocks.{i}.attn.qkv.weight": ([f"layers.{{i}}.self_attn.{n}_proj.weight" for n in "qkv"],
                                   [f"blk.{{i}}.attn_{n}.weight" for n in "qkv"]),
    "blocks.{i}.attn.out.weight": (["layers.{i}.self_attn.o_proj.weight"], ["blk.{i}.attn_output.weight"]),
    "blocks.{i}.ffn_norm.weight": (["layers.{i}.post_attention_layernorm.weight"], ["blk.{i}.ffn_norm.weight"]),
    "blocks.{i}.ffn.up.weight": (["layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"],
                                 ["blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"]),
    "blocks.{i}.ffn.down.weight": (["layers.{i}.mlp.down_proj.weight"], ["blk.{i}.ffn_down.weight"]),
}


def _llama_to_gpt(t, config, source, fix=None):
    """The danlu GPT state dict from a Llama checkpoint's tensors `t` in `source` "hf" or "gguf" names (see
    LLAMA_NAMES); `fix(name, tensor)`, when given, adjusts each tensor read. No head with tied embeddings."""
    column, out = ("hf", "gguf").index(source), {}
    for dst, names in LLAMA_NAMES.items():
        if dst == "head.weight" and config.tie_embeddings:
            continue
        for i in range(config.num_layers) if "{i}" in dst else [None]:
            parts = [t[n.format(i=i)] for n in names[column]]
            if fix is not None:
                parts = [fix(n, w) for n, w in zip(names[column], parts)]
            out[dst.format(i=i)] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out


HF_FAMILIES = {"bert": (bert_config, bert_weights), "llama": (llama_config, llama_weights)}


def _hf_tokenizer(folder, config, max_length):
    from tokenizers import Tokenizer

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise ConfigError(f"{folder}: tokenizer.json is missing (only fast-tokenizer files are read)")
    tok = Tokenizer.from_file(path)
    settings = {}
    settings_file = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(settings_file):
        with open(settings_file, encoding="utf-8") as f:
            settings = json.load(f)
    special = {}
    for role, key in (("[PAD]", "pad_token"), ("</s>", "eos_token"), ("<s>", "bos_token"), ("[UNK]", "unk_token")):
        value = settings.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value and value != role and tok.token_to_id(value) is not None:
            special[role] = value
    if isinstance(config, BERTConfig):
        max_length = min(max_length or config.max_positions, config.max_positions)
    elif "[PAD]" not in special and "</s>" in special:
        special["[PAD]"] = special["</s>"]
    template = settings.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return TextTokenizer.from_tokenizer(tok, special, max_length), template


# ---------------------------------------------------------------------------------------------
# GGUF (llama.cpp's format)


def import_gguf(path, max_length=0) -> Imported:
    try:
        import gguf
    except ImportError:
        raise ConfigError("reading GGUF files needs the gguf package: pip install 'danlu[gguf]'") from None
    reader = gguf.GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("tokenizer.ggml.") or name.endswith("_id") or name.endswith(".model")
            or name.endswith(".pre")}
    arch = meta.get("general.architecture")
    if arch not in GGUF_FAMILIES:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_FAMILIES)}")
    p = f"{arch}."
    names = {t.name for t in reader.tensors}
    common = {"embed_dim": int(meta[p + "embedding_length"]), "num_heads": int(meta[p + "attention.head_count"]),
              "num_kv_heads": int(meta.get(p + "attention.head_count_kv", meta[p + "attention.head_count"])),
              "num_layers": int(meta[p + "block_count"]), "intermediate_dim": int(meta[p + "feed_forward_length"]),
              "dropout": 0.0, "max_positions": int(meta.get(p + "context_length", 2048)),
              "tie_embeddings": "output.weight" not in names}
    if arch == "llama":
        config = GPTConfig(**common, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                           norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
                           rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)))
    else:  # gpt2: llama.cpp's graph is GPT-2's (learned positions, LayerNorm, tanh GELU, biases everywhere)
        config = GPTConfig(**common, positions="learned", norm="layernorm", mlp="gelu_tanh", bias=True,
                           norm_eps=float(meta.get(p + "attention.layer_norm_epsilon", 1e-5)))
    tensors = {t.name: _dequantize(t, gguf) for t in reader.tensors}
    weights = GGUF_FAMILIES[arch](tensors, config)
    tokenizer = gguf_tokenizer(reader, meta, max_length)
    return Imported(config, weights, tokenizer, meta.get("tokenizer.chat_template"), "gguf")


def _dequantize(tensor, gguf):
    """float32 torch tensor in PyTorch layout (GGUF lists dimensions fastest-first; numpy's are reversed)."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    data = np.asarray(tensor.data)
    if tensor.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        data = gguf.quants.dequantize(data, tensor.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a copy: the file is memory-mapped


def unpermute_rope(w, num_heads):
    """Undo llama.cpp's convert_hf_to_gguf permutation of q/k rows.

    llama.cpp rotates interleaved pairs (GPT-J layout), so its converter reorders each head's rows
    from Hugging Face's half-split layout: reshape(H, 2, D/2, C).swapaxes(1, 2). The inverse is
    reshape(H, D/2, 2, C).swapaxes(1, 2), which gives back the rows that rotate_half expects.
    """
    out_dim = w.shape[0]
    return w.reshape(num_heads, out_dim // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_llama_weights(t, config):
    """GGUF llama tensors -> danlu GPT names, q and k rows put back in Hugging Face's order (unpermute_rope)."""
    heads = {"blk.{i}.attn_q.weight": config.num_heads, "blk.{i}.attn_k.weight": config.kv_heads}
    return _llama_to_gpt(t, config, "gguf", lambda name, w: unpermute_rope(w, heads[name]) if name in heads else w)


def gguf_gpt2_weights(t, config):
    out = {"embed.weight": t["token_embd.weight"], "positions.weight": t["position_embd.weight"],
           "norm.weight": t["output_norm.weight"], "norm.bias": t["output_norm.bias"]}
    for i in range(config.num_layers):
        src, dst = f"blk.{i}.", f"blocks.{i}."
        for gguf_name, name in (("attn_norm", "attn_norm"), ("attn_qkv", "attn.qkv"), ("attn_output", "attn.out"),
                                ("ffn_norm", "ffn_norm"), ("ffn_up", "ffn.up"), ("ffn_down", "ffn.down")):
            for p in ("weight", "bias"):
                out[f"{dst}{name}.{p}"] = t[f"{src}{gguf_name}.{p}"]
    if not config.tie_embeddings:
        out["head.weight"] = t["output.weight"]
    return out


GGUF_FAMILIES = {"llama": gguf_llama_weights, "gpt2": gguf_gpt2_weights}


def gguf_tokenizer(reader, meta, max_length=0) -> TextTokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from GGUF metadata (tokens, merges, token types).

    The pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre`: `smollm` (SmolLM2, StarCoder) splits
    every digit on its own before GPT-2's byte-level regex, as SmolLM2's own tokenizer.json does.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ConfigError(f"GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} is not supported; supported: gpt2 (byte-level BPE)")
    fields = reader.fields
    tokens = list(fields["tokenizer.ggml.tokens"].contents())
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    types = list(fields["tokenizer.ggml.token_type"].contents()) if "tokenizer.ggml.token_type" in fields else []
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == 4]
    tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    special = {}
    for role, key in (("<s>", "bos"), ("</s>", "eos"), ("[PAD]", "padding"), ("[UNK]", "unknown")):
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        if index is not None:
            special[role] = tokens[int(index)]
    special.setdefault("[PAD]", special.get("</s>"))
    return TextTokenizer.from_tokenizer(tok, {k: v for k, v in special.items() if v}, max_length)
