"""danlu.kernels: each hand-fused kernel against the plain torch expression it stands for, with tiny inputs."""
import subprocess
import sys

import pytest
import torch

from danlu.data.spec import DataSpec
from danlu.kernels import attention, table_gelu
from danlu.kernels.attention import (
    causal_attention,
    masked_attention,
    unfused_causal_attention,
    unfused_masked_attention,
)
from danlu.kernels.lm_loss import lm_head_loss
from danlu.kernels.table_gelu import gelu
from danlu.models.gpt import GPT, SIZE_PRESETS, GPTConfig

torch.set_num_threads(1)

VOCAB = 50
TINY = GPTConfig(**SIZE_PRESETS["tiny"])


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(TINY, DataSpec(vocab_size=VOCAB, pad_id=0, num_classes=0, max_length=32)).eval()


def test_kernels_sit_below_models_and_training():
    """danlu.kernels imports torch only: importing it loads no other danlu package."""
    code = ("import sys, danlu.kernels; "
            "print(sorted(m for m in sys.modules if m.startswith('danlu.') and not m.startswith('danlu.kernels')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_causal_attention_is_sdpas_on_every_path():
    """fp32, grouped-query heads and dropout stay on SDPA; bf16 on CPU goes unfused; all give SDPA's result."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(causal_attention(q, k, v), sdpa(q, k, v, is_causal=True), rtol=0, atol=0)
    assert attention.unfused_is_faster(q.bfloat16(), k.bfloat16())
    assert not attention.unfused_is_faster(q, k)  # fp32
    assert not attention.unfused_is_faster(q.bfloat16(), k[:, :2].bfloat16())  # shared key heads: SDPA broadcasts
    assert not attention.unfused_is_faster(q.bfloat16(), k.bfloat16(), dropout_p=0.1)
    torch.testing.assert_close(causal_attention(q, k[:, :2], v[:, :2]),
                               sdpa(q, k[:, :2], v[:, :2], is_causal=True, enable_gqa=True), rtol=0, atol=0)
    half = [t.bfloat16() for t in (q, k, v)]
    torch.testing.assert_close(causal_attention(*half), sdpa(*half, is_causal=True), rtol=0.02, atol=0.02)


def test_unfused_causal_attention_matches_sdpa_forward_and_backward(monkeypatch):
    """bf16 on CPU takes the unfused path (faster there); it must compute what SDPA computes."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g, requires_grad=True) for _ in range(3))
    out = unfused_causal_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # a GPT under bf16 autocast goes through it, and agrees with fp32 SDPA to bf16 precision
    calls = []
    monkeypatch.setattr(attention, "unfused_causal_attention", lambda *a: calls.append(1) or unfused_causal_attention(*a))
    model = tiny_gpt()
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        assert not calls  # fp32: SDPA
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(ids).float()
    assert len(calls) == TINY.num_layers
    assert (half - full).abs().max() < 0.05 * full.abs().max()
    # the benchmark's ablation switch: no window runs unfused
    monkeypatch.setattr(attention, "UNFUSED_MAX_LENGTH", 0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    assert len(calls) == TINY.num_layers


def test_unfused_bf16_attention_gradients_are_as_close_as_sdpas_own():
    """In bf16 the softmax runs on bf16 scores (fp32 inside the kernel): its gradients must stay as close
    to the fp32 reference as torch's fused bf16 kernel's are."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 64, 16, generator=g) for _ in range(3))
    up = torch.randn(2, 3, 64, 16, generator=g)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def grads(attend, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        return [t.float() for t in torch.autograd.grad((attend(*inputs) * up.to(dtype)).sum(), inputs)]

    ref = grads(lambda *a: sdpa(*a, is_causal=True), torch.float32)
    ours = grads(unfused_causal_attention, torch.bfloat16)
    theirs = grads(lambda *a: sdpa(*a, is_causal=True), torch.bfloat16)
    for a, b, r in zip(ours, theirs, ref):
        scale = r.abs().max()
        assert (a - r).abs().max() / scale < max(0.01, 1.5 * ((b - r).abs().max() / scale))


def test_unfused_masked_attention_matches_sdpa_forward_and_backward(monkeypatch):
    """Attention under a padding mask (encoders, cross-attention): the unfused path computes what SDPA does,
    for a key mask (B, 1, 1, S) and a full (B, 1, T, S) one, forward and backward; bf16 on CPU takes it,
    fp32 and shared key heads stay on SDPA."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 7, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(3, 2, 11, 8, generator=g, requires_grad=True) for _ in range(2))
    key_mask = (torch.arange(11)[None, :] < torch.tensor([11, 4, 1])[:, None])[:, None, None, :]  # (3, 1, 1, 11)
    full_mask = key_mask & (torch.rand(3, 1, 7, 11, generator=g) < 0.7)
    full_mask[..., 0] = True  # every query sees a key
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for mask in (None, key_mask, full_mask):
        out, ref = unfused_masked_attention(q, k, v, mask), sdpa(q, k, v, attn_mask=mask)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        for a, b in zip(torch.autograd.grad(out.square().sum(), (q, k, v)), torch.autograd.grad(ref.square().sum(), (q, k, v))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    calls = []
    monkeypatch.setattr(attention, "unfused_masked_attention", lambda *a: calls.append(1) or unfused_masked_attention(*a))
    with torch.no_grad():
        torch.testing.assert_close(masked_attention(q, k, v, key_mask), sdpa(q, k, v, attn_mask=key_mask), rtol=0, atol=0)
        masked_attention(q, k[:, :1], v[:, :1], key_mask)  # grouped-query heads: SDPA broadcasts them
        assert not calls
        half = [t.bfloat16() for t in (q, k, v)]
        torch.testing.assert_close(masked_attention(*half, key_mask), sdpa(*half, attn_mask=key_mask), rtol=0.02, atol=0.02)
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_table_gelu_is_torchs_gelu_bit_for_bit(dtype, monkeypatch):
    """The tanh GELU of 16-bit CPU tensors is a table lookup; for every one of the 65,536 inputs (NaN and
    infinities included) its value and its gradient must be exactly what torch's own kernels give."""
    x = torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16).view(dtype).repeat(2)
    up = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    looked_up, computed = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = gelu(looked_up, approximate="tanh")
    ours.backward(up)
    assert ours.grad_fn.name().endswith("_TableGELUBackward")  # the table path, not F.gelu
    ref = torch.nn.functional.gelu(computed, approximate="tanh")
    ref.backward(up)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(looked_up.grad, computed.grad, rtol=0, atol=0, equal_nan=True)
    # fp32, the erf GELU and small inputs (a decoding step) stay on torch's kernel
    monkeypatch.setattr(table_gelu, "_TableGELU", None)
    for a, approximate in ((x.float(), "tanh"), (x, "none"), (x[:100], "tanh")):
        torch.testing.assert_close(gelu(a, approximate), torch.nn.functional.gelu(a, approximate=approximate),
                                   rtol=0, atol=0, equal_nan=True)


@pytest.mark.slow
def test_table_gelu_under_torch_compile():
    """Compiled, the lookup is one gather the compiler fuses with its index computation: the values are still
    torch's own, and the gradients torch's to within the compiler's own rounding (1 bf16 ulp)."""
    x = torch.randn(300, 1000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    up = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    compiled, eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ours = torch.compile(lambda t: gelu(t, approximate="tanh"))(compiled)
    ours.backward(up)
    ref = torch.nn.functional.gelu(eager, approximate="tanh")
    ref.backward(up)
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(compiled.grad, eager.grad, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("spread", [0.1, 30.0], ids=["usual", "logit-gaps-over-100"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_lm_head_loss_equals_cross_entropy_of_the_logits(autocast, spread):
    """The chunked loss (no logits held) against cross_entropy(linear(h, W).float()): value, accuracy
    count and gradients, with ignored labels and more rows than one chunk; also with logits so far apart
    that most probabilities underflow to 0 in fp32 (the loss must stay exact and finite)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    h = torch.randn(600, 32, generator=g, requires_grad=True)
    w = (torch.randn(300, 32, generator=g) * spread).requires_grad_()
    y = torch.randint(0, 300, (600,), generator=g)
    y[::7] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = h @ w.t()
        ref = F.cross_entropy(logits.float(), y, ignore_index=-100)
        loss, correct, count = lm_head_loss(h, w, y)
    valid = y != -100
    assert count == int(valid.sum())
    target = logits.float().gather(1, y.clamp(min=0)[:, None])[:, 0]
    assert correct == int(((target >= logits.float().amax(1)) & valid).sum())
    assert torch.isfinite(ref)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    ref_grads = torch.autograd.grad(ref, (h, w))
    grads = torch.autograd.grad(loss, (h, w))
    for a, b in zip(grads, ref_grads):  # bf16: within one bf16 rounding step of the largest gradient
        torch.testing.assert_close(a, b, rtol=0.02 if autocast else 1e-5, atol=4e-3 * b.abs().max().item() if autocast else 1e-7)


@pytest.mark.skipif(not __import__("danlu.kernels.packed_linear", fromlist=["x"]).packing_available(),
                    reason="this torch has no MKL packed sgemm")
def test_packed_linear_is_nn_linear_for_its_rows_and_plain_for_others():
    """A linear layer packed for 4 rows: 4-row inputs give nn.Linear's values (another summation order, so close, not
    bitwise), any other row count nn.Linear's exact result; gradients fall back to nn.Linear; unpacking restores it."""
    from danlu.kernels.packed_linear import pack_linear, packable, unpack_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80)
    names = list(layer.state_dict())
    assert packable(layer) and not packable(torch.nn.Linear(4, 4).bfloat16())
    step, prompt = torch.randn(4, 1, 48), torch.randn(2, 3, 48)
    with torch.no_grad():
        want_step, want_prompt = layer(step), layer(prompt)
    pack_linear(layer, 4)
    assert not packable(layer) and list(layer.state_dict()) == names
    with torch.inference_mode():
        torch.testing.assert_close(layer(step), want_step, rtol=1e-6, atol=1e-6)
        assert torch.equal(layer(prompt), want_prompt)
    x = step.clone().requires_grad_()
    layer(x).sum().backward()  # the packed op has no backward: the plain product takes over
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand_as(x))
    unpack_linear(layer)
    assert "forward" not in vars(layer) and packable(layer)


@pytest.mark.skipif(not __import__("danlu.kernels.packed_linear", fromlist=["x"]).packing_available()
                    or not __import__("os").path.exists("/proc/self/statm"), reason="needs MKL packed sgemm and Linux")
def test_packing_again_and_again_keeps_resident_memory_flat():
    """MKL reserves ~4.5x a weight for its packed copy and writes ~1x, at another place of the reserve each time the
    freed block is reused: without giving the freed pages back, 20 decodes of these 40 MiB of layers (a 6-layer
    GPT's blocks, width 384) ratchet the resident memory up by ~120 MiB; with it, it stays flat."""
    from danlu.generation import decode_layout

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE") / 2**20

    shapes = ((1152, 384), (384, 384), (1536, 384), (384, 1536)) * 6
    model = torch.nn.ModuleList(torch.nn.Linear(n_in, n_out) for n_out, n_in in shapes)
    with decode_layout(model, rows=8):
        assert all("forward" in vars(m) for m in model)
    first = rss_mib()
    for i in range(20):
        with decode_layout(model, rows=(8, 4, 6, 5)[i % 4]):
            pass
    assert rss_mib() - first < 20, "resident memory grew by half the weights' size or more over 20 decodes"
