"""Image models through the Trainer's other paths: torchrun on 2 CPU processes (DDP and FSDP give one
process's loss curve, and a 2-process checkpoint resumes on one) and `train.compile`.

Tiny 12x12 bar images (tests/test_vision.py). Under torchrun no dropout, batch normalisation or augmentation: with
those each rank's share of a batch would give other statistics or random draws than one process's."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from test_distributed import DDP_TOLERANCE, FSDP_TOLERANCE, assert_close, assert_same_run, losses, torchrun
from test_vision import image_config, write_folder

from danlu.files import load_tensors
from danlu.jobs.train import train

torch.set_num_threads(1)

CNN = {"channels": [4, 8], "blocks": 1, "norm": "none", "dropout": 0.0}
VIT = {"dropout": 0.0}
EVERY_STEP = {"epochs": 2, "batch_size": 8, "eval_every": 1, "eval_batches": 1, "schedule": "constant"}


@pytest.fixture(scope="module")
def bars(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("bars"), n=12)  # 12 train images: a batch of 8 and one of 4


def config_file(path, bars, kind, model, **train_keys):
    cfg = image_config(bars, path.parent / "unused", kind=kind, model=model, train={**EVERY_STEP, **train_keys})
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.mark.distributed
def test_cnn_on_two_processes_matches_one_and_resumes_on_one(tmp_path, bars):
    config = config_file(tmp_path / "cnn.yaml", bars, "cnn", CNN)
    reference = train(str(config), f"run.dir={tmp_path / 'one'}").path
    full = losses(reference)
    assert len(full) == 4  # 2 steps an epoch, the second on a short batch of 4 (2 per rank)
    done = torchrun(["train", config, f"run.dir={tmp_path / 'ddp'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close(losses(tmp_path / "ddp"), full, DDP_TOLERANCE)
    assert max_difference(tmp_path / "ddp", reference) <= DDP_TOLERANCE
    done = torchrun(["train", config, f"run.dir={tmp_path / 'half'}", "train.epochs=1"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    train(str(tmp_path / "half"), "train.epochs=2", resume=True)  # a 2-process checkpoint on 1 process
    assert_close(losses(tmp_path / "half"), full, DDP_TOLERANCE)
    assert max_difference(tmp_path / "half", reference) <= DDP_TOLERANCE


@pytest.mark.distributed
def test_vit_on_two_processes_matches_one(tmp_path, bars):
    """The losses agree to 1e-5; the weights measured 1.9e-5 apart, hence 1e-4: Adam divides by sqrt(v),
    so on weights whose gradient is near 0 the rounding of the 2-process reduction is magnified (lr 0.01)."""
    config = config_file(tmp_path / "vit.yaml", bars, "vit", VIT)
    reference = train(str(config), f"run.dir={tmp_path / 'one'}").path
    done = torchrun(["train", config, f"run.dir={tmp_path / 'ddp'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close(losses(tmp_path / "ddp"), losses(reference), DDP_TOLERANCE)
    assert max_difference(tmp_path / "ddp", reference) <= 1e-4


def max_difference(run_dir, reference):
    """The largest difference between the final weights of two runs (their model.safetensors)."""
    a, b = (load_tensors(str(Path(d) / "model.safetensors"))[0] for d in (run_dir, reference))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.distributed
def test_cnn_under_fsdp_matches_one_process(tmp_path, bars):
    config = config_file(tmp_path / "cnn.yaml", bars, "cnn", CNN)
    reference = train(str(config), f"run.dir={tmp_path / 'one'}").path
    done = torchrun(["train", config, f"run.dir={tmp_path / 'fsdp'}", "train.distributed=fsdp"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(tmp_path / "fsdp", reference, FSDP_TOLERANCE)


@pytest.mark.parametrize("model", [{**CNN, "norm": "batch"}, {"size": "guide", "channels": [4], "hidden_dim": 8}],
                         ids=["residual", "guide"])
def test_cnn_with_compile_matches_eager_without_graph_breaks(tmp_path, bars, model):
    histories = {}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for compile_ in (False, True):
        cfg = image_config(bars, tmp_path / f"run_{compile_}", model=model, train={**EVERY_STEP, "compile": compile_})
        train(cfg)
        lines = (tmp_path / f"run_{compile_}" / "history.jsonl").read_text().splitlines()
        histories[compile_] = [json.loads(line) for line in lines]
    breaks = list(torch._dynamo.utils.counters["graph_break"])
    assert not breaks, breaks
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    assert len(histories[True]) == len(histories[False]) == 4
    for eager, compiled in zip(histories[False], histories[True], strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key
