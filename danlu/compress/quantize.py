"""Quantization: functions that take a model and return a quantized copy.

- `quantize_dynamic_int8(model)`: torch.ao dynamic int8 (Jacob et al. 2018) for nn.Linear and nn.LSTM
  (one scale per weight matrix, or per output row with scheme="per_channel"): int8 weights, activations quantized on the fly, int8 matmuls on CPU
  (fbgemm / qnnpack). Speeds up CPU inference; CPU only.
- `quantize_weights(model, bits=8 | 4, group_size)`: weight-only quantization for Transformer linears
  and language models: each nn.Linear becomes a `QuantLinear` holding int8 or packed int4 weights and
  one scale per group of `group_size` input columns (as GPTQ/AWQ store them, Frantar et al. 2022), which
  is dequantized to float at each call. It saves memory and disk, not time, and runs on any device.

On disk every quantized model is plain tensors in safetensors (`quantized_state_dict` /
`load_quantized_state`). QuantLinear's own state is plain tensors already. A torch.ao dynamic Linear
keeps its weight in an opaque packed object, so it is stored unpacked — int8 values, per-channel scales
and zero points — and repacked at load: the file holds the exact int8 weights, 4x smaller than fp32.
A dynamic LSTM's weights are stored the same way and repacked with `set_weight_bias`.

>>> small = quantize_dynamic_int8(run.model)              # doctest: +SKIP
>>> tiny = quantize_weights(gpt, bits=4, group_size=32)   # doctest: +SKIP
"""
from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from danlu.registry import ConfigError

# ----------------------------------------------------------------------------------------- dynamic int8


def ao_modules():
    with warnings.catch_warnings():  # torch.ao.quantization warns that it moves to torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch.ao.nn.quantized.dynamic as qdynamic
        from torch.ao import quantization
    return quantization, qdynamic


def quantize_dynamic_int8(model, layers=("linear", "lstm"), skip=(), inplace=False, scheme="per_tensor"):
    """A copy of `model` (or `model` itself, `inplace`) with its nn.Linear (and nn.LSTM) layers dynamically
    quantized to int8. `skip`: names of modules to keep in fp32 (e.g. ("head",)). `scheme`: one scale per
    weight matrix (`per_tensor`, about 10% faster in fbgemm) or per output row (`per_channel`, closer)."""
    quantization, _ = ao_modules()
    unknown = set(layers) - {"linear", "lstm"}
    if unknown:
        raise ConfigError(f"quantize layers: unknown {sorted(unknown)}; expected linear, lstm")
    if scheme not in ("per_tensor", "per_channel"):
        raise ConfigError(f"quantize scheme: unknown value {scheme!r}; expected one of: per_tensor, per_channel")
    spec = {}
    if "linear" in layers:
        spec[nn.Linear] = (quantization.per_channel_dynamic_qconfig if scheme == "per_channel"
                           else quantization.default_dynamic_qconfig)
    if "lstm" in layers:
        spec[nn.LSTM] = quantization.default_dynamic_qconfig
    for name in skip:
        spec[name] = None
    model = (model if inplace else copy.deepcopy(model)).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def dynamic_modules(model):
    _, qdynamic = ao_modules()
    for name, module in model.named_modules():
        if isinstance(module, (qdynamic.Linear, qdynamic.LSTM)):
            yield name, module


def _unpack(w, key):
    """A quantized weight -> plain tensors: int8 values, scales and zero points (per channel or per tensor)."""
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scale, zero = w.q_per_channel_scales().float(), w.q_per_channel_zero_points().to(torch.int32)
    else:
        scale, zero = torch.tensor([w.q_scale()], dtype=torch.float32), torch.tensor([w.q_zero_point()], dtype=torch.int32)
    return {key: w.int_repr(), key + "_scale": scale, key + "_zero_point": zero}


def _repack(tensors, key):
    scale, zero = tensors[key + "_scale"], tensors[key + "_zero_point"]
    if scale.numel() > 1:  # per output channel
        return torch._make_per_channel_quantized_tensor(tensors[key], scale.double(), zero.long(), 0)
    return torch._make_per_tensor_quantized_tensor(tensors[key], float(scale), int(zero))


