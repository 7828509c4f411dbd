"""danlu.compress: quantization, pruning, distillation, compressed runs and their scorecard (tiny models)."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import danlu
from danlu.jobs.compress import compress_run, parse_recipe
from danlu.compress.distill import DistillationTask
from danlu.compress.prune import prune_magnitude, prune_structured, resize, sparsity, structure
from danlu.compress.quantize import (
    QuantLinear,
    load_quantized_state,
    quantize_dynamic_int8,
    quantize_weights,
    quantized_state_dict,
)
from danlu.data.spec import DataSpec
from danlu.models import build_model, count_parameters
from danlu.models.gpt import GPTConfig
from danlu.models.textcnn import TextCNNConfig
from danlu.models.transformer import TransformerConfig
from danlu.registry import ConfigError
from danlu.runs import load_run
from tests.conftest import make_reviews, tiny_config, write_csv


def open_text(*parts):
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return f.read()


SPEC = DataSpec(vocab_size=50, pad_id=0, num_classes=3, max_length=16, labels=("a", "b", "c"))


def _batch(B=4, T=10, vocab=50):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 6:] = False
    return ids, mask


def _transformer(**kw):
    torch.manual_seed(0)
    cfg = TransformerConfig(embed_dim=32, num_heads=4, num_layers=2, intermediate_dim=64, dropout=0.0, **kw)
    return build_model(cfg, SPEC).eval()


# ----------------------------------------------------------------------------------------- quantization


def _reference_dequantize(weight, bits, group_size):
    """Group-wise symmetric quantization written out column group by column group."""
    qmax = 2 ** (bits - 1) - 1
    out = torch.empty_like(weight)
    for row in range(weight.shape[0]):
        for start in range(0, weight.shape[1], group_size):
            w = weight[row, start : start + group_size]
            scale = (w.abs().max() / qmax).clamp(min=1e-8).half().float()
            out[row, start : start + group_size] = torch.round(w / scale).clamp(-qmax - 1, qmax) * scale
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_quant_linear_matches_dequantized_reference(bits):
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    q = QuantLinear.from_linear(linear, bits=bits, group_size=16)
    assert q.qweight.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert q.qweight.shape == (24, 32 if bits == 4 else 64)  # two int4 values per byte
    assert q.scales.shape == (24, 4)
    reference = _reference_dequantize(linear.weight.detach(), bits, 16)
    assert torch.equal(q.dequantize(), reference)
    x = torch.randn(5, 64)
    torch.testing.assert_close(q(x), F.linear(x, reference, linear.bias), rtol=1e-5, atol=1e-5)
    # and close to the float layer: int4 error bounded by half a step per weight
    step = (linear.weight.detach().abs().max() / (2 ** (bits - 1) - 1)).item()
    assert (q.dequantize() - linear.weight).abs().max() <= step / 2 + 1e-6


def test_quant_linear_pads_partial_groups():
    torch.manual_seed(0)
    linear = nn.Linear(40, 8)  # 40 columns = one group of 32 and a padded one
    q = QuantLinear.from_linear(linear, bits=4, group_size=32)
    assert q.dequantize().shape == (8, 40)
    assert (q.dequantize() - linear.weight).abs().max() < 0.05


def test_weight_only_gpt_keeps_logits_close_and_ties():
    torch.manual_seed(0)
    spec = DataSpec(vocab_size=60, pad_id=0, num_classes=0, max_length=32)
    gpt = build_model(GPTConfig(num_layers=2, embed_dim=64, num_heads=2, max_positions=32), spec).eval()
    ids = torch.randint(0, 60, (2, 12))
    ref = gpt(ids)
    for bits, tol in ((8, 0.02), (4, 0.25)):
        q = quantize_weights(gpt, bits=bits, group_size=32)
        assert isinstance(q.blocks[0].attn.qkv, QuantLinear)
        assert isinstance(q.head, nn.Linear) and q.head.weight is q.embed.weight  # the tied head stays tied
        err = (q(ids) - ref).abs().max() / ref.abs().max()
        assert err < tol, (bits, err)


@pytest.mark.parametrize("scheme", ["per_tensor", "per_channel"])
def test_dynamic_int8_state_round_trip(scheme):
    model = _transformer()
    q = quantize_dynamic_int8(model, scheme=scheme)
    state = quantized_state_dict(q)
    assert state["blocks.0.attn.qkv.weight"].dtype == torch.int8
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = quantize_dynamic_int8(_transformer(positions="learned"), scheme=scheme)  # same structure
    torch.manual_seed(1)
    for p in fresh.parameters():
        p.data.normal_()
    load_quantized_state(fresh, state)
    ids, mask = _batch()
    torch.testing.assert_close(fresh(ids, mask), q(ids, mask))
    with pytest.raises(ConfigError, match="missing"):
        load_quantized_state(fresh, {k: v for k, v in state.items() if k != "head.bias"})


def test_dynamic_int8_lstm_round_trip():
    from danlu.models.lstm import LSTMConfig

    torch.manual_seed(0)
    model = build_model(LSTMConfig(embed_dim=16, hidden_dim=16), SPEC).eval()
    q = quantize_dynamic_int8(model)
    state = quantized_state_dict(q)
    fresh = quantize_dynamic_int8(build_model(LSTMConfig(embed_dim=16, hidden_dim=16), SPEC).eval())
    load_quantized_state(fresh, state)
    ids, mask = _batch()
    torch.testing.assert_close(fresh(ids, mask), q(ids, mask), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(q(ids, mask), model(ids, mask), rtol=0.05, atol=0.05)


def test_static_int8_textcnn_round_trip():
    from danlu.compress.quantize import quantize_static_int8

    torch.manual_seed(0)
    model = build_model(TextCNNConfig(embed_dim=16, num_filters=10, dropout=0.0), SPEC).eval()
    calibration = [_batch(B=8, T=12) for _ in range(3)]
    q = quantize_static_int8(model, calibration)
    ids, mask = _batch()
    ref = model(ids, mask)
    assert (q(ids, mask) - ref).abs().max() < 0.1 * ref.abs().max()
    state = quantized_state_dict(q)
    assert state["convs.0.1.weight"].dtype == torch.int8
    fresh = quantize_static_int8(build_model(TextCNNConfig(embed_dim=16, num_filters=10, dropout=0.0), SPEC).eval(),
                                 calibration[:1])
    load_quantized_state(fresh, state)
    assert torch.equal(fresh(ids, mask), q(ids, mask))


# ----------------------------------------------------------------------------------------- pruning


def test_structured_pruning_nothing_is_identity_and_shrinks():
    model = _transformer()
    ids, mask = _batch()
    same = prune_structured(model, heads=0.0, ffn=0.0)
    torch.testing.assert_close(same(ids, mask), model(ids, mask))
    small = prune_structured(model, heads=0.5, ffn=0.5)
    assert count_parameters(small) < count_parameters(model)
    assert structure(small)["blocks.0.attn"] == {"num_heads": 2}
    assert structure(small)["blocks.1.ffn"] == {"intermediate_dim": 32}
    assert small.blocks[0].attn.qkv.weight.shape == (3 * 2 * 8, 32)
    assert small(ids, mask).shape == (4, 3)
    assert count_parameters(model) == count_parameters(_transformer())  # the input model is untouched
    rebuilt = resize(_transformer(), structure(small))
    rebuilt.load_state_dict(small.state_dict())
    torch.testing.assert_close(rebuilt(ids, mask), small(ids, mask))


def test_pruning_a_head_equals_masking_it():
    """Removing head h gives the output of the full model with head h's output columns zeroed."""
    model = _transformer()
    small = prune_structured(model, heads=0.25)  # 4 heads -> 3
    masked = prune_structured(model)
    for block, pruned in zip(masked.blocks, small.blocks):
        D = block.attn.head_dim
        kept = {int(c) // D for c in range(4 * D) if any(
            torch.equal(block.attn.out.weight[:, c], pruned.attn.out.weight[:, j]) for j in range(3 * D))}
        for h in set(range(4)) - kept:
            block.attn.out.weight.data[:, h * D : (h + 1) * D] = 0
    ids, mask = _batch()
    torch.testing.assert_close(small(ids, mask), masked(ids, mask), rtol=1e-5, atol=1e-5)


