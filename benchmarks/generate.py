"""KV-cached decoding speed: danlu generation against transformers `generate`, on identical weights.

danlu's GPT-2-shaped `gpt` (vocabulary 8192, 6 layers, 6 heads, width 384) with random weights, copied
into a transformers GPT2LMHeadModel. Both decode greedily (no end-of-text, so every row makes exactly
`new` tokens) from the same random prompts: danlu through `danlu.generation.generate_ids`, the loop under
`generate` / `stream_generate` (their text decoding is left out, as transformers gets token ids too),
transformers through `model.generate(do_sample=False)` with its default dynamic KV cache. Times include
the prompt's forward pass; tokens/s counts generated tokens. The two alternate round by round in one
process and each figure is the median; `same_tokens` is the share of generated tokens that agree.
Both run in fp32, and in bf16 (the weights of both cast) where the hardware has it: decoding one row
reads every weight per token, so on CPU its speed is the memory traffic of the matmuls, the same for
both; what differs is the work around them (masks, positions, cache bookkeeping, logits processing).

    python benchmarks/run.py --only generate [--quick]
    python benchmarks/generate.py --quick

With --generate-layers it times each distinct linear layer at the batch's rows (median us per call, CPU) with
nn.Linear's (out, in) weight, the weight stored transposed, and MKL's packed copy (what `decode_layout` uses for a
fixed batch), then reports the memory a packed copy of every weight takes: what MKL reserves, and what the process's
resident set (RSS) grows by while `decode_layout(rows=batch)` holds them, after it exits (the allocator may keep
the freed pages for the next decode) and after six decodes (no growth: nothing accumulates).

With --generate-steps it times one decoding step instead (a cache of prompt + new/2 tokens), each side's whole
step against its GEMMs alone (the same linear layers and head at the same shapes, run back to back): how much
of a step the shared matrix products take, and so the most any work around them can gain.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

NAME = "generate"
SHAPE = dict(vocab_size=8192, num_layers=6, num_heads=6, embed_dim=384, context=256)


def add_arguments(parser):
    group = parser.add_argument_group(NAME)
    group.add_argument("--generate-new", type=int, help="new tokens per row (default 128; 32 with --quick)")
    group.add_argument("--generate-prompt", type=int, default=32, help="prompt tokens per row (default 32)")
    group.add_argument("--generate-batch", default=None, help="comma-separated batch sizes (default 1,8; 1 with --quick)")
    group.add_argument("--generate-rounds", type=int, help="alternating rounds (default 5; 2 with --quick)")
    group.add_argument("--generate-precision", default=None,
                       help="comma-separated fp32, bf16 (default both where bf16 is native; with --quick the faster)")
    group.add_argument("--generate-steps", action="store_true",
                       help="time one decoding step and its GEMMs alone, for both (instead of whole generations)")
    group.add_argument("--generate-layers", action="store_true",
                       help="time each linear layer at the batch's rows in every weight layout, and the memory "
                            "decode_layout holds (instead of whole generations)")


def run(args):
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _gpt2 import gpt2_model, max_logit_difference

    from danlu.data.spec import DataSpec
    from danlu.generation import generate_ids
    from danlu.models.gpt import GPT, GPTConfig
    from danlu.training.flops import bf16_supported
    from danlu.training.trainer import pick_device

    quick = getattr(args, "quick", False)
    device = pick_device(getattr(args, "device", "auto") or "auto")
    new = getattr(args, "generate_new", None) or (32 if quick else 128)
    prompt = getattr(args, "generate_prompt", None) or 32
    batches = [int(b) for b in (getattr(args, "generate_batch", None) or ("1" if quick else "1,8")).split(",")]
    rounds = getattr(args, "generate_rounds", None) or (2 if quick else 5)
    native = ["bf16"] if bf16_supported(device) else ["fp32"]
    precisions = (getattr(args, "generate_precision", None) or ",".join(native if quick else ["fp32"] + native[:1]))
    precisions = list(dict.fromkeys(precisions.split(",")))
    V, T = SHAPE["vocab_size"], SHAPE["context"]

    torch.manual_seed(0)
    config = GPTConfig(num_layers=SHAPE["num_layers"], num_heads=SHAPE["num_heads"], embed_dim=SHAPE["embed_dim"],
                       max_positions=T, positions="learned", norm="layernorm", mlp="gelu_tanh", bias=True)
    base_model = GPT(config, DataSpec(vocab_size=V, num_classes=0, max_length=T)).to(device).eval()
    base_hf = gpt2_model(base_model).to(device).eval()
    agreement = max_logit_difference(base_model, base_hf, V)
    rows = []
    for precision in precisions:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        ours, theirs = base_model.to(dtype), base_hf.to(dtype)  # the same weights, cast for both
        if getattr(args, "generate_layers", False):
            rows += [row for B in batches for row in _layer_costs(ours, precision, B, rounds)]
        elif getattr(args, "generate_steps", False):
            rows += [row for B in batches for row in _step_shares(ours, theirs, precision, B, prompt + new // 2, rounds, V)]
        else:
            rows += _compare(ours, theirs, precision, batches, prompt, new, rounds, V, device, agreement, generate_ids)
    return rows


def _compare(ours, theirs, precision, batches, prompt, new, rounds, V, device, agreement, generate_ids):
    import torch
    from _gpt2 import sync

    def danlu_run(ids, mask):
        return torch.stack(list(generate_ids(ours, ids, mask, max_new_tokens=new, temperature=0)), 1)  # (B, new)

    @torch.inference_mode()
    def hf_run(ids, mask):
        out = theirs.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[:, ids.shape[1]:]

    rows = []
    for B in batches:
        g = torch.Generator().manual_seed(B)
        ids = torch.randint(1, V, (B, prompt), generator=g).to(device)
        mask = torch.ones(B, prompt, dtype=torch.bool, device=device)
        runs = {"transformers generate": hf_run, "danlu generation": danlu_run}
        outputs = {name: fn(ids, mask) for name, fn in runs.items()}  # warm-up, and the tokens to compare
        same = (outputs["danlu generation"] == outputs["transformers generate"]).float().mean().item()
        timings = {name: [] for name in runs}
        for r in range(rounds):
            for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                sync(device)
                start = time.perf_counter()
                runs[name](ids, mask)
                sync(device)
                timings[name].append(B * new / (time.perf_counter() - start))
        base = statistics.median(timings["transformers generate"])
        for name, values in timings.items():
            tps = statistics.median(values)
            rows.append({"contender": name, "device": device.type, "precision": precision, "batch": B,
                         "prompt": prompt, "new_tokens": new,
                         "tokens_per_s": round(tps, 1), "vs_transformers": round(tps / base, 3),
                         "spread": f"{min(values):.0f}-{max(values):.0f}", "same_tokens": round(same, 3),
                         "max_logit_diff": f"{agreement:.1e}", "threads": torch.get_num_threads()})
    return rows



def _step_shares(ours, theirs, precision, B, cached, rounds, V, repeats=20):
    """One decoding step at `cached` tokens, for both, against the step's GEMMs alone: median ms of `repeats` steps
    per round, the rounds alternating (CPU; the cache is rewound after each step, so every step is the same)."""
    import torch
    from _timing import alternate
    from torch import nn
    from transformers import DynamicCache

    from danlu.generation import decode_layout

    ids = torch.randint(1, V, (B, cached), generator=torch.Generator().manual_seed(B))
    one = ids[:, -1:]  # (B, 1)
    rows_in = {}  # in_features -> (B, in) input of a linear layer

    def inputs(n):
        return rows_in.setdefault(n, torch.randn(B, n, dtype=ours.embed.weight.dtype))

    with decode_layout(ours, rows=B), torch.inference_mode():
        cache = ours.new_cache(B, cached + 1)
        ours(ids[:, :-1], cache=cache)
        linears = [m for m in ours.modules() if isinstance(m, nn.Linear)]  # blocks' projections, then the head

        def our_step():
            cache.length = cached - 1
            return ours(one, cache=cache)

        def our_gemms():  # each layer's own call: its packed weight where decode_layout packs them
            for m in linears:
                m(inputs(m.in_features))

        their_cache = DynamicCache()
        theirs(input_ids=ids[:, :-1], past_key_values=their_cache, use_cache=True)
        mask, position = torch.ones(B, cached, dtype=torch.long), torch.full((B, 1), cached - 1)
        convs = [m for m in theirs.modules() if type(m).__name__ == "Conv1D"]  # GPT-2's (in, out) linear layers

        def their_step():
            theirs(input_ids=one, past_key_values=their_cache, attention_mask=mask, position_ids=position, use_cache=True)
            their_cache.crop(-1)

        def their_gemms():
            for m in convs:
                torch.addmm(m.bias, inputs(m.weight.shape[0]), m.weight)
            nn.functional.linear(inputs(theirs.lm_head.in_features), theirs.lm_head.weight)

        runs = {"transformers step": their_step, "transformers GEMMs": their_gemms, "danlu step": our_step,
                "danlu GEMMs": our_gemms}
        ms = {name: [t * 1e3 for t in ts] for name, ts in alternate(runs, rounds, repeats).items()}
    med = {name: statistics.median(values) for name, values in ms.items()}
    rows = []
    for side in ("transformers", "danlu"):
        step, gemms = med[f"{side} step"], med[f"{side} GEMMs"]
        rows.append({"contender": side, "precision": precision, "batch": B, "cached_tokens": cached,
                     "step_ms": round(step, 3), "gemm_ms": round(gemms, 3), "gemm_share": round(gemms / step, 3),
                     "step_vs_transformers": round(med["transformers step"] / step, 3),
                     "ceiling_vs_transformers": round(med["transformers step"] / gemms, 3),
                     "spread": f"{min(ms[f'{side} step']):.2f}-{max(ms[f'{side} step']):.2f}",
                     "threads": torch.get_num_threads()})
    return rows


def _layer_costs(ours, precision, B, rounds, repeats=50):
    """Each distinct linear layer of `ours` at B rows in the three layouts (alternating rounds, median us), then the
    resident memory of the packed copies (CPU)."""
    import torch
    from _timing import alternate
    from torch import nn

    from danlu.generation import decode_layout
    from danlu.kernels.packed_linear import packing_available

    F = nn.functional
    layers = {}  # (out, in) -> the first nn.Linear of that shape
    for m in ours.modules():
        if isinstance(m, nn.Linear):
            layers.setdefault(tuple(m.weight.shape), m)
    pack = packing_available() and precision == "fp32"
    rows = []
    with torch.inference_mode():
        for (n_out, n_in), m in layers.items():
            x, w, b = torch.randn(B, n_in, dtype=m.weight.dtype), m.weight, m.bias
            wt = w.t().contiguous().t()
            runs = {"plain": lambda x=x, w=w, b=b: F.linear(x, w, b),
                    "transposed": lambda x=x, wt=wt, b=b: F.linear(x, wt, b)}
            if pack:
                packed = torch.ops.mkl._mkl_reorder_linear_weight(w, B)
                runs["packed"] = lambda x=x, packed=packed, w=w, b=b: torch.ops.mkl._mkl_linear(x, packed, w, b, B)
            us = {name: [t * 1e6 for t in ts] for name, ts in alternate(runs, rounds, repeats).items()}
            rows.append({"layer": f"{n_out}x{n_in}", "precision": precision, "batch": B,
                         **{f"{name}_us": round(statistics.median(v), 1) for name, v in us.items()},
                         "threads": torch.get_num_threads()})
    if pack:
        weights = sum(m.weight.numel() * m.weight.element_size() for m in ours.modules() if isinstance(m, nn.Linear))
        reserved = sum(torch.ops.mkl._mkl_reorder_linear_weight(m.weight.detach(), B).numel() * 4
                       for m in ours.modules() if isinstance(m, nn.Linear))
        before = _rss()
        with decode_layout(ours, rows=B):
            held = _rss()
        after = _rss()
        for _ in range(5):  # more decodes: the freed copies' pages are reused, nothing accumulates
            with decode_layout(ours, rows=B):
                pass
        rows.append({"layer": "all (memory, MiB)", "precision": precision, "batch": B,
                     "linear_weights_mib": round(weights / 2**20, 1), "packed_reserved_mib": round(reserved / 2**20, 1),
                     "rss_growth_held_mib": round(held - before, 1), "rss_growth_after_mib": round(after - before, 1),
                     "rss_growth_after_6_mib": round(_rss() - before, 1)})
    return rows


def _rss():
    """This process's resident memory in MiB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


if __name__ == "__main__":  # the same as: python benchmarks/run.py --only NAME [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run as harness

    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
