"""Pruning: functions that take a model and return a pruned copy.

- `prune_magnitude(model, amount, scope)`: unstructured magnitude pruning (Han et al. 2015): the
  smallest |w| of every linear and convolution weight are set to zero, over all layers at once
  (`global`) or layer by layer. Shapes stay; `sparsity(model)` reports the zeros. Dense kernels do not
  skip zeros, so this saves time only with a sparse runtime, and space only once compressed.
- `prune_structured(model, heads, ffn, channels)`: removes whole attention heads, feed-forward neurons
  (Michel et al. 2019; Voita et al. 2019) and convolution channels (Li et al. 2017; TextCNN's, and an
  image CNN's: each plain stage's output channels, each residual block's inner channels), so the matrices
  really shrink and the model runs faster. Importance is data-free: the norm of the path through the
  unit (value rows x output columns for a head, up row x down column for a neuron, filter x head
  columns for a TextCNN channel; an image CNN's filter L1 norm, Li et al. 2017, times its batch-norm scale
  |gamma| / sqrt(var + eps), Liu et al. 2017). A short recovery fine-tune (`finetune` step) wins back most of the loss.

Structured pruning changes shapes: `structure(model)` lists the new sizes per module, and
`resize(model, sizes)` rebuilds a freshly built model to them (what load_run does before loading).

>>> small = prune_structured(model, heads=0.25, ffn=0.5)  # doctest: +SKIP
>>> structure(small)["blocks.0.ffn"]                       # doctest: +SKIP
{'intermediate_dim': 128}
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from danlu.models.blocks import Attention, FeedForward
from danlu.models.cnn import CNN, BasicBlock
from danlu.registry import ConfigError

# ----------------------------------------------------------------------------------------- unstructured


def _prunable(model):
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and id(m.weight) not in tied]


def prune_magnitude(model, amount=0.5, scope="global"):
    """A copy of `model` with the fraction `amount` of its linear/convolution weights with the smallest
    magnitude set to zero, ranked over all layers together (`global`) or within each layer (`layer`)."""
    if scope not in ("global", "layer"):
        raise ConfigError(f"prune scope: unknown value {scope!r}; expected one of: global, layer")
    if not 0 <= amount < 1:
        raise ConfigError(f"prune amount: expected a fraction in [0, 1), got {amount!r}")
    model = copy.deepcopy(model)
    layers = _prunable(model)
    if amount == 0 or not layers:
        return model
    with torch.no_grad():
        if scope == "global":
            everything = torch.cat([m.weight.abs().flatten() for _, m in layers])
            k = int(amount * everything.numel())
            threshold = everything.kthvalue(k).values if k else -1.0
            for _, m in layers:
                m.weight.masked_fill_(m.weight.abs() <= threshold, 0.0)
        else:
            for _, m in layers:
                k = int(amount * m.weight.numel())
                if k:
                    threshold = m.weight.abs().flatten().kthvalue(k).values
                    m.weight.masked_fill_(m.weight.abs() <= threshold, 0.0)
    return model


def sparsity(model):
    """{"total": fraction of zero weights over prunable layers, "layers": {name: fraction}}."""
    layers = {name: (m.weight == 0).float().mean().item() for name, m in _prunable(model)}
    sizes = {name: m.weight.numel() for name, m in _prunable(model)}
    total = sum(layers[n] * sizes[n] for n in layers) / max(sum(sizes.values()), 1)
    return {"total": total, "layers": layers}


# ----------------------------------------------------------------------------------------- structured


def prune_structured(model, heads=0.0, ffn=0.0, channels=0.0):
    """A copy of `model` without the fraction `heads` of each attention layer's heads, `ffn` of each
    feed-forward layer's neurons and `channels` of each convolution's output channels (TextCNN, image CNN), the
    least important first. Pruning nothing returns an identical model."""
    for key, value in (("heads", heads), ("ffn", ffn), ("channels", channels)):
        if not 0 <= value < 1:
            raise ConfigError(f"prune {key}: expected a fraction in [0, 1), got {value!r}")
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Attention) and heads:
            if module.num_kv_heads != module.num_heads or hasattr(model, "new_cache"):
                # grouped-query heads share keys; a decoder's KV cache is sized from its config
                continue
            keep = max(1, round(module.num_heads * (1 - heads)))
            _shrink_attention(module, _top(_head_scores(module), keep))
        elif isinstance(module, FeedForward) and ffn:
            width = module.down.in_features
            _shrink_ffn(module, _top(_neuron_scores(module), max(1, round(width * (1 - ffn)))))
    if channels and hasattr(model, "convs"):
        keep = [_top(_channel_scores(model, i), max(1, round(conv.out_channels * (1 - channels))))
                for i, conv in enumerate(model.convs)]
        _shrink_convs(model, keep)
    if channels and isinstance(model, CNN):
        for name, (conv, norm, _) in _image_convs(model).items():
            _shrink_image_conv(model, name, _top(_filter_scores(conv, norm),
                                                 max(1, round(conv.out_channels * (1 - channels)))))
    return model


def structure(model):
    """The sizes structured pruning can change, per module: what `resize` needs to rebuild them."""
    sizes = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            sizes[name] = {"num_heads": module.num_heads}
        elif isinstance(module, FeedForward):
            sizes[name] = {"intermediate_dim": module.down.in_features}
    if hasattr(model, "convs"):
        for i, conv in enumerate(model.convs):
            sizes[f"convs.{i}"] = {"out_channels": conv.out_channels}
    if isinstance(model, CNN):
        for name, (conv, _, _) in _image_convs(model).items():
            sizes[name] = {"out_channels": conv.out_channels}
    return sizes


def resize(model, sizes):
    """Shrink a freshly built model to `sizes` (from `structure`); its weights are to be loaded next."""
    convs = {}
    for name, size in sizes.items():
        module = model.get_submodule(name)
        if isinstance(module, Attention):
            if size["num_heads"] != module.num_heads:
                _shrink_attention(module, torch.arange(size["num_heads"]))
        elif isinstance(module, FeedForward):
            if size["intermediate_dim"] != module.down.in_features:
                _shrink_ffn(module, torch.arange(size["intermediate_dim"]))
        elif isinstance(model, CNN) and name in _image_convs(model):
            if size["out_channels"] != module.out_channels:
                _shrink_image_conv(model, name, torch.arange(size["out_channels"]))
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            convs[int(name.rsplit(".", 1)[1])] = torch.arange(size["out_channels"])
        else:
            raise ConfigError(f"compression record: cannot resize {name} ({type(module).__name__})")
    if convs:
        _shrink_convs(model, [convs.get(i, torch.arange(c.out_channels)) for i, c in enumerate(model.convs)])
    return model


def _top(scores, keep):
    return scores.topk(keep).indices.sort().values  # kept units in their original order


def _head_scores(attn):
    H, D = attn.num_heads, attn.head_dim
    value = attn.qkv.weight[2 * H * D :].view(H, D, -1)  # (H, D, C) value rows of each head
    out = attn.out.weight.view(attn.out.out_features, H, D)  # (C, H, D) output columns of each head
    return value.norm(dim=(1, 2)) * out.norm(dim=(0, 2))  # (H,)


def _neuron_scores(ffn):
    I = ffn.down.in_features
    up = ffn.up.weight.norm(dim=1)  # (I,) or (2I,)
    if ffn.activation == "swiglu":
        up = up[:I] * up[I:]  # gate row x up row
    return up * ffn.down.weight.norm(dim=0)  # (I,)


def _channel_scores(model, i):
    conv = model.convs[i]
    start = sum(c.out_channels for c in model.convs[:i])
    head = model.head.weight[:, start : start + conv.out_channels]  # (classes, F)
    return conv.weight.flatten(1).norm(dim=1) * head.norm(dim=0)  # (F,)


def _linear(weight, bias):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight.data.copy_(weight)
    if bias is not None:
        layer.bias.data.copy_(bias)
    return layer.to(weight.device)


def _shrink_attention(attn, keep):
    """Keep heads `keep` (sorted indices) of a multi-head attention with a fused qkv projection."""
    H, D = attn.num_heads, attn.head_dim
    rows = torch.cat([part * H * D + (keep[:, None] * D + torch.arange(D)).flatten() for part in range(3)])
    cols = (keep[:, None] * D + torch.arange(D)).flatten()  # (keep*D,)
    qkv, out = attn.qkv, attn.out
    with torch.no_grad():
        attn.qkv = _linear(qkv.weight[rows], None if qkv.bias is None else qkv.bias[rows])  # (3*keep*D, C)
        attn.out = _linear(out.weight[:, cols], out.bias)  # (C, keep*D)
    attn.num_heads = attn.num_kv_heads = len(keep)


def _shrink_ffn(ffn, keep):
    """Keep neurons `keep` (sorted indices) of a feed-forward layer."""
    I = ffn.down.in_features
    rows = torch.cat([keep, I + keep]) if ffn.activation == "swiglu" else keep
    up, down = ffn.up, ffn.down
    with torch.no_grad():
        ffn.up = _linear(up.weight[rows], None if up.bias is None else up.bias[rows])
        ffn.down = _linear(down.weight[:, keep], down.bias)


def _shrink_convs(model, keep):
    """Keep output channels keep[i] of convolution i of a TextCNN, and the head columns they feed."""
    columns, start = [], 0
    with torch.no_grad():
        for i, (conv, idx) in enumerate(zip(model.convs, keep)):
            columns.append(start + idx)
            start += conv.out_channels
            new = nn.Conv1d(conv.in_channels, len(idx), conv.kernel_size[0], bias=conv.bias is not None)
            new.weight.data.copy_(conv.weight[idx])
            if conv.bias is not None:
                new.bias.data.copy_(conv.bias[idx])
            model.convs[i] = new.to(conv.weight.device)
        columns = torch.cat(columns)
        model.head = _linear(model.head.weight[:, columns], model.head.bias)


def _image_convs(model):
    """The convolutions of an image CNN whose output channels can go, by name: (conv, its norm or None,
    what reads its output). Plain stages (blocks 0): every stage's conv, read by the next stage's conv or,
    after the last, by the dense layer. Residual stacks: the first conv of each block, read by its second
    (Li et al. 2017, §4.2, prune these only); the others feed the shortcut additions and stay."""
    found = {}
    if model.config.blocks == 0:
        stages = [(f"features.{i}.0", m) for i, m in enumerate(model.features) if isinstance(m, nn.Sequential)]
        for j, (name, stage) in enumerate(stages):
            after = stages[j + 1][1][0] if j + 1 < len(stages) else (model.hidden or model.head)
            found[name] = (stage[0], stage[1] if isinstance(stage[1], nn.BatchNorm2d) else None, after)
    else:
        for i, block in enumerate(model.features):
            if isinstance(block, BasicBlock):
                norm = block.conv1[1]
                found[f"features.{i}.conv1.0"] = (block.conv1[0], norm if isinstance(norm, nn.BatchNorm2d) else None,
                                                  block.conv2[0])
    return found


def _filter_scores(conv, norm):
    """Each output channel's filter L1 norm, times its batch-norm scale where one follows: (out,)."""
    score = conv.weight.abs().flatten(1).sum(1)
    if norm is not None:
        score = score * norm.weight.abs() / (norm.running_var + norm.eps).sqrt()
    return score


def _shrink_image_conv(model, name, keep):
    """Keep output channels `keep` (sorted indices) of the image CNN's convolution `name`, of its norm, and
    the input channels (or flattened dense columns) that read them."""
    conv, norm, after = _image_convs(model)[name]
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight[keep])
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias[keep])
        if norm is not None:
            norm.weight, norm.bias = nn.Parameter(norm.weight[keep]), nn.Parameter(norm.bias[keep])
            norm.running_mean, norm.running_var = norm.running_mean[keep], norm.running_var[keep]
            norm.num_features = len(keep)
        if isinstance(after, nn.Conv2d):
            after.weight = nn.Parameter(after.weight[:, keep])
            after.in_channels = len(keep)
        else:  # the dense layer: per channel its H' x W' flattened positions (1 after average pooling)
            per = after.in_features // conv.out_channels
            columns = (keep[:, None] * per + torch.arange(per, device=keep.device)).flatten()
            after.weight = nn.Parameter(after.weight[:, columns])
            after.in_features = len(columns)
    conv.out_channels = len(keep)
