"""danlu.training.allocator: freed blocks of a few MB are reused instead of faulted in again each step."""
import ctypes
import subprocess
import sys

import pytest

STEPS = """
import resource, sys, torch
torch.set_num_threads(1)
from danlu.training.allocator import keep_freed_memory, kept_freed_memory
if sys.argv[1] in ("keep", "keep, then scoped"):
    assert keep_freed_memory()
from danlu.data.spec import DataSpec
from danlu.kernels.lm_loss import lm_head_loss
from danlu.models.gpt import GPT, GPTConfig
torch.manual_seed(0)
model = GPT(GPTConfig(num_layers=2, num_heads=2, embed_dim=128, max_positions=128, positions="learned"),
            DataSpec(vocab_size=8192, num_classes=0, max_length=128))
optimizer = torch.optim.AdamW(model.parameters(), fused=True)
x = torch.randint(0, 8192, (4, 129))
def step():  # logits chunks of 8 MB, activations and gradients of 0.5-4 MB, allocated afresh every step
    loss, _, _ = lm_head_loss(model(x[:, :-1], return_hidden=True), model.lm_head.weight, x[:, 1:])
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
def faults():
    for _ in range(5): step()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10): step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
if "scoped" in sys.argv[1]:  # inside the block, then after it
    with kept_freed_memory() as kept:
        assert kept
        inside = faults()
    print(inside, faults())
else:
    print(faults())
"""


def _glibc():
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
        return sys.platform.startswith("linux")
    except (OSError, AttributeError):
        return False


def page_faults(mode):
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    counts = [int(n) for n in out.stdout.split()]
    return counts[0] if len(counts) == 1 else counts


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_keep_freed_memory_stops_the_page_faults_of_repeated_steps():
    """Ten training steps of a small GPT after five of warm-up: glibc's default maps the large blocks afresh
    each time (tens of thousands of page faults); with keep_freed_memory the heap serves them again."""
    kept, default = page_faults("keep"), page_faults("default")
    # measured: kept 1-3 in most runs, now and then a few 4 MB blocks (1,025-5,124); default 57k-81k
    assert kept < 10_000, kept
    assert default > 30_000 and default > 5 * kept, (default, kept)


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_the_scoped_setting_is_put_back_after_the_block():
    """What Trainer.fit does (train.keep_freed_memory): freed blocks are kept inside the block; after it glibc
    maps large blocks afresh again (at a fixed 128 KB threshold: glibc's dynamic one cannot be restored), and
    a setting made for the whole process before the block stays."""
    inside, after = page_faults("scoped")
    assert inside < 10_000, inside
    assert after > 30_000 and after > 5 * inside, (inside, after)
    inside, after = page_faults("keep, then scoped")
    assert inside < 10_000 and after < 10_000, (inside, after)
