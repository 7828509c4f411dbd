"""What the CNN's speed-ups must leave unchanged: the plain stages' conv -> max-pool -> ReLU computes the
same outputs and the same gradients as the guide's conv -> ReLU -> max-pool (ties, zeros and negatives
included), and image batches indexed from a split prepared once equal those prepared batch by batch."""
import copy

import numpy as np
import pytest
import torch
from test_vision import bars  # noqa: F401  (the module's image folder fixture)
from torch import nn

from danlu import config as config_mod
from danlu.data import images as images_mod
from danlu.data.images import build_image_data
from danlu.data.spec import DataSpec
from danlu.models.cnn import CNN, CNNConfig

torch.set_num_threads(1)

SPEC = DataSpec(vocab_size=0, num_classes=4, channels=2, image_size=(8, 9))
PLAIN = {"flatten": {"channels": (5, 6), "blocks": 0, "norm": "none", "pooling": "flatten", "hidden_dim": 7},
         "batchnorm": {"channels": (5, 6, 3, 2), "blocks": 0, "norm": "batch", "pooling": "avg"}}


def relu_then_pool(model):
    """A copy of a plain-stage CNN whose layers run in the guide's order: conv -> ReLU (not in place) -> pool."""
    reference = copy.deepcopy(model)
    layers, features = [], list(reference.features)
    for i, layer in enumerate(features):
        if isinstance(layer, nn.ReLU):
            continue
        layers.append(layer)
        if isinstance(layer, nn.Sequential):  # a stage's conv (and norm): the ReLU straight after it
            layers.append(nn.ReLU())
    reference.features = nn.Sequential(*layers)
    return reference


def integer_model(model, seed):
    """Weights in {-1, 0, 1} and integer inputs: sums are exact, so pooling windows often hold equal maxima
    (and zeros, and only negatives) — the cases where the order of ReLU and max-pool could matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-1, 2, p.shape, generator=g).float())
    x = torch.randint(-2, 3, (6, *SPEC.image_size), generator=g).float()[:, None].repeat(1, 2, 1, 1)  # (6, 2, 8, 9)
    return x


def tied_windows(model, x):
    """How many 2x2 windows of the first pool's input hold their largest value twice or more."""
    first = model.features[0](x)  # (B, C, H, W)
    H, W = first.shape[2] // 2 * 2, first.shape[3] // 2 * 2
    windows = first[:, :, :H, :W].unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)  # (B, C, H/2, W/2, 4)
    return int(((windows == windows.amax(-1, keepdim=True)).sum(-1) > 1).sum())


@pytest.mark.parametrize("name", list(PLAIN))
@pytest.mark.parametrize("inputs", ["random", "integer"])
def test_pool_then_relu_matches_relu_then_pool_with_its_gradients(name, inputs):
    torch.manual_seed(0)
    model = CNN(CNNConfig(**PLAIN[name]), SPEC).train()
    kinds = [type(m) for m in model.features]
    for i, kind in enumerate(kinds):  # every pool is followed by its stage's ReLU
        if issubclass(kind, nn.MaxPool2d):
            assert kinds[i + 1] is nn.ReLU
    x = integer_model(model, 1) if inputs == "integer" else torch.randn(6, 2, 8, 9)
    if inputs == "integer":
        assert tied_windows(model, x) > 20
    reference = relu_then_pool(model)
    outputs = []
    for net in (model, reference):
        xi = x.clone().requires_grad_()
        out = net(xi)  # (6, 4)
        (out * torch.arange(1.0, 5.0)).sum().backward()
        outputs.append((out.detach(), xi.grad, [p.grad for p in net.parameters()]))
    (out_a, grad_a, params_a), (out_b, grad_b, params_b) = outputs
    assert torch.equal(out_a, out_b) and torch.equal(grad_a, grad_b)
    assert grad_a.abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b)) and len(params_a) == len(list(model.parameters()))


def test_relu_after_the_pool_routes_tied_gradients_as_torch_does():
    """A window's gradient goes to its first largest element in both orders, and nowhere when the largest
    is zero or negative."""
    x = torch.tensor([[[[1.0, 1.0, 0.0, -1.0], [0.5, 1.0, 0.0, 0.0], [-2.0, -1.0, 3.0, 3.0], [-1.0, -3.0, 3.0, 2.0]]]])
    grads = []
    for order in ("relu-pool", "pool-relu"):
        xi = x.clone().requires_grad_()
        f = torch.nn.functional
        y = f.max_pool2d(f.relu(xi), 2) if order == "relu-pool" else f.relu(f.max_pool2d(xi, 2))
        y.sum().backward()
        grads.append(xi.grad)
    expected = torch.tensor([[[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]])
    assert torch.equal(grads[0], expected) and torch.equal(grads[1], expected)


def batches(dataset, **kw):
    return [(b["pixel_values"], b["index"], b["labels"]) for b in dataset.batches(5, **kw)]


@pytest.mark.parametrize("image", [{"size": 10}, {"size": 10, "crop": 8}])
def test_prepared_batches_equal_batches_prepared_one_by_one(bars, image, monkeypatch):  # noqa: F811
    data = build_image_data(config_mod.load({"data": {"train": bars, "image": image}, "model": {"kind": "cnn"}}).data)
    pre, train = data.preprocess, data.train
    random = "crop" in image  # a random crop: training batches are prepared one by one, evaluation ones not
    assert pre.random() is random and train.augment
    for shuffle in (True, False):
        got = batches(train, epoch=2, seed=3, shuffle=shuffle)
        assert (train._inputs is None) == (random and shuffle)
        assert sorted(torch.cat([i for _, i, _ in got]).tolist()) == list(range(len(train)))
        for x, index, labels in got:
            assert torch.equal(labels, torch.from_numpy(train.targets[index.numpy()]))
            if not (random and shuffle):
                assert torch.equal(x, pre(train.pixels[index]))
        monkeypatch.setattr(images_mod, "INPUTS_CACHE_BYTES", 0)  # too large to keep: one by one, the same batches
        train._inputs = train._inputs_key = None
        again = batches(train, epoch=2, seed=3, shuffle=shuffle)
        assert train._inputs is None
        assert all(torch.equal(a, b) for one, other in zip(got, again) for a, b in zip(one, other))
        monkeypatch.undo()


def test_prepared_inputs_follow_the_preprocessing(bars):  # noqa: F811
    data = build_image_data(config_mod.load({"data": {"train": bars}, "model": {"kind": "cnn"}}).data)
    pre, test = data.preprocess, data.test
    before = next(test.batches(4, shuffle=False))["pixel_values"]
    pre.mean_ = [m + 0.25 for m in pre.mean_]  # refitted statistics: the prepared split is made again
    after = next(test.batches(4, shuffle=False))["pixel_values"]
    assert torch.allclose(after, before - 0.25 / np.array(pre.std_)[0]) and torch.equal(after, pre(test.pixels[:4]))
