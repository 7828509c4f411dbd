"""torchrun on 2 CPU processes (gloo): the loss curve of DDP and FSDP equals one process's with the same
global batch, checkpoints (FSDP's sharded ones included) resume on another number of processes, and a killed
worker stops the job (or, with --max-restarts, the job resumes from its last checkpoint).

Per-step losses come from history rows (train.eval_every=1: a row per optimizer step, the loss reduced
over ranks). The models have no dropout: each rank draws its own dropout masks."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

import danlu
from danlu.files import load_tensors
from danlu.training.checkpoint import last_checkpoint

from conftest import make_reviews, tiny_config, write_csv

pytestmark = pytest.mark.distributed

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
DDP_TOLERANCE = 1e-5
FSDP_TOLERANCE = 1e-5  # documented in docs/distributed.md: the same gradients, reduced in another order
MLP = ["model.kind=mlp", "model.embed_dim=16", "model.hidden_dim=16"]


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


def assert_same_run(run_dir, reference, tolerance):
    """The same loss curve and final weights (model.safetensors), each within `tolerance`."""
    assert_close(losses(run_dir), losses(reference), tolerance)
    a, b = (load_tensors(os.path.join(d, "model.safetensors"))[0] for d in (run_dir, reference))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= tolerance


def mlp_run(root, config, name, *args):
    """The finished run `name` (one process, or FSDP on 2 with "fsdp"), started if an earlier test did not."""
    if not (root / name / "model.safetensors").exists():
        if name.startswith("fsdp"):
            done = torchrun(["train", config, f"run.dir={root / name}", "train.distributed=fsdp", *MLP, *args], root)
            assert done.returncode == 0, done.stderr[-3000:]
        else:
            danlu.train(str(config), f"run.dir={root / name}", *MLP, *args)
    return root / name


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
    reference = losses(mlp_run(root, config, "mlp"))
    assert_close(losses(mlp_run(root, config, "fsdp")), reference, FSDP_TOLERANCE)
    assert (root / "fsdp" / "model.safetensors").exists()  # the gathered full weights, the usual format
    assert danlu.load(str(root / "fsdp")).predict(["很好"])[0]["label"]


def test_fsdp_sharded_checkpoint_resumes_on_one_and_on_two(setup):
    """Under FSDP each rank writes its shards (torch.distributed.checkpoint, safetensors, no pickled
    metadata); the checkpoint resumes on 2 processes and on 1 without torchrun, as the uninterrupted run."""
    root, config = setup
    full = mlp_run(root, config, "fsdp")
    half = mlp_run(root, config, "fsdp_half", "train.epochs=1")
    last = half / "checkpoints" / "last"
    assert sorted(os.listdir(last)) == ["shards", "state.safetensors"]
    assert sorted(os.listdir(last / "shards")) == [f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]
    assert not (half / "checkpoints" / "last.safetensors").exists()
    one = root / "fsdp_on_one"
    shutil.copytree(half, one)
    danlu.train(str(one), f"run.dir={one}", "train.epochs=2", resume=True)
    assert_same_run(one, full, FSDP_TOLERANCE)
    assert sorted(os.listdir(one / "checkpoints")) == ["best.safetensors", "last.safetensors"]  # one format at a time
    done = torchrun(["train", half, "train.epochs=2", "--resume"], root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    assert_same_run(half, full, FSDP_TOLERANCE)


def test_one_process_checkpoint_resumes_under_fsdp(setup):
    root, config = setup
    reference = mlp_run(root, config, "mlp")
    danlu.train(str(config), f"run.dir={root / 'mlp_half'}", "train.epochs=1", *MLP)
    done = torchrun(["train", root / "mlp_half", "train.epochs=2", "train.distributed=fsdp", "--resume"], root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    assert_same_run(root / "mlp_half", reference, FSDP_TOLERANCE)
    assert (root / "mlp_half" / "checkpoints" / "last" / "shards").is_dir()


EXIT_SCRIPT = """
import os, sys
import danlu
from danlu.training import distributed as dist

def threads():
    return [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]