def weights_and_biases(module):
    """{name: quantized weight or float bias} of a dynamic Linear or LSTM or a static int8 layer. torch keeps
    them behind its private `_weight_bias`; this is the one place in danlu that calls it."""
    _, qdynamic = ao_modules()
    if isinstance(module, qdynamic.LSTM):
        values = module._weight_bias()
        return {**values["weight"], **values["bias"]}
    w, b = module._weight_bias()
    return {"weight": w, **({"bias": b} if b is not None else {})}


def quantized_state_dict(model):
    """A state dict of plain tensors (safetensors can store it) for any model, quantized or not: each
    dynamic int8 weight becomes `<name>` (int8), `<name>_scale` and `<name>_zero_point`."""
    out, prefixes = {}, []
    for name, module in dynamic_modules(model):
        p = name + "."
        prefixes.append(p)
        for key, t in weights_and_biases(module).items():
            out.update(_unpack(t, p + key) if t.is_quantized else {p + key: t.detach().float()})
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and not any(key.startswith(p) for p in prefixes):
            out.update(_unpack(value, key) if value.is_quantized else {key: value})
    return out


def load_quantized_state(model, tensors, where="weights"):
    """Load a `quantized_state_dict` into a model of the same structure; strict: names missing and
    unexpected keys and wrong shapes. Returns the model."""
    _, qdynamic = ao_modules()
    expected = quantized_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"{where}: weights do not match the compressed model"
                          + (f"; missing: {', '.join(missing[:10])}" if missing else "")
                          + (f"; unexpected: {', '.join(unexpected[:10])}" if unexpected else ""))
    for key, t in tensors.items():
        if tuple(expected[key].shape) != tuple(t.shape):
            raise ConfigError(f"{where}: {key} has shape {tuple(t.shape)}, the model expects {tuple(expected[key].shape)}")
    done = set()
    for name, module in list(dynamic_modules(model)):
        p = name + "."
        values = {}
        for key, t in weights_and_biases(module).items():
            values[key] = _repack(tensors, p + key) if t.is_quantized else tensors[p + key]
            done.update(k for k in (p + key, p + key + "_scale", p + key + "_zero_point") if k in tensors)
        if isinstance(module, qdynamic.Linear):
            module.set_weight_bias(values["weight"], values.get("bias"))
        else:
            module.set_weight_bias(values)
    for name, module in static_modules(model):  # static int8 layers load their own (repacked) state
        p = name + "."
        own = module.state_dict()  # keys relative to the module
        state = {k: (_repack(tensors, p + k) if v is not None and v.is_quantized else tensors.get(p + k)) for k, v in own.items()}
        module.load_state_dict(state)
        done.update(k for k in tensors if k.startswith(p))
    with torch.no_grad():
        for key, t in tensors.items():
            if key not in done:
                owner, _, attr = key.rpartition(".")
                getattr(model.get_submodule(owner) if owner else model, attr).copy_(t)
    return model


def static_modules(model):
    """Statically quantized layers (torch.ao.nn.quantized Conv / Linear), whose weights are packed."""
    import torch.ao.nn.quantized as nnq

    _, qdynamic = ao_modules()
    for name, module in model.named_modules():
        if isinstance(module, (nnq.Conv1d, nnq.Conv2d, nnq.Linear)) and not isinstance(module, qdynamic.Linear):
            yield name, module


# ----------------------------------------------------------------------------------------- static int8


def quantize_static_int8(model, calibration, skip=()):
    """A copy of `model` whose convolutions run in int8 with int8 activations (post-training static
    quantization, Jacob et al. 2018): each nn.Conv1d is wrapped as quantize -> int8 conv -> dequantize,
    and the activation scales come from running `calibration` (an iterable of model argument tuples,
    e.g. a few hundred training examples) through observers. For CNNs (TextCNN; nn.Conv2d of image CNNs
    too); CPU only."""
    quantization, _ = ao_modules()
    model = copy.deepcopy(model).cpu().eval()
    qconfig = quantization.get_default_qconfig(torch.backends.quantized.engine)
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and name not in skip:
            wrapped = nn.Sequential(quantization.QuantStub(), module, quantization.DeQuantStub())
            wrapped.qconfig = qconfig
            _set_module(model, name, wrapped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantization.prepare(model, inplace=True)
        with torch.no_grad():
            for args in calibration:
                model(*args)
        quantization.convert(model, inplace=True)
    return model


def _set_module(model, name, new):
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, new)


