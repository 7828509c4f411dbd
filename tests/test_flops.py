"""danlu.training.flops: the FLOPs a training step does, so that MFU cannot pass 100% for LoRA or frozen weights."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from danlu.config import TrainConfig
from danlu.data.spec import DataSpec
from danlu.models.gpt import GPT, GPTConfig
from danlu.models.lora import apply_lora
from danlu.training.flops import measure_peak_flops, training_flops_per_token
from danlu.training.tasks import CausalLMTask
from danlu.training.trainer import Trainer

T = 16


def tiny_gpt(**config):
    torch.manual_seed(0)
    return GPT(GPTConfig(num_layers=2, num_heads=2, embed_dim=32, max_positions=T, positions="learned", **config),
               DataSpec(vocab_size=64, num_classes=0, max_length=T))


def head_only():
    model = tiny_gpt(tie_embeddings=False)
    for p in model.parameters():
        p.requires_grad_(False)
    model.head.weight.requires_grad_(True)
    return model


def counted_flops_per_token(model, batch_size=2):
    """torch's own count of one forward and backward pass. Under bf16 autocast on CPU the attention of a short
    window runs as plain batched matmuls (danlu.models.blocks), which the counter sees too."""
    ids = torch.randint(0, 64, (batch_size, T + 1), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = CausalLMTask().loss(model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        loss.backward()
    return counter.get_total_flops() / (batch_size * T)


@pytest.mark.parametrize("make", [tiny_gpt, lambda: apply_lora(tiny_gpt(), r=4), head_only],
                         ids=["full", "lora", "head only"])
def test_flops_per_token_are_those_the_step_does(make):
    model = make()
    assert training_flops_per_token(model, T) == counted_flops_per_token(model)


def test_lora_and_frozen_models_count_fewer_flops_than_full_training():
    full, lora, head = tiny_gpt(), apply_lora(tiny_gpt(), r=4), head_only()
    weights = sum(m.weight.numel() for m in full.modules() if isinstance(m, torch.nn.Linear))
    assert training_flops_per_token(full, T) == 6 * weights + 12 * 2 * 32 * T  # PaLM's 6 N + 12 L C T
    assert training_flops_per_token(head, T) < training_flops_per_token(lora, T) < training_flops_per_token(full, T)


class Windows:
    """Random token windows with next-token labels, as a pretraining corpus hands them to the Trainer."""

    def __init__(self, n=48):
        self.ids = torch.randint(0, 64, (n, T + 1), generator=torch.Generator().manual_seed(1))

    def num_batches(self, batch_size):
        return -(-len(self.ids) // batch_size)

    def batches(self, batch_size, *, epoch=0, seed=0, skip=0, shuffle=True):
        for start in range(skip * batch_size, len(self.ids), batch_size):
            window = self.ids[start:start + batch_size]
            yield {"input_ids": window[:, :-1], "labels": window[:, 1:]}


def test_mfu_of_a_lora_fine_tune_is_at_most_one(monkeypatch):
    import danlu.training.trainer as trainer_module

    measured = []  # the dtypes the peak was measured in: the one the matmuls run in

    def peak(device, dtype):
        measured.append(dtype)
        return measure_peak_flops(device, dtype)

    monkeypatch.setattr(trainer_module, "measure_peak_flops", peak)
    model = apply_lora(tiny_gpt(), r=4)
    trainer = Trainer(model, CausalLMTask(), TrainConfig(epochs=2, batch_size=8, lr=1e-2, device="cpu", precision="auto"))
    history = trainer.fit(Windows(), Windows(16))
    assert measured == [trainer_module.autocast_dtype(trainer.device, "auto") or torch.float32]
    assert trainer.peak_flops > 0
    assert all(0 < row["mfu"] <= 1 for row in history), history.series("mfu")
    flops = training_flops_per_token(model, T)
    assert history[-1]["mfu"] == pytest.approx(history[-1]["tokens_per_s"] * flops / trainer.peak_flops)
