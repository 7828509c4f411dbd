"""danlu's 2x2 max-pool kernel (danlu.kernels.max_pool2d) against torch's F.max_pool2d, interleaved in one
process: each op forward and forward + backward on a few map sizes, and the guide CNN's training step
(batch 32 of 1x8x8 digits, Adam) with the kernel and with DANLU_NATIVE_KERNELS=0. Minimum and median of
`--maxpool-reps` repetitions, the two sides alternating call by call, so load from elsewhere falls on both;
each row also says whether both sides computed the same bits.

    python benchmarks/run.py --only maxpool --threads 1
    python benchmarks/maxpool.py --maxpool-threads 1,2
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

NAME = "maxpool"
SHAPES = [(32, 32, 8, 8), (32, 64, 14, 14), (32, 32, 28, 28), (32, 32, 4, 4)]  # the guide CNN's map first


def add_arguments(parser):
    group = parser.add_argument_group(NAME)
    group.add_argument("--maxpool-reps", type=int, default=300, help="repetitions of each op and step (default 300)")
    group.add_argument("--maxpool-threads", default="",
                       help="comma-separated torch thread counts to measure the ops at (default: --threads)")


def row(measured, threads, times, same):
    torch_t, danlu_t = times["torch"], times["danlu"]
    return {"measured": measured, "threads": threads, "reps": len(torch_t),
            "torch_min_us": round(min(torch_t) * 1e6), "torch_median_us": round(statistics.median(torch_t) * 1e6),
            "danlu_min_us": round(min(danlu_t) * 1e6), "danlu_median_us": round(statistics.median(danlu_t) * 1e6),
            "danlu/torch min": round(min(danlu_t) / min(torch_t), 3),
            "danlu/torch median": round(statistics.median(danlu_t) / statistics.median(torch_t), 3),
            "same_bits": same}


def op_rows(shape, threads, reps):
    import torch
    from _timing import alternate
    from torch.nn import functional as F

    from danlu.kernels import max_pool2d

    x = torch.randn(shape)
    grad = torch.randn(*shape[:2], shape[2] // 2, shape[3] // 2)
    pools = {"torch": F.max_pool2d, "danlu": max_pool2d}

    def forward_backward(pool):
        xi = x.detach().requires_grad_()
        y = pool(xi, 2)
        y.backward(grad)
        return y, xi.grad

    results = {name: forward_backward(pool) for name, pool in pools.items()}
    same = all(torch.equal(a.view(torch.int32), b.view(torch.int32))
               for a, b in zip(results["torch"], results["danlu"]))  # output and input gradient
    rows = []
    with torch.no_grad():
        times = alternate({name: (lambda p=pool: p(x, 2)) for name, pool in pools.items()}, reps, warmup=5)
    rows.append(row(f"forward {tuple(shape)}", threads, times, same))
    times = alternate({name: (lambda p=pool: forward_backward(p)) for name, pool in pools.items()}, reps, warmup=5)
    rows.append(row(f"forward + backward {tuple(shape)}", threads, times, same))
    return rows


def step_row(threads, reps):
    """The guide CNN's training step, danlu's model with the kernel against the same model without it."""
    import torch
    from _timing import alternate
    from torch.nn import functional as F

    from danlu.data.spec import DataSpec
    from danlu.models.cnn import CNN, CNNConfig

    spec = DataSpec(vocab_size=0, num_classes=10, channels=1, image_size=(8, 8))
    config = CNNConfig(channels=(32,), blocks=0, norm="none", pooling="flatten", hidden_dim=128, dropout=0.0)
    torch.manual_seed(0)
    models = {"torch": CNN(config, spec).train()}
    models["danlu"] = CNN(config, spec).train()
    models["danlu"].load_state_dict(models["torch"].state_dict())
    optimizers = {name: torch.optim.Adam(m.parameters(), 1e-3, fused=True) for name, m in models.items()}
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    switch = os.environ.get("DANLU_NATIVE_KERNELS")

    def step(name):
        os.environ["DANLU_NATIVE_KERNELS"] = "1" if name == "danlu" else "0"
        optimizers[name].zero_grad(set_to_none=True)
        F.cross_entropy(models[name](x), y).backward()
        optimizers[name].step()

    try:
        times = alternate({name: (lambda n=name: step(n)) for name in models}, reps, warmup=5)
    finally:
        if switch is None:
            os.environ.pop("DANLU_NATIVE_KERNELS", None)
        else:
            os.environ["DANLU_NATIVE_KERNELS"] = switch
    same = all(torch.equal(a, b) for a, b in zip(models["torch"].parameters(), models["danlu"].parameters()))
    return row("guide CNN training step (batch 32, 1x8x8, Adam)", threads, times, same)


def run(args):
    import torch

    reps = 30 if args.quick else args.maxpool_reps
    threads_list = [int(t) for t in args.maxpool_threads.split(",") if t] or [torch.get_num_threads()]
    before = torch.get_num_threads()
    rows = []
    try:
        for threads in threads_list:
            torch.set_num_threads(threads)
            for shape in SHAPES[:1] if args.quick else SHAPES:
                rows += op_rows(shape, threads, reps)
        torch.set_num_threads(before)
        rows.append(step_row(before, reps))
    finally:
        torch.set_num_threads(before)
    return rows


if __name__ == "__main__":  # the same as: python benchmarks/run.py --only NAME [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run as harness

    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