# ----------------------------------------------------------------------------------------- weight-only


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored as int8 or int4 (two per byte) with one fp16 scale per
    `group_size` input columns of each output row, symmetric around zero: w ≈ scale * q, with q in
    [-128, 127] (8 bits) or [-8, 7] (4 bits). `forward` dequantizes and calls F.linear.

    >>> q = QuantLinear.from_linear(nn.Linear(64, 32), bits=4, group_size=32)
    >>> q.qweight.shape, q.scales.shape
    (torch.Size([32, 32]), torch.Size([32, 2]))
    """

    def __init__(self, in_features, out_features, bits=8, group_size=64, bias=True):
        super().__init__()
        if bits not in (4, 8):
            raise ConfigError(f"quantize bits: expected 4 or 8, got {bits!r}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = min(group_size, in_features)
        groups = math.ceil(in_features / self.group_size)
        padded = groups * self.group_size  # in_features padded to whole groups (with zero weights)
        columns = padded // 2 if bits == 4 else padded
        self.register_buffer("qweight", torch.zeros(out_features, columns, dtype=torch.uint8 if bits == 4 else torch.int8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear, bits=8, group_size=64):
        q = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None)
        q.qweight, q.scales = quantize_groups(linear.weight.detach().float(), bits, q.group_size)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q.to(linear.weight.device)

    def dequantize(self):
        """The fp32 weight (out, in) that this layer multiplies by."""
        return dequantize_groups(self.qweight, self.scales, self.bits, self.group_size)[:, : self.in_features]

    def forward(self, x):
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def quantize_groups(weight, bits, group_size):
    """weight (O, I) -> (q, scales): q int8 (O, I') or packed uint8 (O, I'/2), scales fp16 (O, I'/group_size),
    with I' = I rounded up to whole groups."""
    O, I = weight.shape
    groups = math.ceil(I / group_size)
    w = F.pad(weight, (0, groups * group_size - I)).view(O, groups, group_size)  # (O, G, S)
    qmax = 2 ** (bits - 1) - 1
    scales = (w.abs().amax(-1) / qmax).clamp(min=1e-8).half()  # (O, G), rounded to fp16 before use
    q = torch.round(w / scales.float()[..., None]).clamp(-qmax - 1, qmax).to(torch.int8).view(O, -1)  # (O, I')
    if bits == 4:
        u = (q + 8).to(torch.uint8)  # [-8, 7] -> [0, 15]
        q = u[:, 0::2] | (u[:, 1::2] << 4)  # (O, I'/2): even columns in the low nibble
    return q, scales


def dequantize_groups(q, scales, bits, group_size):
    """The inverse of quantize_groups: fp32 (O, I')."""
    if bits == 4:
        low, high = (q & 0x0F).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8  # (O, I'/2) each
        q = torch.stack([low, high], dim=-1).view(q.shape[0], -1)  # (O, I')
    O = q.shape[0]
    w = q.float().view(O, -1, group_size) * scales.float()[..., None]  # (O, G, S)
    return w.view(O, -1)


def quantize_weights(model, bits=8, group_size=64, skip=(), inplace=False):
    """A copy of `model` (or `model` itself, `inplace`) whose nn.Linear layers are QuantLinear (weight-only
    int8 / int4). A linear tied to an embedding (a language model's output head) stays as it is, and so do
    modules named in `skip`."""
    model = model if inplace else copy.deepcopy(model)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name not in skip and id(module.weight) not in tied:
            _set_module(model, name, QuantLinear.from_linear(module, bits, group_size))
    return model