def test_textcnn_channel_pruning():
    torch.manual_seed(0)
    model = build_model(TextCNNConfig(embed_dim=16, num_filters=10, dropout=0.0), SPEC).eval()
    ids, mask = _batch()
    torch.testing.assert_close(prune_structured(model)(ids, mask), model(ids, mask))
    small = prune_structured(model, channels=0.3)
    assert [c.out_channels for c in small.convs] == [7, 7, 7]
    assert small.head.in_features == 21
    rebuilt = resize(build_model(TextCNNConfig(embed_dim=16, num_filters=10, dropout=0.0), SPEC), structure(small)).eval()
    rebuilt.load_state_dict(small.state_dict())
    torch.testing.assert_close(rebuilt(ids, mask), small(ids, mask))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_reports_sparsity(scope):
    model = _transformer()
    pruned = prune_magnitude(model, 0.6, scope)
    report = sparsity(pruned)
    assert report["total"] == pytest.approx(0.6, abs=0.01)
    if scope == "layer":
        assert all(v == pytest.approx(0.6, abs=0.02) for v in report["layers"].values())
    assert sparsity(model)["total"] < 0.01


# ----------------------------------------------------------------------------------------- distillation


def test_distillation_loss():
    model = _transformer()
    ids, mask = _batch()
    labels = torch.tensor([0, 1, 2, 0])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ce = F.cross_entropy(model(ids, mask), labels)
    # the teacher is the student: the KL term is zero, so the loss is alpha * CE
    task = DistillationTask(_transformer(), SPEC.labels, temperature=3.0, alpha=0.3)
    loss, _ = task.loss(model, batch)
    torch.testing.assert_close(loss, 0.3 * ce)
    other = DistillationTask(_transformer(pooling="cls"), SPEC.labels, temperature=2.0, alpha=0.0)
    loss, _ = other.loss(model, batch)
    teacher = other.teacher(ids, mask)
    kl = F.kl_div(F.log_softmax(model(ids, mask) / 2, -1), F.softmax(teacher / 2, -1), reduction="batchmean") * 4
    torch.testing.assert_close(loss, kl)
    with torch.no_grad():  # evaluation reports the hard loss
        torch.testing.assert_close(task.loss(model, batch)[0], ce)


