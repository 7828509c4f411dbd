"""torchrun on 2 CPU processes (gloo): the loss curve of DDP and FSDP equals one process's with the same
global batch, checkpoints resume on another number of processes, and a killed worker stops the job (or,
with --max-restarts, the job resumes from its last checkpoint).

Per-step losses come from history rows (train.eval_every=1: a row per optimizer step, the loss reduced
over ranks). The models have no dropout: each rank draws its own dropout masks."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import danlu

from conftest import make_reviews, tiny_config, write_csv

pytestmark = pytest.mark.distributed

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
DDP_TOLERANCE = 1e-5
FSDP_TOLERANCE = 1e-5  # documented in docs/distributed.md: the same gradients, reduced in another order


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = write_csv(root / "reviews.csv", make_reviews(150))  # 120 train examples: the last batch of 16 is short
    cfg = tiny_config(data, root / "unused", train={"epochs": 2, "batch_size": 16, "eval_every": 1, "eval_batches": 1})
    cfg["model"]["dropout"] = 0.0
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return root, path


def torchrun(args, root, timeout=120, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "DANLU_DIST_TIMEOUT": "20"}
    return subprocess.run([*TORCHRUN, *extra, "-m", "danlu", *map(str, args)], cwd=root, env=env, timeout=timeout,
                          capture_output=True, text=True)


def losses(run_dir):
    with open(os.path.join(run_dir, "history.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["train_loss"] for line in f]


def assert_close(a, b, tolerance):
    assert len(a) == len(b), (a, b)
    assert max(abs(x - y) for x, y in zip(a, b)) <= tolerance, list(zip(a, b))


def test_ddp_matches_one_process_and_resumes_on_one(setup):
    root, config = setup
    reference = danlu.train(str(config), f"run.dir={root / 'one'}").path
    full = losses(reference)
    assert len(full) == 16  # 8 steps an epoch
    done = torchrun(["train", config, f"run.dir={root / 'two'}", "train.epochs=1"], root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close(losses(root / "two"), full[:8], DDP_TOLERANCE)
    assert done.stderr.count("epoch 1  train_loss") == 8  # only rank 0 logs
    danlu.train(str(root / "two"), "train.epochs=2", resume=True)  # a 2-process checkpoint on 1 process
    assert_close(losses(root / "two"), full, DDP_TOLERANCE)


def test_one_process_checkpoint_resumes_on_two(setup):
    root, config = setup
    full = losses(root / "one") if (root / "one").exists() else losses(danlu.train(str(config), f"run.dir={root / 'one'}").path)
    danlu.train(str(config), f"run.dir={root / 'half'}", "train.epochs=1")
    done = torchrun(["train", config, f"run.dir={root / 'half'}", "train.epochs=2", "--resume"], root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    assert_close(losses(root / "half"), full, DDP_TOLERANCE)


def test_fsdp_matches_one_process(setup):
    root, config = setup
    mlp = ["model.kind=mlp", "model.embed_dim=16", "model.hidden_dim=16"]
    reference = losses(danlu.train(str(config), f"run.dir={root / 'mlp'}", *mlp).path)
    done = torchrun(["train", config, f"run.dir={root / 'fsdp'}", "train.distributed=fsdp", *mlp], root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close(losses(root / "fsdp"), reference, FSDP_TOLERANCE)
    assert (root / "fsdp" / "model.safetensors").exists()  # the gathered full weights, the usual format
    assert danlu.load(str(root / "fsdp")).predict(["很好"])[0]["label"]


def _worker(pid, rank):
    """The pid of the torchrun worker with this RANK, or None."""
    for child in _children(pid):
        try:
            with open(f"/proc/{child}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return child
        except OSError:
            pass
    return None


def _children(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in map(int, f.read().split()):
                out += [child, *_children(child)]
    return out


def _wait_for(predicate, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_killed_worker_stops_the_job_and_a_restart_resumes(setup):
    """Killing one worker ends the job with torchrun's report of the failed rank, well before the end of
    training; a new launch with --resume continues from the last checkpoint."""
    root, config = setup
    log = open(root / "kill.log", "w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "DANLU_DIST_TIMEOUT": "20"}
    job = subprocess.Popen([*TORCHRUN, "-m", "danlu", "train", str(config), f"run.dir={root / 'killed'}",
                            "train.epochs=400", "train.eval_every=0", "train.checkpoint_every=2"],
                           cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        checkpoint = root / "killed" / "checkpoints" / "last.safetensors"
        assert _wait_for(checkpoint.exists, 60), "no checkpoint"
        os.kill(_worker(job.pid, 1), signal.SIGKILL)
        killed = time.monotonic()
        job.wait(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        if job.poll() is None:
            job.kill()
    text = (root / "kill.log").read_text()
    assert job.returncode != 0
    assert "ChildFailedError" in text and "SIGKILL" in text, text[-3000:]
    again = torchrun(["train", config, f"run.dir={root / 'killed'}", "train.epochs=1", "--resume"], root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr


def test_max_restarts_resumes_from_the_last_checkpoint(setup):
    """With torchrun --max-restarts, a killed worker restarts the job, which resumes from its checkpoint
    and finishes."""
    root, config = setup
    log = open(root / "restart.log", "w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "DANLU_DIST_TIMEOUT": "20"}
    job = subprocess.Popen([*TORCHRUN, "--max-restarts", "1", "-m", "danlu", "train", str(config),
                            f"run.dir={root / 'restarted'}", "train.epochs=40", "train.eval_every=0",
                            "train.checkpoint_every=2"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert _wait_for((root / "restarted" / "checkpoints" / "last.safetensors").exists, 60), "no checkpoint"
        os.kill(_worker(job.pid, 1), signal.SIGKILL)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    text = (root / "restart.log").read_text()
    assert job.returncode == 0, text[-3000:]
    assert "resumed from" in text and (root / "restarted" / "model.safetensors").exists()
