"""Unit tests of the Transformer families (gpt, bert, transformer) and TextCNN, with tiny configs."""
import dataclasses

import pytest
import torch

from danlu import config as config_mod
from danlu.data.spec import DataSpec
from danlu.models import MODELS, build_model
from danlu.models.bert import BERT, BERTConfig
from danlu.models.blocks import Attention
from danlu.models.gpt import GPT, SIZE_PRESETS, GPTConfig
from danlu.models.shapes import TransformerShape
from danlu.models.textcnn import TextCNN, TextCNNConfig
from danlu.models.transformer import TransformerClassifier, TransformerConfig
from danlu.registry import ConfigError
from danlu.schema import field_docs

torch.set_num_threads(1)

VOCAB = 50
LM_SPEC = DataSpec(vocab_size=VOCAB, pad_id=0, num_classes=0, max_length=32)
CLS_SPEC = DataSpec(vocab_size=VOCAB, pad_id=0, num_classes=3, max_length=32)
TINY_GPT = GPTConfig(**SIZE_PRESETS["tiny"])
LLAMA_TINY = GPTConfig(
    num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, intermediate_dim=96, positions="rope",
    norm="rmsnorm", mlp="swiglu", bias=False, rope_theta=100000.0,
)


def batch(lengths, total, left=False, seed=0):
    """Random token ids (1..VOCAB-1) with padding id 0 and the matching bool mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.bool)
    for row, n in enumerate(lengths):
        if left:
            mask[row, total - n :] = True
        else:
            mask[row, :n] = True
    return ids.masked_fill(~mask, 0), mask


def build(config, spec, seed=0):
    torch.manual_seed(seed)
    return MODELS[config.kind][1](config, spec).eval()


@pytest.mark.parametrize("config", [TINY_GPT, LLAMA_TINY], ids=["gpt2", "llama"])
def test_gpt_is_causal(config):
    model = build(config, LM_SPEC)
    ids, _ = batch([10, 10], 10)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] % (VOCAB - 1)) + 1
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert a.shape == (2, 10, VOCAB)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("config", [TINY_GPT, LLAMA_TINY], ids=["gpt2", "llama"])
def test_gpt_kv_cache_matches_full_forward_with_left_padding(config):
    model = build(config, LM_SPEC)
    ids, mask = batch([9, 5, 2], 9, left=True)
    with torch.no_grad():
        full = model(ids, mask)  # (B, 9, V)
        cache = model.new_cache(3, 9)
        steps = [model(ids[:, :4], mask[:, :4], cache=cache)]  # prompt of 4 slots, then one by one
        steps += [model(ids[:, t : t + 1], mask[:, t : t + 1], cache=cache) for t in range(4, 9)]
    cached = torch.cat(steps, dim=1)
    assert cache.length == 9
    torch.testing.assert_close(cached[mask], full[mask], atol=1e-5, rtol=1e-5)
    # Left padding changes nothing for the real tokens: each row equals its unpadded forward.
    with torch.no_grad():
        alone = model(ids[1:2, 4:])  # row 1 without its 4 pads
    torch.testing.assert_close(full[1, 4:], alone[0], atol=1e-5, rtol=1e-5)


def test_gpt_generate_greedy_matches_stepwise_argmax():
    model = build(LLAMA_TINY, LM_SPEC)
    ids, mask = batch([6, 3], 6, left=True)
    new = model.generate(ids, mask, max_new_tokens=4)
    assert new.shape == (2, 4)
    row = ids[1:2, 3:]  # row 1 unpadded, extended greedily without a cache
    with torch.no_grad():
        for _ in range(4):
            row = torch.cat([row, model(row)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert new[1].tolist() == row[0, 3:].tolist()


@pytest.mark.parametrize("config", [TINY_GPT, LLAMA_TINY], ids=["gpt2", "llama"])
def test_gpt_return_hidden_gives_what_the_head_maps_to_logits(config):
    """forward(..., return_hidden=True) is the head's input: lm_head turns it into forward's logits."""
    model = build(config, LM_SPEC)
    ids, mask = batch([9, 5], 9, left=True)
    with torch.no_grad():
        hidden = model(ids, mask, return_hidden=True)
        logits = model(ids, mask)
    assert hidden.shape == (2, 9, config.embed_dim)
    assert model.lm_head is model.head
    torch.testing.assert_close(hidden @ model.lm_head.weight.t(), logits, rtol=0, atol=0)
    assert build(TINY_GPT, CLS_SPEC).lm_head is None  # a classifier's head takes pooled states
    from danlu.models.lora import apply_lora

    assert apply_lora(model, targets=["head"], r=2).lm_head is None  # not one plain linear map any more


def test_causal_lm_task_trains_a_gpt_through_the_fused_loss():
    from danlu.training.tasks import CausalLMTask, Counted

    model = build(TINY_GPT, LM_SPEC).train()
    ids, _ = batch([12, 12], 12)
    labels = torch.roll(ids, -1, 1)
    task = CausalLMTask()
    loss, out = task.loss(model, {"input_ids": ids, "labels": labels})
    assert isinstance(out, Counted)  # no logits: the loss came from the hidden states
    with torch.no_grad():
        ref_loss, logits = task.loss(model, {"input_ids": ids, "labels": labels})  # no grad: the plain path
    torch.testing.assert_close(loss.detach(), ref_loss)
    assert task.counts(out, {"input_ids": ids, "labels": labels}) == task.counts(logits, {"input_ids": ids, "labels": labels})
    from danlu.models import compile_model

    assert compile_model(model).lm_head is model.head  # train.compile's module answers for the model: the same path


def test_gqa_shapes_and_parameter_count():
    attn = Attention(64, num_heads=8, num_kv_heads=2, bias=False, causal=True)
    assert attn.qkv.weight.shape == ((8 + 2 * 2) * 8, 64)
    assert attn(torch.randn(2, 5, 64)).shape == (2, 5, 64)
    model = build(LLAMA_TINY, LM_SPEC)
    cache = model.new_cache(2, 8)
    assert cache.keys.shape == (2, 2, 2, 8, 16)  # (layers, B, kv heads, S, head_dim)
    assert model.head.weight is model.embed.weight
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_gpt_sequence_classifier_reads_last_real_token():
    model = build(TINY_GPT, CLS_SPEC)
    ids, mask = batch([7, 4], 7)
    with torch.no_grad():
        logits = model(ids, mask)
        alone = model(ids[1:2, :4], mask[1:2, :4])
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits[1], alone[0], atol=1e-5, rtol=1e-5)


def test_gpt_mean_pooling_ignores_padding():
    model = build(dataclasses.replace(TINY_GPT, pooling="mean"), CLS_SPEC)
    ids, mask = batch([7, 4], 7)
    seen = []
    model.norm.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        logits = model(ids, mask)
        alone = model(ids[1:2, :4], mask[1:2, :4])
    torch.testing.assert_close(logits[1], alone[0], atol=1e-5, rtol=1e-5)  # padding changes nothing
    torch.testing.assert_close(alone[0], model.head(seen[1].mean(1))[0], atol=1e-5, rtol=1e-5)  # the states' mean
    with pytest.raises(ConfigError, match="model.pooling: unknown value 'cls'; expected one of: last, mean"):
        config_mod.load({"model": {**dataclasses.asdict(TINY_GPT), "pooling": "cls"}})  # checked at load


def test_bert_mlm_and_classifier_shapes():
    config = BERTConfig(num_layers=2, embed_dim=32, num_heads=2)
    ids, mask = batch([8, 5], 8)
    mlm = build(config, LM_SPEC)
    assert mlm(ids, mask).shape == (2, 8, VOCAB)
    assert mlm.encode(ids, mask).shape == (2, 8, 32)
    assert mlm.mlm.decoder.weight is mlm.embed.weight
    for pooling in ("cls", "mean"):
        model = build(dataclasses.replace(config, pooling=pooling), CLS_SPEC)
        types = torch.zeros_like(ids)
        assert model(ids, mask, types).shape == (2, 3)
    with torch.no_grad():  # mean pooling ignores padding
        padded = model(ids, mask)[1]
        alone = model(ids[1:2, :5], mask[1:2, :5])[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_textcnn_ignores_padding():
    model = build(TextCNNConfig(embed_dim=16, num_filters=8), CLS_SPEC)
    ids, mask = batch([6, 2, 4], 6)  # row 1 is shorter than the widest kernel
    more_ids = torch.cat([ids, torch.zeros(3, 5, dtype=ids.dtype)], dim=1)
    more_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        a, b = model(ids, mask), model(more_ids, more_mask)
        short = model(ids[1:2, :2], mask[1:2, :2])  # a batch shorter than every kernel
    assert a.shape == (3, 3)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[1], short[0])


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_transformer_classifier_padding_invariance(positions, pooling):
    config = TransformerConfig(embed_dim=32, num_heads=2, positions=positions, pooling=pooling)
    model = build(config, CLS_SPEC)
    ids, mask = batch([5, 3], 5)
    more_ids = torch.cat([ids, torch.zeros(2, 4, dtype=ids.dtype)], dim=1)
    more_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        a, b = model(ids, mask), model(more_ids, more_mask)
    assert a.shape == (2, 3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["textcnn", "transformer", "gpt", "bert"])
def test_registry_builds_and_trains_one_step(kind):
    config = MODELS[kind][0](**({} if kind == "textcnn" else dict(embed_dim=32, num_heads=2, num_layers=1)))
    model = build_model(config, CLS_SPEC).train()
    ids, mask = batch([6, 4], 6)
    loss = torch.nn.functional.cross_entropy(model(ids, mask), torch.tensor([0, 2]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.positions"):
        config_mod.load({"model": {"kind": "gpt", "positions": "alibi"}})
    with pytest.raises(ConfigError, match="model.num_kv_heads"):
        GPTConfig(num_heads=6, num_kv_heads=4)  # a rule across fields: the dataclass checks it itself
    with pytest.raises(ConfigError, match="model.pooling"):
        config_mod.load({"model": {"kind": "transformer", "pooling": "max"}})
    assert isinstance(build(TINY_GPT, LM_SPEC), GPT)
    assert isinstance(build(BERTConfig(embed_dim=32, num_heads=2, num_layers=1), LM_SPEC), BERT)
    assert isinstance(build(TextCNNConfig(), CLS_SPEC), TextCNN)
    assert isinstance(build(TransformerConfig(), CLS_SPEC), TransformerClassifier)


@pytest.mark.parametrize("kind", ["gpt", "bert", "transformer", "seq2seq", "vit"])
def test_transformer_families_share_one_shape(kind):
    """Each family keeps its own defaults for the shared fields; the rule across them and the sizes derived
    from them are TransformerShape's, and so is the help text of the fields a family does not document."""
    cls = MODELS[kind][0]
    assert issubclass(cls, TransformerShape) and cls().kind == kind
    assert field_docs(cls)["intermediate_dim"].startswith("Feed-forward width")
    config = cls(embed_dim=48, num_heads=4, intermediate_dim=0)
    assert (config.head_dim, config.kv_heads, config.ffn_dim) == (12, 4, 192)
    with pytest.raises(ConfigError, match=r"model.embed_dim \(30\) must be divisible by model.num_heads \(4\)"):
        cls(embed_dim=30, num_heads=4)