def test_cached_teacher_logits_give_the_same_loss():
    import numpy as np

    from danlu.compress.distill import teacher_logits
    from danlu.data.batching import TextDataset, collate

    rng = np.random.default_rng(0)
    data = TextDataset([rng.integers(7, 50, size=n).astype(np.int32) for n in (3, 9, 5, 7)], np.array([0, 1, 2, 1]), 0)
    teacher, student = _transformer(pooling="cls"), _transformer()
    cached = teacher_logits(teacher, data, batch_size=3)
    batch = collate(data, [2, 0, 3], 0)
    live = DistillationTask(teacher, SPEC.labels, 2.0, 0.5).loss(student, dict(batch))[0]
    fast = DistillationTask(teacher, SPEC.labels, 2.0, 0.5, teacher_logits=cached).loss(student, dict(batch))[0]
    torch.testing.assert_close(fast, live, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compress")
    data = write_csv(tmp / "reviews.csv", make_reviews(300))
    cfg = tiny_config(data, tmp / "run")
    cfg["model"] = {"kind": "transformer", "embed_dim": 32, "num_heads": 4, "num_layers": 1, "intermediate_dim": 64,
                    "dropout": 0.0, "max_positions": 32}
    danlu.train(cfg, overwrite=True)
    return str(tmp / "run")


def test_int8_run_round_trips_with_scorecard(transformer_run, tmp_path):
    out = str(tmp_path / "int8")
    run = compress_run(transformer_run, "int8", out=out, quick=True)
    card = json.loads(open_text(out, "scorecard.json"))
    keys = {r["key"] for r in card["rows"]}
    assert {"size_mb", "parameters", "linear_weights_mb", "latency_b1_p50_ms", "latency_b1_p95_ms", "latency_b32_p50_ms",
            "latency_b32_p95_ms", "throughput_b32", "peak_memory_mb", "accuracy", "macro_f1"} <= keys
    rows = {r["key"]: r for r in card["rows"]}
    assert rows["size_mb"]["after"] < rows["size_mb"]["before"]
    assert rows["linear_weights_mb"]["better_by"] > 3.0
    assert abs(rows["accuracy"]["after"] - rows["accuracy"]["before"]) < 0.1
    assert os.path.getsize(os.path.join(out, "plots", "scorecard.png")) > 1000
    assert "| accuracy |" in open_text(out, "scorecard.md")
    again = load_run(out)  # what evaluate / predict / serve do
    texts = ["很好喜欢", "很差失望退货"]
    assert again.predict(texts) == run.predict(texts)
    assert danlu.evaluate_run(again, os.path.join(os.path.dirname(transformer_run), "reviews.csv"))["accuracy"] > 0.6


def test_pruned_run_reloads_with_new_sizes(transformer_run, tmp_path):
    out = str(tmp_path / "pruned")
    run = compress_run(transformer_run, "prune-50+woq-int4", out=out, quick=True, measure=False)
    record = json.loads(open_text(out, "compression.json"))
    assert [s["kind"] for s in record["steps"]] == ["prune", "finetune", "quantize"]
    assert record["steps"][0]["sizes"]["blocks.0.attn"] == {"num_heads": 2}
    again = load_run(out)
    assert again.model.blocks[0].ffn.down.in_features == 32
    assert isinstance(again.model.blocks[0].ffn.up, QuantLinear)
    ids, mask = _batch(vocab=again.model.embed.num_embeddings)
    torch.testing.assert_close(again.model(ids, mask), run.model(ids, mask))


def test_distill_recipe_from_yaml(transformer_run, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps:\n  - kind: distill\n    student: {kind: textcnn, embed_dim: 8, num_filters: 8}\n"
                      "    epochs: 1\n  - kind: quantize\n    method: dynamic_int8\n")
    out = str(tmp_path / "student")
    compress_run(transformer_run, str(recipe), out=out, quick=True, measure=False)
    again = load_run(out)
    assert again.cfg.model.kind == "textcnn"
    assert again.predict(["很好"])[0]["label"] in again.labels


def test_recipes_parse_and_fail_clearly():
    assert [s["kind"] for s in parse_recipe("prune-ffn-30")] == ["prune", "finetune"]
    assert parse_recipe("prune-ffn-30")[0]["ffn"] == pytest.approx(0.3)
    assert [s["kind"] for s in parse_recipe("distill-textcnn+prune-30+int8")] == [
        "distill", "prune", "finetune", "quantize"]
    with pytest.raises(ConfigError, match="unknown recipe"):
        parse_recipe("int3")
    with pytest.raises(ConfigError, match="kind"):
        parse_recipe([{"kind": "shrink"}])


def test_cli_compress(transformer_run, tmp_path, capsys):
    from danlu.cli import main

    out = str(tmp_path / "cli")
    assert main(["compress", transformer_run, "--recipe", "sparse-50", "--out", out, "--no-scorecard"]) == 0
    assert "run directory" in capsys.readouterr().out
    record = json.loads(open_text(out, "compression.json"))
    assert record["steps"][0]["sparsity"] == pytest.approx(0.5, abs=0.01)
