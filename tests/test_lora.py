"""LoRA by composition: apply_lora / merge_lora over the transformer families, adapter-only state."""
import pytest
import torch

from danlu.data.spec import DataSpec
from danlu.models import build_model
from danlu.models.bert import BERTConfig
from danlu.models.gpt import GPTConfig
from danlu.models.lora import LoRALinear, apply_lora, count_trainable, lora_state_dict, merge_lora
from danlu.registry import ConfigError

CONFIGS = {
    "gpt": (GPTConfig(embed_dim=32, num_heads=2, num_layers=2, max_positions=32), 0),
    "llama": (GPTConfig(embed_dim=32, num_heads=4, num_kv_heads=2, num_layers=2, positions="rope", norm="rmsnorm",
                        mlp="swiglu", bias=False), 0),
    "bert": (BERTConfig(embed_dim=32, num_heads=2, num_layers=2, max_positions=32, dropout=0.0), 3),
}


def tiny(name):
    config, classes = CONFIGS[name]
    torch.manual_seed(0)
    return build_model(config, DataSpec(vocab_size=50, num_classes=classes, max_length=32)).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lora_starts_equal_trains_little_and_merges_exactly(name):
    model = tiny(name)
    ids = torch.randint(5, 50, (2, 7))
    before = model(ids)
    apply_lora(model, r=4, alpha=8, trainable=("head",) if CONFIGS[name][1] else ())
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * 2  # qkv, out, up, down x 2 layers
    assert torch.allclose(model(ids), before)  # B starts at zero
    trainable, total = count_trainable(model)
    assert 0 < trainable < total
    assert all(p.requires_grad == (".lora_" in n or n.startswith("head.")) for n, p in model.named_parameters())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.1)
    adapted = model(ids)
    assert not torch.allclose(adapted, before)
    adapter = lora_state_dict(model, extra=("head",))
    assert adapter and all(".lora_" in k or k.startswith("head.") for k in adapter)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(model(ids), adapted, atol=1e-5)


def test_targets_are_patterns_and_must_match():
    model = apply_lora(tiny("gpt"), targets=["blocks.0.attn.*"], r=2)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["blocks.0.attn.qkv", "blocks.0.attn.out"]
    with pytest.raises(ConfigError, match="match no linear layer"):
        apply_lora(tiny("gpt"), targets=["*.nothing"])


def test_lora_gradients_reach_only_adapters():
    model = apply_lora(tiny("llama"), r=2)
    model.train()
    model(torch.randint(0, 50, (2, 5))).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
