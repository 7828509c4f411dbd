"""Export a GPT-family language model run to GGUF, llama.cpp's file format, and check it token for token.

    danlu export runs/pretrain_gpt_en --format gguf                       # GPT-2 recipe -> architecture gpt2
    danlu export runs/lora_smollm2_chat --format gguf --dtype q8_0         # Llama recipe (LoRA merged) -> llama

The run's model maps onto one of llama.cpp's architectures by its recipe, and any other mix is refused:

    gpt2   learned positions, LayerNorm, GELU, fused qkv      (danlu's GPT-2 recipe, e.g. configs/pretrain_gpt_en.yaml)
    llama  rotary positions, RMSNorm, SwiGLU, no biases, GQA   (SmolLM2 and its fine-tunes)

A LoRA run is merged first (W + (alpha / r) B A). The tokenizer goes in as llama.cpp's `gpt2` model
(byte-level BPE: tokens, merges, token types, special-token ids), with `tokenizer.ggml.pre` naming the
pre-tokenizer (`smollm` when digits are split one by one, else `gpt-2`); a character or WordPiece
tokenizer has no GGUF counterpart and is refused. Tensors are f32, f16 or q8_0 (norms and biases stay f32).

The check decodes greedily from a few prompts with the run's own model and with the written file read
back: by danlu's GGUF importer (always), and by llama.cpp through `llama-cpp-python` when it is installed
(an independent runtime). export.json records the tokens each produced and where they first differ.

>>> report = export_gguf("runs/pretrain_gpt_en", dtype="f16")      # doctest: +SKIP
>>> report["parity"]["danlu_gguf"]["same_tokens"]                   # doctest: +SKIP
True
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from danlu.registry import ConfigError
from danlu.serve.onnx_runtime import ExportError, quiet

DTYPES = ("f32", "f16", "q8_0")
PROMPTS = ("The ", "ROMEO.\n", "Once upon a time", "你好")


def export_gguf(run, out=None, dtype="f32", check=True, prompts=PROMPTS, max_new_tokens=16, threads=1,
                llama_cpp=True) -> dict:
    """Write RUN's language model to OUT/model.gguf (default RUN/export/gguf); with `check`, greedy tokens
    of the file read back (danlu's importer; llama.cpp when installed and `llama_cpp`) against the run's own."""
    try:
        import gguf  # noqa: F401  (the writer and the importer use it)
    except ImportError:
        raise ConfigError("GGUF export needs the gguf package: pip install 'danlu[gguf]'") from None
    if dtype not in DTYPES:
        raise ConfigError(f"export --dtype: unknown value {dtype!r}; expected one of: {', '.join(DTYPES)}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"export --threads: expected a whole number of at least 1, got {threads!r}")
    if not hasattr(run, "model"):
        from danlu.runs import load_run

        run = load_run(run)
    from danlu.models.lora import merge_lora

    model = merge_lora(run.model).eval().to("cpu", torch.float32)
    arch = architecture(run, model)
    out = os.fspath(out or os.path.join(run.path, "export", "gguf"))
    path = os.path.join(out, "model.gguf")
    started = time.perf_counter()
    tokenizer = tokenizer_fields(run.tokenizer, model.embed.num_embeddings)
    write_gguf(path, arch, model, tokenizer, dtype, _chat_template(run.path), os.path.basename(os.path.abspath(run.path)))
    report = {"format": "gguf", "architecture": arch, "dtype": dtype, "run": os.path.abspath(run.path),
              "model": "gpt", "file": "model.gguf", "bytes": os.path.getsize(path),
              "tokenizer_pre": tokenizer["pre"], "vocab_size": len(tokenizer["tokens"]),
              "export_seconds": round(time.perf_counter() - started, 2)}
    if tokenizer["normalizer"]:
        report["note"] = (f"the run's tokenizer normalizes text ({tokenizer['normalizer']}) before splitting it; "
                          "llama.cpp does not, so text given to llama.cpp should be normalized the same way")
    if check:
        report["threads"] = threads
        report["parity"] = check_gguf(model, run.tokenizer, path, prompts, max_new_tokens, threads, llama_cpp)
    from danlu.files import atomic_write_json

    atomic_write_json(os.path.join(out, "export.json"), report)
    report["out"] = out
    danlu_side = report.get("parity", {}).get("danlu_gguf")
    if check and dtype == "f32" and not danlu_side["same_tokens"]:
        raise ExportError(f"{path}: read back, the file decodes other tokens than the run "
                          f"({danlu_side['first_difference']}); the file is kept for inspection")
    return report


def architecture(run, model) -> str:
    """`gpt2` or `llama`: the llama.cpp architecture that computes exactly this model's recipe."""
    from danlu.models.gpt import GPT

    if run.cfg.task != "causal_lm" or not isinstance(model, GPT) or model.num_classes:
        raise ConfigError(f"{run.path}: GGUF export takes a GPT language model (task causal_lm, model.kind gpt); "
                          f"this run is task {run.cfg.task}, model {run.cfg.model.kind}")
    c = model.config
    recipe = (c.positions, c.norm, c.mlp)
    if recipe == ("rope", "rmsnorm", "swiglu") and not c.bias:
        return "llama"
    if c.positions == "learned" and c.norm == "layernorm" and c.mlp in ("gelu", "gelu_tanh"):
        return "gpt2"  # plain gelu (erf) is computed by llama.cpp with the tanh form; the check shows the effect
    raise ConfigError(f"{run.path}: model positions={c.positions}, norm={c.norm}, mlp={c.mlp}, bias={c.bias} has no "
                      "llama.cpp architecture; GGUF export takes the GPT-2 recipe (learned, layernorm, gelu/gelu_tanh) "
                      "or the Llama recipe (rope, rmsnorm, swiglu, bias false)")


# ------------------------------------------------------------------------------------------------
# tokenizer


def tokenizer_fields(tokenizer, vocab_rows) -> dict:
    """tokens, merges, token types, special ids and pre-tokenizer name of a byte-level BPE tokenizer, as
    llama.cpp's `gpt2` tokenizer model reads them (tokenizer.ggml.*)."""
    from gguf import TokenType

    tok = tokenizer.tokenizer_
    spec = json.loads(tok.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if model.get("type") != "BPE" or "ByteLevel" not in kinds:
        raise ConfigError(f"GGUF export needs a byte-level BPE tokenizer (data.tokenizer.kind bpe, or an imported one); "
                          f"this run's is {model.get('type')} with pre-tokenizer {', '.join(map(str, kinds)) or 'none'}")
    digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts)
    if set(kinds) - {"ByteLevel", "Digits"} or (("Digits" in kinds) and not digits):
        raise ConfigError(f"GGUF export: pre-tokenizer {', '.join(kinds)} has no llama.cpp counterpart "
                          "(supported: ByteLevel, optionally after Digits(individual_digits))")
    vocab = tok.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_rows:
        raise ConfigError(f"GGUF export: the tokenizer has {len(vocab)} tokens, the model's embedding {vocab_rows} rows")
    tokens = [f"<unused{i}>" for i in range(vocab_rows)]
    types = [TokenType.UNUSED] * vocab_rows
    for text, index in vocab.items():
        tokens[index], types[index] = text, TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {}
    for role, key in (("<s>", "bos"), ("</s>", "eos"), ("[PAD]", "pad"), ("[UNK]", "unk")):
        index = tokenizer.token_id(role)
        if index is not None:
            special[key] = int(index)
    normalizer = spec.get("normalizer")
    norms = normalizer.get("normalizers", [normalizer]) if normalizer and normalizer.get("type") == "Sequence" else \
        [normalizer] if normalizer else []
    return {"tokens": tokens, "types": types, "merges": merges, "special": special,
            "pre": "smollm" if digits else "gpt-2", "normalizer": ", ".join(n["type"] for n in norms)}


def _chat_template(path):
    file = os.path.join(path, "chat_template.jinja")
    if os.path.exists(file):
        with open(file, encoding="utf-8") as f:
            return f.read()
    return None


# ------------------------------------------------------------------------------------------------
# tensors


def permute_rope(w, num_heads):
    """llama.cpp rotates interleaved pairs (GPT-J layout); danlu (like Hugging Face Llama) rotates the two
    halves of each head. Reordering each head's q/k rows (H, 2, D/2, C) -> (H, D/2, 2, C) makes the two
    compute the same thing; danlu.runs.import_checkpoint.unpermute_rope is the inverse."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, arch) -> dict:
    """GGUF tensor name -> float32 numpy array in PyTorch's (out, in) layout (the writer reverses the dims)."""
    c = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    zeros = torch.zeros  # a bias-free GPT-2-recipe model: llama.cpp's gpt2 graph adds biases, zero ones change nothing
    C, H, K, D, F = c.embed_dim, c.num_heads, c.kv_heads, c.head_dim, c.ffn_dim
    out = {"token_embd.weight": sd["embed.weight"], "output_norm.weight": sd["norm.weight"]}
    if arch == "gpt2":
        out["position_embd.weight"] = sd["positions.weight"]
        out["output_norm.bias"] = sd.get("norm.bias", zeros(C))
    for i in range(c.num_layers):
        src, dst = f"blocks.{i}.", f"blk.{i}."
        qkv = sd[src + "attn.qkv.weight"]
        out[dst + "attn_norm.weight"] = sd[src + "attn_norm.weight"]
        out[dst + "attn_output.weight"] = sd[src + "attn.out.weight"]
        out[dst + "ffn_norm.weight"] = sd[src + "ffn_norm.weight"]
        out[dst + "ffn_down.weight"] = sd[src + "ffn.down.weight"]
        if arch == "llama":
            q, k, v = qkv.split([H * D, K * D, K * D])
            out[dst + "attn_q.weight"] = permute_rope(q, H)
            out[dst + "attn_k.weight"] = permute_rope(k, K)
            out[dst + "attn_v.weight"] = v
            gate, up = sd[src + "ffn.up.weight"].split([F, F])
            out[dst + "ffn_gate.weight"], out[dst + "ffn_up.weight"] = gate, up
        else:
            out[dst + "attn_qkv.weight"] = qkv  # q, k, v rows in order, as llama.cpp's build_qkv splits them
            out[dst + "ffn_up.weight"] = sd[src + "ffn.up.weight"]
            for name, ours, width in (("attn_norm", "attn_norm", C), ("attn_qkv", "attn.qkv", (H + 2 * K) * D),
                                      ("attn_output", "attn.out", C), ("ffn_norm", "ffn_norm", C),
                                      ("ffn_up", "ffn.up", F), ("ffn_down", "ffn.down", C)):
                out[dst + name + ".bias"] = sd.get(src + ours + ".bias", zeros(width))
    if not c.tie_embeddings:
        out["output.weight"] = sd["head.weight"]
    return {name: t.numpy() for name, t in out.items()}


def write_gguf(path, arch, model, tokenizer, dtype, chat_template=None, name="danlu"):
    """The GGUF file: architecture metadata, tokenizer.ggml.*, tensors in `dtype` (matrices; 1-D stay f32)."""
    import gguf

    from danlu.files import atomic_path

    c = model.config
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    with atomic_path(path, suffix=".gguf") as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name)
        writer.add_block_count(c.num_layers)
        writer.add_context_length(model.positions.num_embeddings if arch == "gpt2" else c.max_positions)
        writer.add_embedding_length(c.embed_dim)
        writer.add_feed_forward_length(c.ffn_dim)
        writer.add_head_count(c.num_heads)
        writer.add_head_count_kv(c.kv_heads)
        if arch == "llama":
            writer.add_layer_norm_rms_eps(c.norm_eps)
            writer.add_rope_freq_base(c.rope_theta)
            writer.add_rope_dimension_count(c.head_dim)
        else:
            writer.add_layer_norm_eps(c.norm_eps)
        writer.add_file_type(file_type)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer["pre"])
        writer.add_token_list(tokenizer["tokens"])
        writer.add_token_types(tokenizer["types"])
        writer.add_token_merges(tokenizer["merges"])
        special = tokenizer["special"]
        for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                         ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
            if key in special:
                add(special[key])
        writer.add_add_bos_token(False)  # danlu encodes prompts without special tokens
        if chat_template:
            writer.add_chat_template(chat_template)
        for tensor_name, data in gguf_tensors(model, arch).items():
            if data.ndim == 1 or dtype == "f32":
                writer.add_tensor(tensor_name, data.astype(np.float32))
            elif dtype == "f16":
                writer.add_tensor(tensor_name, data.astype(np.float16))
            elif data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
                writer.add_tensor(tensor_name, data.astype(np.float16))  # rows not a multiple of the 32-value block
            else:
                q = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(tensor_name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


# ------------------------------------------------------------------------------------------------
# the check: greedy tokens of the run against the file read back


def greedy_danlu(model, prompt_ids, max_new_tokens):
    """Greedy continuation of one prompt with danlu's KV-cache decoding; every step's argmax, no early stop."""
    from danlu.generation import generate_ids

    ids = torch.tensor([prompt_ids])
    return [int(t[0]) for t in generate_ids(model, ids, max_new_tokens=max_new_tokens, temperature=0.0)]


def greedy_llama_cpp(path, prompts_ids, max_new_tokens, threads=1):
    """Greedy continuations of each prompt in llama.cpp (llama-cpp-python), argmax of its own logits; None
    when llama_cpp is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    longest = max(len(p) for p in prompts_ids) + max_new_tokens
    with quiet():
        llm = llama_cpp.Llama(model_path=path, n_ctx=max(64, longest), n_batch=max(64, longest), n_threads=threads,
                              n_threads_batch=threads, logits_all=True, verbose=False)
    results = []
    for prompt in prompts_ids:
        llm.reset()
        llm.eval(list(prompt))
        new = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            new.append(token)
            llm.eval([token])
        results.append(new)
    llm.close()
    return results


def compare_tokens(expected, got):
    """{same_tokens, tokens_matched, tokens, first_difference} of two lists of greedy continuations."""
    matched = total = 0
    first = None
    for i, (a, b) in enumerate(zip(expected, got)):
        total += len(a)
        same = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        matched += len(a) if same is None and len(a) == len(b) else (same or 0)
        if first is None and (same is not None or len(a) != len(b)):
            first = f"prompt {i}, step {same}: expected {a[same] if same is not None else a}, got {b[same] if same is not None else b}"
    return {"same_tokens": first is None, "tokens_matched": matched, "tokens": total, "first_difference": first}


def check_gguf(model, tokenizer, path, prompts=PROMPTS, max_new_tokens=16, threads=1, llama_cpp=True) -> dict:
    """Greedy tokens of the run's model, of the file through danlu's importer and through llama.cpp."""
    from danlu.runs.import_checkpoint import import_gguf

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        eos = tokenizer.token_id("</s>")
        prompts_ids = [list(e.ids) or [eos] for e in tokenizer.tokenizer_.encode_batch(list(prompts), add_special_tokens=False)]
        expected = [greedy_danlu(model, p, max_new_tokens) for p in prompts_ids]
        started = time.perf_counter()
        reread = import_gguf(path).build().eval()
        got = [greedy_danlu(reread, p, max_new_tokens) for p in prompts_ids]
        with torch.no_grad():
            ids = torch.tensor([prompts_ids[0] + expected[0]])
            diff = (model(ids) - reread(ids)).abs().max().item()
        result = {"prompts": list(prompts), "max_new_tokens": max_new_tokens, "expected": expected,
                  "danlu_gguf": {**compare_tokens(expected, got), "max_abs_logit_diff": diff,
                                 "seconds": round(time.perf_counter() - started, 2)}}
        started = time.perf_counter()
        llama = greedy_llama_cpp(path, prompts_ids, max_new_tokens, threads) if llama_cpp else None
        if not llama_cpp:
            result["llama_cpp"] = "not checked"
        elif llama is None:
            result["llama_cpp"] = "not installed (pip install llama-cpp-python builds llama.cpp from source)"
        else:
            import llama_cpp

            result["llama_cpp"] = {**compare_tokens(expected, llama), "version": llama_cpp.__version__,
                                   "seconds": round(time.perf_counter() - started, 2)}
        return result
    finally:
        torch.set_num_threads(previous)


def format_gguf_report(report) -> str:
    lines = [(f"exported gpt as GGUF ({report['architecture']}, {report['dtype']}, {report['bytes'] / 2**20:.1f} MiB) "
              f"to {report.get('out', '')}/model.gguf in {report['export_seconds']:.1f} s")]
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    parity = report.get("parity")
    if parity:
        n = len(parity["prompts"])
        for label, key in (("danlu's GGUF importer", "danlu_gguf"), ("llama.cpp", "llama_cpp")):
            side = parity[key]
            if isinstance(side, str):
                lines.append(f"{label}: {side}")
                continue
            verdict = "same greedy tokens" if side["same_tokens"] else f"DIFFERENT ({side['first_difference']})"
            lines.append(f"{label}: {side['tokens_matched']}/{side['tokens']} greedy tokens of {n} prompts match "
                         f"the run: {verdict}")
    return "\n".join(lines)
