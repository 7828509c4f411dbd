"""danlu.kernels.max_pool2d against F.max_pool2d: the C kernel's values and gradients bit for bit (ties,
NaNs, infinities, signed zeros, odd sizes), and torch's own pool wherever the kernel must not run."""
import shutil
import subprocess
import sys
import threading
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from danlu.kernels import maxpool

torch.set_num_threads(1)
NAN_BITS = (0x7FC00001, 0x7FC00002, -0x003FFFFD)  # three quiet NaNs told apart by their payloads (the last negative)


def bits(t):
    return t.detach().contiguous().view(torch.int32)


def inputs(kind, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(shape, generator=g)
    x = torch.randint(-2, 3, shape, generator=g).float()  # integers: windows full of equal maxima
    if kind == "special":  # NaNs (with distinct payloads), infinities and zeros of both signs
        codes = torch.randint(0, 8, shape, generator=g)
        for code, value in enumerate(NAN_BITS):
            x.view(torch.int32)[codes == code] = value
        x[codes == 3] = -float("inf")
        x[codes == 4] = float("inf")
        x[codes == 5] = -0.0
    return x


def pooled_with_grads(pool, x, grad):
    xi = x.clone().requires_grad_()
    y = pool(xi, 2)
    y.backward(grad)
    return y, xi.grad


def native_only(monkeypatch):
    """Make the kernel module's torch pool fail, so a passing call proves the C kernel ran (small inputs too)."""
    monkeypatch.setattr(maxpool, "MAXPOOL_NATIVE_MIN_ELEMENTS", 0)
    def refuse(*args, **kwargs):
        raise AssertionError("F.max_pool2d called")
    monkeypatch.setattr(maxpool, "F", types.SimpleNamespace(max_pool2d=refuse))


@pytest.mark.parametrize("shape", [(32, 32, 8, 8), (3, 5, 7, 9), (2, 3, 11, 30), (4, 6, 5), (1, 1, 2, 2), (2, 2, 3, 2)])
@pytest.mark.parametrize("kind", ["random", "ties", "special"])
def test_values_and_gradients_are_torchs_bit_for_bit(shape, kind, monkeypatch):
    x = inputs(kind, shape)
    out_shape = (*shape[:-2], shape[-2] // 2, shape[-1] // 2)
    grad = inputs("random", out_shape, seed=1)
    grad.view(-1)[::7] = -0.0  # torch's backward adds the gradient to zeros: -0 arrives as +0
    expected_y, expected_grad = pooled_with_grads(F.max_pool2d, x, grad)
    native_only(monkeypatch)
    y, got_grad = pooled_with_grads(maxpool.max_pool2d, x, grad)
    assert torch.equal(bits(y), bits(expected_y)) and torch.equal(bits(got_grad), bits(expected_grad))
    with torch.no_grad():
        assert torch.equal(bits(maxpool.max_pool2d(x, 2)), bits(expected_y))
    if kind == "ties" and shape == (32, 32, 8, 8):
        windows = x.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)  # (32, 32, 4, 4, 4)
        assert ((windows == windows.amax(-1, keepdim=True)).sum(-1) > 1).sum() > 2000
    if kind == "special" and shape == (32, 32, 8, 8):
        windows = x.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)
        assert (windows.isnan().sum(-1) > 1).sum() > 500  # windows where the last NaN must win
        assert expected_y.isnan().any() and (expected_grad.view(torch.int32) == -0x80000000).sum() == 0


