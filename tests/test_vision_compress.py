"""Structured channel pruning of image CNNs: plain stages and residual blocks shrink, channels that carry
nothing go first and leave the outputs as they were, a pruned model is rebuilt from its recorded sizes,
and the `prune-channels-N` recipe runs on an image run with its scorecard."""
import os

import pytest
import torch
from test_vision import image_config, write_folder

from danlu.compress.prune import prune_structured, resize, structure
from danlu.data.spec import DataSpec
from danlu.models.cnn import CNN, BasicBlock, CNNConfig

torch.set_num_threads(1)

SPEC = DataSpec(vocab_size=0, num_classes=3, channels=3, image_size=(9, 10))
MODELS = {"plain-flatten": {"channels": (8, 6), "blocks": 0, "norm": "none", "pooling": "flatten", "hidden_dim": 5},
          "plain-batchnorm-avg": {"channels": (8, 6), "blocks": 0, "norm": "batch", "pooling": "avg"},
          "residual": {"channels": (8, 12), "blocks": 2, "norm": "batch"}}


def trained_looking(config):
    """A CNN with random batch-norm statistics and scales, in eval mode (as a finished run is)."""
    torch.manual_seed(0)
    model = CNN(CNNConfig(**config), SPEC)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.normal_(), m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_dead_channels_go_first_and_the_outputs_stay(name):
    """Half the prunable channels of each layer made dead (zero filter and bias, or a zero batch-norm scale
    and shift): pruning half removes exactly them, and the logits are unchanged."""
    model = trained_looking(MODELS[name])
    sizes = structure(model)
    assert sizes and all(k.startswith("features.") for k in sizes)
    with torch.no_grad():
        for key in sizes:
            conv = model.get_submodule(key)
            norm = model.get_submodule(key.rsplit(".", 1)[0])[1]
            dead = torch.arange(0, conv.out_channels, 2)  # every other channel
            if isinstance(norm, torch.nn.BatchNorm2d):
                norm.weight[dead], norm.bias[dead] = 0.0, -1.0  # relu(0 * x - 1) = 0: nothing passes
            else:
                conv.weight[dead], conv.bias[dead] = 0.0, 0.0
    x = torch.randn(4, 3, 9, 10)
    pruned = prune_structured(model, channels=0.5)
    assert {k: v["out_channels"] for k, v in structure(pruned).items()} == \
        {k: v["out_channels"] // 2 for k, v in sizes.items()}
    if name == "residual":  # the inner conv of every block; the convs feeding the shortcuts keep their width
        assert all(b.conv2[0].out_channels == b.conv1[0].out_channels * 2 for b in pruned.features if isinstance(b, BasicBlock))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_a_pruned_cnn_is_rebuilt_from_its_sizes(name):
    model = trained_looking(MODELS[name])
    pruned = prune_structured(model, channels=0.4)
    fresh = resize(CNN(CNNConfig(**MODELS[name]), SPEC), structure(pruned))
    fresh.load_state_dict(pruned.state_dict())
    x = torch.randn(2, 3, 9, 10)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned(x))
    assert prune_structured(model, channels=0.0).state_dict().keys() == model.state_dict().keys()


def test_prune_channels_recipe_on_an_image_run(tmp_path):
    from danlu.jobs.compress import compress_run
    from danlu.jobs.train import train
    from danlu.runs import load_run

    bars = write_folder(tmp_path / "bars", n=8)
    run = train(image_config(bars, tmp_path / "cnn"))
    small = compress_run(run.path, "prune-channels-50", out=str(tmp_path / "pruned"), quick=True, say=lambda m: None)
    rows = {r["key"]: r for r in small.scorecard["rows"]}
    assert rows["parameters"]["after"] < rows["parameters"]["before"]
    again = load_run(small.path)  # rebuilt at the pruned sizes from the compression record
    assert again.predict([os.path.join(bars, "h", "1.png")])[0]["label"] in ("h", "v")
    assert any(m.out_channels == 4 for m in again.model.modules() if isinstance(m, torch.nn.Conv2d))  # 8 -> 4
