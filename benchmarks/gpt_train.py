"""Training throughput: danlu `gpt` against transformers `GPT2LMHeadModel`, the same network and weights.

Both are GPT-2 shaped (vocabulary 8192, 6 layers, 6 heads, width 384, context 256, batch 8), start from
the same weights (danlu's, copied into GPT-2 names; the logits are checked to agree), and train with the
same optimizer — torch's fused AdamW (transformers' Trainer default with torch >= 2.8, danlu's
`train.fused_optimizer`), decay / no-decay groups, lr 3e-4 — gradient clipping 1.0 and autocast precision
(bf16 where the hardware has it). danlu's step is the one its training loop runs (CausalLMTask.loss, backward, clip,
step, and the loop's token counts); transformers' is `model(input_ids, labels=...).loss` with the same
optimizer. In bf16 on CPU a third row, "danlu gpt, fused SDPA only", trains the same model with
torch's fused attention kernel everywhere, which shows what danlu's unfused short-window attention
(danlu.kernels.attention) is worth. The contenders alternate round by round in one process, so load from elsewhere on the machine
falls on all of them; each figure is the median over rounds. With --gpt-train-compile two more rows time
both models under torch.compile (danlu's `train.compile`); their ratio is against compiled transformers.

MFU = tokens/s x training FLOPs per token (6 N + 12 L C T, PaLM appendix B) / peak FLOP/s, the peak being
the best of a 2048 x 2048 matmul in the training dtype on the same device and threads, measured before
every round and at the end (on a shared CPU a single measurement can come out low and flatter the MFU).
On a busy machine run it with one thread (`--threads 1`): two threads wait on each other.

    python benchmarks/run.py --only gpt_train [--quick] [--gpt-train-compile]
    python benchmarks/gpt_train.py --quick
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

NAME = "gpt_train"
SHAPE = dict(vocab_size=8192, num_layers=6, num_heads=6, embed_dim=384, context=256, batch_size=8)


def add_arguments(parser):
    group = parser.add_argument_group(NAME)
    group.add_argument("--gpt-train-steps", type=int, help="optimizer steps per contender per round (default 3; 1 with --quick)")
    group.add_argument("--gpt-train-rounds", type=int, help="alternating rounds (default 5; 2 with --quick)")
    group.add_argument("--gpt-train-precision", default="auto", choices=("auto", "fp32", "bf16"),
                       help="autocast precision for both (auto: bf16 where the hardware has it)")
    group.add_argument("--gpt-train-malloc", default="keep", choices=("keep", "glibc"),
                       help="on CPU: keep (freed blocks stay in glibc's heap, what danlu's Trainer does with "
                            "train.keep_freed_memory, the default) or glibc (glibc's own settings), for all contenders")
    group.add_argument("--gpt-train-compile", action="store_true",
                       help="also time both compiled: danlu with train.compile, transformers with torch.compile "
                            "(half a minute or more to compile each on CPU)")


def run(args):
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _gpt2 import gpt2_model, max_logit_difference, sync

    from danlu.data.spec import DataSpec
    from danlu.models import compile_model
    from danlu.models.gpt import GPT, GPTConfig
    from danlu.training.allocator import keep_freed_memory
    from danlu.training.flops import measure_peak_flops, training_flops_per_token
    from danlu.training.optim import param_groups
    from danlu.training.tasks import CausalLMTask
    from danlu.training.trainer import autocast_dtype, pick_device

    quick = getattr(args, "quick", False)
    device = pick_device(getattr(args, "device", "auto") or "auto")
    malloc = getattr(args, "gpt_train_malloc", "keep") or "keep"
    if device.type == "cpu" and malloc == "keep":  # what danlu's Trainer holds while it trains on CPU; here for the
        keep_freed_memory()  # whole process, so transformers runs with it too
    steps = getattr(args, "gpt_train_steps", None) or (1 if quick else 3)
    rounds = getattr(args, "gpt_train_rounds", None) or (2 if quick else 5)
    precision = getattr(args, "gpt_train_precision", "auto") or "auto"
    B, T, V = SHAPE["batch_size"], SHAPE["context"], SHAPE["vocab_size"]

    torch.manual_seed(0)
    config = GPTConfig(num_layers=SHAPE["num_layers"], num_heads=SHAPE["num_heads"], embed_dim=SHAPE["embed_dim"],
                       max_positions=T, positions="learned", norm="layernorm", mlp="gelu_tanh", bias=True, dropout=0.0)
    ours = GPT(config, DataSpec(vocab_size=V, num_classes=0, max_length=T)).to(device)
    theirs = gpt2_model(ours).to(device)
    agreement = max_logit_difference(ours, theirs, V)
    dtype = autocast_dtype(device, precision)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    task = CausalLMTask()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, V, (B, T + 1), generator=generator).to(device) for _ in range(4)]

    def danlu_step(model, optimizer, i):
        x = batches[i % len(batches)]
        batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
        with autocast():
            loss, logits = task.loss(model, batch)
        loss.backward()
        task.counts(logits, batch)  # the loop's running numbers (token count and accuracy)
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def hf_step(model, optimizer, i):
        x = batches[i % len(batches)]
        with autocast():
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    contenders = {
        "transformers GPT2LMHeadModel": (theirs, hf_step),
        "danlu gpt": (ours, danlu_step),
    }
    if dtype == torch.bfloat16 and device.type == "cpu":  # ablation: without the unfused short-window attention
        from danlu.kernels import attention

        def fused_sdpa_step(model, optimizer, i):
            saved, attention.UNFUSED_MAX_LENGTH = attention.UNFUSED_MAX_LENGTH, 0
            try:
                return danlu_step(model, optimizer, i)
            finally:
                attention.UNFUSED_MAX_LENGTH = saved

        contenders["danlu gpt, fused SDPA only"] = (ours, fused_sdpa_step)
    if getattr(args, "gpt_train_compile", False):  # each compiled model shares its eager twin's weights
        contenders["transformers GPT2LMHeadModel + torch.compile"] = (torch.compile(theirs), hf_step)
        contenders["danlu gpt + train.compile"] = (compile_model(ours), danlu_step)
    optimizers = {}
    for name in contenders:  # the variants train their eager twin's parameters: one optimizer for each model
        first = "danlu gpt" if name.startswith("danlu") else "transformers GPT2LMHeadModel"
        if first not in optimizers:
            optimizers[first] = torch.optim.AdamW(param_groups(ours if first == "danlu gpt" else theirs, 0.1),
                                                  lr=3e-4, fused=True)
        optimizers[name] = optimizers[first]

    first_loss, compile_seconds = {}, {}
    for name, (model, step) in contenders.items():  # warm-up (and compilation), not timed
        start = time.perf_counter()
        first_loss[name] = step(model, optimizers[name], 0)
        compile_seconds[name] = time.perf_counter() - start
    timings = {name: [] for name in contenders}
    peak = 0.0
    for r in range(rounds):
        peak = max(peak, measure_peak_flops(device, dtype or torch.float32))  # the best seen: the least flattering MFU
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            model, step = contenders[name]
            sync(device)
            start = time.perf_counter()
            for i in range(steps):
                step(model, optimizers[name], i + 1)
            sync(device)
            timings[name].append(B * T * steps / (time.perf_counter() - start))
    peak = max(peak, measure_peak_flops(device, dtype or torch.float32))
    flops = training_flops_per_token(ours, T)
    rows = []
    for name, values in timings.items():
        tps = statistics.median(values)
        twin = "transformers GPT2LMHeadModel" + (" + torch.compile" if "compile" in name else "")
        base = statistics.median(timings[twin])  # compiled rows against compiled transformers
        rows.append({
            "contender": name, "precision": "bf16" if dtype else "fp32", "device": device.type, "malloc": malloc,
            "tokens_per_s": round(tps, 1), "vs_transformers": round(tps / base, 3),
            "mfu": round(tps * flops / peak, 4), "peak_gflops": round(peak / 1e9, 1),
            "rounds": rounds, "steps_per_round": steps, "spread": f"{min(values):.0f}-{max(values):.0f}",
            "first_step_s": round(compile_seconds[name], 1), "first_loss": round(first_loss[name], 4),
            "max_logit_diff": f"{agreement:.1e}",
        })
    return rows





if __name__ == "__main__":  # the same as: python benchmarks/run.py --only NAME [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run as harness

    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
