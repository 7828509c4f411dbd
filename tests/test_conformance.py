"""One conformance harness over every registered model, as a classifier (every kind accepts spec.num_classes > 0).
Image models (IMAGE_MODELS) are built for an image spec and fed image batches; the rest for a text spec.

A new model joins by being registered in danlu.models.MODELS: its tiny config is its own defaults with
the sizes below shrunk, unless TINY names the kind.
"""
import dataclasses

import pytest
import torch

from danlu.config import TrainConfig
from danlu.data.spec import DataSpec
from danlu.files import load_tensors, load_weights, save_weights
from danlu.models import IMAGE_MODELS, MODELS
from danlu.training.optim import build_optimizer
from danlu.training.tasks import ClassificationTask, model_inputs

torch.set_num_threads(1)

SPEC = DataSpec(vocab_size=40, pad_id=0, num_classes=3, max_length=32, labels=("a", "b", "c"),
                mask_id=4, bos_id=5, eos_id=6)
IMAGE_SPEC = DataSpec(vocab_size=0, num_classes=3, labels=("a", "b", "c"), channels=3, image_size=(10, 7))
SMALL = {"embed_dim": 32, "hidden_dim": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 0, "num_filters": 16,
         "intermediate_dim": 64, "max_positions": 64, "dropout": 0.1}
TINY = {"textcnn": {"kernel_sizes": (2, 3)}, "cnn": {"channels": (8, 16)}, "vit": {"patch_size": 3}}  # per-kind extras, when shrinking the shared sizes is not enough
LENGTHS = [12, 7, 3, 1]  # right-padded to 12, down to a single real token


def tiny_config(kind):
    config_cls = MODELS[kind][0]
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: v for k, v in SMALL.items() if k in names}
    values.update(TINY.get(kind, {}))
    return config_cls(**values)


def build(kind, seed=0):
    torch.manual_seed(seed)
    return MODELS[kind][1](tiny_config(kind), IMAGE_SPEC if kind in IMAGE_MODELS else SPEC)


def fixed_batch(seed=0, kind=""):
    g = torch.Generator().manual_seed(seed)
    if kind in IMAGE_MODELS:  # (B, C, H, W) with sides that are not multiples of the patch size
        pixels = torch.randn((len(LENGTHS), IMAGE_SPEC.channels, *IMAGE_SPEC.image_size), generator=g)
        return {"pixel_values": pixels, "labels": torch.tensor([0, 1, 2, 1])}
    mask = torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]  # (B, T)
    ids = torch.randint(7, SPEC.vocab_size, mask.shape, generator=g).masked_fill(~mask, SPEC.pad_id)  # (B, T)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


KINDS = sorted(MODELS)


def test_the_harness_covers_the_zoo():
    assert {"mlp", "lstm", "textcnn", "transformer", "gpt", "bert", "cnn", "vit"} <= set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_shape(kind):
    model = build(kind).eval()
    batch = fixed_batch(kind=kind)
    with torch.no_grad():
        logits = model(*model_inputs(batch))
    assert logits.shape == (len(LENGTHS), SPEC.num_classes)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path):
    model = build(kind, seed=0).eval()
    path = tmp_path / "model.safetensors"
    save_weights(path, model, {"kind": kind})
    tensors, meta = load_tensors(path)
    assert meta == {"kind": kind}
    fresh = build(kind, seed=1).eval()  # other weights, until loaded
    batch = fixed_batch(kind=kind)
    with torch.no_grad():
        expected = model(*model_inputs(batch))
        assert not torch.equal(fresh(*model_inputs(batch)), expected)
        load_weights(fresh, tensors, where=str(path))
        torch.testing.assert_close(fresh(*model_inputs(batch)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_one_optimizer_step_lowers_the_loss(kind):
    model = build(kind).eval()  # dropout off: the same batch gives the same loss before and after
    task = ClassificationTask(SPEC.labels)
    optimizer = build_optimizer(model, TrainConfig(optimizer="adam", lr=1e-3))
    batch = fixed_batch(kind=kind)
    before, _ = task.loss(model, batch)
    before.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    optimizer.step()
    with torch.no_grad():
        after, _ = task.loss(model, batch)
    assert after.item() < before.item()


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_under_a_seed(kind):
    def train_step(seed):
        model = build(kind, seed).train()  # dropout on: its masks come from the seeded generator too
        optimizer = build_optimizer(model, TrainConfig(optimizer="adam", lr=1e-3))
        loss, _ = ClassificationTask(SPEC.labels).loss(model, fixed_batch(kind=kind))
        loss.backward()
        optimizer.step()
        return loss.item(), model.state_dict()

    loss_a, state_a = train_step(seed=0)
    loss_b, state_b = train_step(seed=0)
    _, state_c = train_step(seed=1)
    assert loss_a == loss_b
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    assert any(not torch.equal(state_a[n], state_c[n]) for n in state_a if state_a[n].is_floating_point())


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_lstm_ignores_padding(bidirectional, pooling):
    from danlu.data.spec import DataSpec
    from danlu.models.lstm import LSTMClassifier, LSTMConfig

    torch.manual_seed(0)
    model = LSTMClassifier(LSTMConfig(embed_dim=8, hidden_dim=8, num_layers=2, bidirectional=bidirectional, pooling=pooling),
                           DataSpec(vocab_size=20, num_classes=3)).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = ids != 0
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], 1)  # more padding on the right
    one = model(ids[1:, :2], mask[1:, :2])  # the short row alone, with no padding at all
    assert torch.allclose(model(ids, mask), model(padded, padded != 0), atol=1e-6)
    assert torch.allclose(model(ids, mask)[1:], one, atol=1e-6)