def test_an_expanded_gradient_and_double_backward_match_torch(monkeypatch):
    native_only(monkeypatch)
    x = inputs("ties", (2, 3, 6, 7))
    grads = []
    for pool in (F.max_pool2d, maxpool.max_pool2d):
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((pool(xi, 2) ** 2).sum(), xi, create_graph=True)
        (gg,) = torch.autograd.grad((g * torch.arange(float(g.numel())).view(g.shape)).sum(), xi)
        y = pool(xi, 2)
        y.sum().backward()  # an expanded, non-contiguous gradient
        grads.append((g.detach(), gg, xi.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("case", ["float64", "kernel 3", "stride 1", "padding", "ceil mode", "indices", "channels last",
                                  "transposed", "one row", "meta device", "switched off", "small", "many threads",
                                  "compiling", "tracing"])
def test_torch_pools_what_the_kernel_does_not(case, monkeypatch):
    x, args, kwargs = inputs("random", (32, 32, 8, 10)), (2,), {}
    if case == "float64":
        x = x.double()
    elif case == "kernel 3":
        args = (3,)
    elif case == "stride 1":
        args = (2, 1)
    elif case == "padding":
        args = (2, 2, 1)
    elif case == "ceil mode":
        kwargs = {"ceil_mode": True}
    elif case == "indices":
        kwargs = {"return_indices": True}
    elif case == "channels last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "transposed":
        x = x.transpose(2, 3)
    elif case == "one row":
        x = x[:, :, :1]
    elif case == "meta device":
        x = x.to("meta")
    elif case == "switched off":
        monkeypatch.setenv("DANLU_NATIVE_KERNELS", "0")
    elif case == "small":
        x = inputs("random", (2, 3, 8, 10))
    elif case == "many threads":
        monkeypatch.setattr(torch, "get_num_threads", lambda: maxpool.MAXPOOL_NATIVE_MAX_THREADS + 1)
    elif case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    calls = []

    def spy(*a, **kw):
        calls.append(a)
        return F.max_pool2d(*a, **kw)
    monkeypatch.setattr(maxpool, "F", types.SimpleNamespace(max_pool2d=spy))
    if case == "tracing":
        traced = torch.jit.trace(lambda t: maxpool.max_pool2d(t, 2), x)
        assert "max_pool2d" in str(traced.graph) and torch.equal(traced(x), F.max_pool2d(x, 2))
        return
    if case == "one row":
        with pytest.raises(RuntimeError):  # torch's own error for an output of zero rows
            maxpool.max_pool2d(x, *args, **kwargs)
        assert len(calls) == 1
        return
    got = maxpool.max_pool2d(x, *args, **kwargs)
    assert len(calls) == 1
    expected = F.max_pool2d(x, *args, **kwargs)
    if case == "meta device":
        assert got.device.type == "meta" and got.shape == expected.shape
    elif case == "indices":
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    else:
        assert torch.equal(got, expected)


def test_a_compiler_that_fails_warns_once_and_torch_pools(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", sys.executable + " -c 'raise SystemExit(1)'")
    monkeypatch.setattr(maxpool, "_LIBRARY", {})
    x = inputs("random", (32, 32, 8, 8))
    with pytest.warns(UserWarning, match="native 2x2 max-pool is not available"):
        assert torch.equal(maxpool.max_pool2d(x, 2), F.max_pool2d(x, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(maxpool.max_pool2d(x, 2), F.max_pool2d(x, 2))
    assert not list((tmp_path / "danlu").glob("*"))  # no half-written library left behind


def test_threads_load_one_library_compiled_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(maxpool, "_LIBRARY", {})
    compiled, real = [], maxpool._compile
    monkeypatch.setattr(maxpool, "_compile", lambda *a: compiled.append(1) or real(*a))
    libraries = []
    threads = [threading.Thread(target=lambda: libraries.append(maxpool._library())) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(compiled) == 1 and len(libraries) == 6 and all(lib is libraries[0] is not None for lib in libraries)
    assert [p.name for p in (tmp_path / "danlu").iterdir()] == [maxpool._compile(maxpool.SOURCE, ["cc"]).name]


def test_two_processes_compiling_at_once_each_get_a_whole_library(tmp_path):
    """Both compile into the same fresh cache at the same time; each renames a whole file into place."""
    root = Path(__file__).resolve().parents[1]
    script = ("import torch; from danlu.kernels import maxpool; x = torch.randn(32, 32, 8, 8);"
              "assert maxpool._library() is not None;"
              "assert torch.equal(maxpool.max_pool2d(x, 2), torch.nn.functional.max_pool2d(x, 2))")
    env = {"XDG_CACHE_HOME": str(tmp_path), "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    runs = [subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    for run in runs:
        assert run.wait(timeout=120) == 0, run.stderr.read()
    assert [p.suffix for p in (tmp_path / "danlu").iterdir()] == [".so"]


def test_the_guide_cnn_trains_to_the_same_weights_with_the_kernel_and_without(monkeypatch):
    from danlu.data.spec import DataSpec
    from danlu.models.cnn import CNN, CNNConfig

    spec = DataSpec(vocab_size=0, num_classes=10, channels=1, image_size=(8, 8))
    config = CNNConfig(channels=(32,), blocks=0, norm="none", pooling="flatten", hidden_dim=128)
    torch.manual_seed(0)
    x, y = inputs("ties", (32, 1, 8, 8)), torch.randint(0, 10, (32,))
    weights, ran = [], []
    real = maxpool._forward
    monkeypatch.setattr(maxpool, "_forward", lambda t: ran.append(t.shape) or real(t))
    for native in ("1", "0"):
        monkeypatch.setenv("DANLU_NATIVE_KERNELS", native)
        torch.manual_seed(1)
        model = CNN(config, spec).train()
        conv = model.features[0][0]
        with torch.no_grad():  # integer weights on integer inputs: pooling windows full of equal maxima
            conv.weight.copy_(inputs("ties", conv.weight.shape, seed=2).clamp(-1, 1))
        optimizer = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert ran == [(32, 32, 8, 8)] * 3  # the C kernel in the first model's three steps, not in the second's
    assert all(torch.equal(a, b) for a, b in zip(*weights)) and len(weights[0]) == 6


def test_the_benchmark_times_both_pools_on_the_same_bits(tmp_path, capsys):
    import importlib.util
    import json

    run_py = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    spec = importlib.util.spec_from_file_location("benchmarks.run", run_py)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    assert harness.main(["--only", "maxpool", "--quick", "--threads", "1", "--results", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "maxpool.json").read_text(encoding="utf-8"))["rows"]
    assert [r["measured"].split(" (")[0] for r in rows] == ["forward", "forward + backward", "guide CNN training step"]
    assert all(r["same_bits"] is True and r["reps"] == 30 and r["torch_min_us"] > 0 and r["danlu_min_us"] > 0
               for r in rows)


@pytest.mark.skipif(not shutil.which("cc"), reason="needs the system C compiler")
def test_the_plain_c_loop_for_processors_without_sse2_computes_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "cc -U__SSE2__")  # the #else branch of maxpool2x2.c, on any processor
    monkeypatch.setattr(maxpool, "_LIBRARY", {})
    for kind, shape in [("special", (32, 32, 8, 8)), ("ties", (3, 5, 7, 9))]:
        x = inputs(kind, shape)
        grad = inputs("random", (*shape[:2], shape[2] // 2, shape[3] // 2), seed=1)
        expected = pooled_with_grads(F.max_pool2d, x, grad)
        with monkeypatch.context() as m:
            native_only(m)
            got = pooled_with_grads(maxpool.max_pool2d, x, grad)
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(got, expected))
    assert maxpool._LIBRARY["lib"] is not None


def test_torch_export_captures_torchs_pool(monkeypatch):
    """torch.export (behind danlu's ONNX export) traces the pool as aten.max_pool2d, never the C call."""
    ran, real = [], maxpool._forward
    monkeypatch.setattr(maxpool, "_forward", lambda t: ran.append(t.shape) or real(t))

    class Pool(torch.nn.Module):
        def forward(self, x):
            return maxpool.max_pool2d(x * 2, 2)  # (B, C, H / 2, W / 2)

    x = inputs("random", (2, 4, 32, 32))
    program = torch.export.export(Pool(), (x,))
    assert not ran and "aten.max_pool2d" in str(program.graph)
    assert torch.equal(program.module()(x), Pool()(x)) and ran == [x.shape]
