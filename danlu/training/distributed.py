"""Distributed training from the torchrun environment: one helper for the process group, rank-0 work,
data sharding and the full (unsharded) state of an FSDP model.

The training loop stays the same; under `torchrun` (RANK / WORLD_SIZE / MASTER_ADDR in the environment)
it joins the process group (gloo on CPU, nccl on GPU), wraps the model in DistributedDataParallel or
FSDP2 `fully_shard`, gives each rank its slice of every global batch, and lets only rank 0 log and write.

    torchrun --nproc-per-node 2 -m danlu train configs/seed_lstm.yaml run.dir=runs/ddp

>>> from danlu.training import distributed as dist
>>> dist.world_size(), dist.rank(), dist.is_main()   # outside torchrun
(1, 0, True)
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import gc
import importlib
import os
import weakref
from datetime import timedelta

import torch

MODES = ("auto", "ddp", "fsdp", "none")


def launched():
    """True under torchrun (or any launcher that sets the env:// variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def initialized():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size():
    return torch.distributed.get_world_size() if initialized() else int(os.environ.get("WORLD_SIZE", 1))


def rank():
    return torch.distributed.get_rank() if initialized() else int(os.environ.get("RANK", 0))


def is_main():
    """Only rank 0 logs, saves checkpoints and writes the run directory."""
    return rank() == 0


def restart_count():
    """How many times torchrun (--max-restarts) has restarted this job's workers."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def local_device(device):
    """cuda:LOCAL_RANK for a CUDA run under torchrun (one GPU per process), else `device` as is. (`setup`
    makes it the process's current CUDA device.)"""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def setup(mode="auto", device=None):
    """Join the process group when launched by torchrun; return the effective mode: ddp, fsdp or none.

    The timeout (DANLU_DIST_TIMEOUT seconds, default 60) bounds how long the others wait on a collective
    when a worker dies, so that they exit with an error instead of hanging."""
    from danlu.registry import ConfigError

    if not launched():
        return "none"
    if mode == "none":
        if int(os.environ["WORLD_SIZE"]) > 1:
            raise ConfigError("train.distributed: none, but torchrun started several processes; "
                              "use auto, ddp or fsdp, or launch one process")
        return "none"
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    if not initialized():
        # torch.distributed.nn.functional binds group.WORLD as a default argument when it is imported, and
        # FSDP and torch.distributed.checkpoint import it: imported after the process group exists, it would
        # keep that group alive past `cleanup` (see there). Imported first, its defaults are None.
        importlib.import_module("torch.distributed.nn")  # not `import torch...`: that would make torch local here

        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=float(os.environ.get("DANLU_DIST_TIMEOUT", 60)))
        store = None
        if restart_count():
            # After a torchrun restart the rendezvous store still holds the previous attempt's keys (the dead
            # ranks' addresses); a prefix per attempt keeps the new process group from dialling them.
            store = torch.distributed.PrefixStore(f"danlu/attempt_{restart_count()}", torch.distributed.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                is_master=False, timeout=timeout))
        torch.distributed.init_process_group(backend, timeout=timeout, store=store,
                                             rank=int(os.environ["RANK"]) if store else -1,
                                             world_size=int(os.environ["WORLD_SIZE"]) if store else -1,
                                             device_id=device if backend == "nccl" else None)
        atexit.register(cleanup)
    return "ddp" if mode == "auto" else mode


_meshes = []  # weak references to the device meshes FSDP shards over (`wrap`), for `cleanup`


def cleanup():
    """Destroy the process group that `setup` created (at exit), and with it its backend's threads.

    destroy_process_group() only unregisters the group; the backend is freed, and gloo joins its worker
    threads, when the last reference goes, and FSDP's device mesh holds one (DTensor's caches hold the mesh).
    Left alone, the gloo workers run on into interpreter shutdown; one that then releases a finished
    collective's tensors asks for the GIL, Python 3.11 ends such a thread with pthread_exit, and the forced
    unwind through a noexcept destructor aborts the process ("terminate called without an active
    exception"), which a busy machine makes likely enough to fail runs. So, while the interpreter is whole,
    the meshes let go of the group and a collection frees the sharded modules' cycles: the backend is
    destroyed, and its workers finish and are joined here."""
    if not initialized():
        return
    torch.distributed.destroy_process_group()
    for ref in _meshes:
        mesh = ref()
        if mesh is not None:
            getattr(mesh, "_pg_registry", {}).clear()  # the groups by name, kept for torch.compile
    _meshes.clear()
    gc.collect()