danlu.train(*sys.argv[1:])
before = threads()
dist.cleanup()  # what runs at exit
print(f"rank {dist.rank()} before {before} after {threads()}", file=sys.stderr, flush=True)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names from /proc (Linux)")
def test_fsdp_exit_leaves_no_gloo_thread(setup):
    """At exit the process group is destroyed and its gloo backend freed, FSDP's mesh notwithstanding: no
    gloo worker is left to release a collective's tensors (and ask for the GIL) while the interpreter shuts
    down, which aborted a rank now and then on a busy machine."""
    root, config = setup
    script = root / "exit_threads.py"
    script.write_text(EXIT_SCRIPT, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "DANLU_DIST_TIMEOUT": "20"}
    done = subprocess.run([*TORCHRUN, str(script), str(config), f"run.dir={root / 'fsdp_exit'}", "train.epochs=1",
                           "train.distributed=fsdp", *MLP], cwd=root, env=env, timeout=120, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2, done.stderr[-3000:]
    for line in lines:
        before, after = line.split(" before ")[1].split(" after ")
        assert "gloo" in before and "gloo" not in after, line


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    """A sharded checkpoint counts once renamed into place (last.tmp/ never); a crash between the two renames
    of danlu.training.checkpoint._replace_folder leaves last.old/, which is used."""
    def write(path, mtime):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        os.utime(path, (mtime, mtime))

    assert last_checkpoint(tmp_path) is None
    write(tmp_path / "last.tmp" / "state.safetensors", 3)
    assert last_checkpoint(tmp_path) is None
    write(tmp_path / "last.old" / "state.safetensors", 1)
    assert last_checkpoint(tmp_path) == str(tmp_path / "last.old")
    write(tmp_path / "last.safetensors", 2)
    assert last_checkpoint(tmp_path) == str(tmp_path / "last.safetensors")
    write(tmp_path / "last" / "state.safetensors", 4)
    assert last_checkpoint(tmp_path) == str(tmp_path / "last")


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


def test_gpt_pretraining_on_two_processes_matches_one(tmp_path):
    """`danlu pretrain` under torchrun: a GPT's loss curve (the task's fused loss, kernels.lm_head_loss)
    equals one process's with DDP and with FSDP."""
    from test_pretrain import lm_config, write_corpus

    from danlu.jobs.pretrain import pretrain

    corpus = write_corpus(tmp_path / "corpus.txt", lines=400)
    cfg = lm_config(corpus, tmp_path / "unused", max_steps=6, eval_every=1, eval_batches=1, batch_size=8)
    cfg["model"]["dropout"] = 0.0
    config = tmp_path / "gpt.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    reference = losses(pretrain(str(config), f"run.dir={tmp_path / 'one'}").path)
    assert len(reference) == 6
    for mode in ("ddp", "fsdp"):
        done = torchrun(["pretrain", config, f"run.dir={tmp_path / mode}", f"train.distributed={mode}"], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert_close(losses(tmp_path / mode), reference, FSDP_TOLERANCE)
    # a sharded checkpoint of tied weights (embedding = output layer) resumes on one process
    done = torchrun(["pretrain", config, f"run.dir={tmp_path / 'half'}", "train.distributed=fsdp", "train.max_steps=3"],
                    tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "half" / "checkpoints" / "last" / "shards").is_dir()
    pretrain(str(tmp_path / "half"), "train.max_steps=6", resume=True)
    assert_close(losses(tmp_path / "half"), reference, FSDP_TOLERANCE)


FUSED_LOSS = """
import copy, torch
from danlu.data.spec import DataSpec
from danlu.models.gpt import GPT, SIZE_PRESETS, GPTConfig
from danlu.training import distributed as dist
from danlu.training.tasks import CausalLMTask, Counted

torch.set_num_threads(1)
dist.setup("ddp", torch.device("cpu"))
rank = dist.rank()
ids = torch.randint(0, 50, (4, 13), generator=torch.Generator().manual_seed(1))
batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
for mode in ("ddp", "fsdp"):
    for tie in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**SIZE_PRESETS["tiny"], tie_embeddings=tie), DataSpec(vocab_size=50, max_length=16))
        reference = copy.deepcopy(model)
        CausalLMTask().loss(reference, dict(batch))[0].backward()  # one process, the whole batch
        model, wrapped = dist.wrap(model.train(), mode, torch.device("cpu"))
        loss, out = CausalLMTask().loss(wrapped, {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()})
        assert isinstance(out, Counted), (mode, tie, type(out))  # the fused loss, through the wrapper's forward
        loss.backward()  # as many labels on each rank: the mean over ranks is the whole batch's gradient
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            torch.testing.assert_close(grad, q.grad, rtol=1e-5, atol=1e-6, msg=f"{mode} tie={tie} {name}")
        print("same gradients", mode, "tied" if tie else "untied", flush=True)
dist.cleanup()
"""


def test_causal_lm_fused_loss_gives_one_process_gradients_under_ddp_and_fsdp(tmp_path):
    """CausalLMTask takes the loss from the hidden states the wrapper's forward returns and the head's weight
    read after it (DDP: hooks on the parameters; FSDP2: the root's gathered weights), tied or not: the
    gradients are one process's on the whole batch."""
    script = tmp_path / "fused_loss.py"
    script.write_text(FUSED_LOSS, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "DANLU_DIST_TIMEOUT": "20"}
    done = subprocess.run([*TORCHRUN, str(script)], cwd=tmp_path, env=env, timeout=180, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("same gradients") == 2 * 4, done.stdout