def barrier():
    if initialized():
        torch.distributed.barrier()


def check_batch_size(batch_size):
    from danlu.registry import ConfigError

    world = world_size()
    if batch_size % world:
        raise ConfigError(f"train.batch_size: {batch_size} is the global batch; it must divide by the "
                          f"{world} processes (each takes batch_size / world_size examples a step)")
    return batch_size // world


class DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """torch's DDP, which also answers for its model's public attributes, as FSDP2 (in place) and
    torch.compile's wrapper do: a task reads a model's documented capabilities (CausalLMTask: `lm_head`)
    on the module it calls, whatever wraps the model."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None or name.startswith("_"):
                raise
            return getattr(module, name)


def wrap(model, mode, device):
    """(model the loop keeps, module to call forward on). DDP wraps; FSDP2 shards the model in place:
    each block of an nn.ModuleList is one unit (all-gathered in turn), the root the rest."""
    if mode == "ddp":
        return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size(),))  # one mesh for all units, released by cleanup
        _meshes.append(weakref.ref(mesh))
        for module in list(model.modules()):
            if isinstance(module, torch.nn.ModuleList):
                for block in module:
                    fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, model


def shard_batch(batch):
    """This rank's slice of a global batch, and how many real examples it holds. The union over ranks is
    the whole batch; a short last batch is split as evenly as possible, and a rank left without an
    example computes on one with weight 0 (every rank must take part in each collective)."""
    n, world, r = len(batch["input_ids"] if "input_ids" in batch else batch["pixel_values"]), world_size(), rank()
    start, stop = r * n // world, (r + 1) * n // world
    if stop == start:
        return {k: v[:1] for k, v in batch.items()}, 0
    return {k: v[start:stop] for k, v in batch.items()}, stop - start


def reduce_counts(loss_sum, count, correct, units):
    """Sums over ranks (float64: the loss sums of many ranks keep their digits)."""
    t = torch.tensor([loss_sum, count, correct, units], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    loss_sum, count, correct, units = t.tolist()
    return loss_sum, int(count), int(correct), int(units)


def gradient_sync(module, sync):
    """Skip the gradient all-reduce on accumulation micro-batches (DDP no_sync; FSDP2's switch)."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


# -- full state of a sharded model: the weights in the usual safetensors format, and one-process checkpoints ---


def full_model_state(model):
    """The unsharded state dict, on CPU, on rank 0 ({} elsewhere). Collective: call it on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plain_copy(model):
    """A CPU copy of the model before it is sharded, to hold the gathered weights after training."""
    return copy.deepcopy(model).to("cpu")


def unshard(model, plain, device):
    """Load the full weights of a sharded model into its plain copy on every rank; return the copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    plain.load_state_dict({k: v.cpu() for k, v in state.items()})
    return plain.to(device)


class FullState:
    """Stands in for an FSDP model and its optimizer where danlu needs their full state: `weights()`
    (collective) is a view whose `state_dict()` is the full model state (on rank 0), for best.safetensors;
    `loaders()` returns views whose `load_state_dict()` shards a full state back, to resume a one-process
    or DDP checkpoint (danlu.training.checkpoint.load_checkpoint, single-process optimizer ids) under FSDP.
    FSDP's own checkpoints are sharded (danlu.training.checkpoint.save_sharded)."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def weights(self):
        return _View(full_model_state(self.model))

    def loaders(self):
        shapes = {k: torch.empty(v.shape, device="meta") for k, v in self.model.state_dict().items()}
        return _View(shapes, self._load_model), _View({}, self._load_optimizer)

    def _load_model(self, state, strict=True):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=strict))

    def _load_optimizer(self, state, strict=True):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = {id(p): n for n, p in self.model.named_parameters()}
        names = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        full = {"state": {names[i]: v for i, v in state["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(self.model, self.optimizer, full, options=StateDictOptions(full_state_dict=True))


class _View:
    def __init__(self, state, load=None):
        self.state, self.load = state, load

    def state_dict(self):
        return self.state

    def load_state_dict(self, state, strict=True):
        self.load(state, strict)
