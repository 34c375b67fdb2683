"""Several processes with ``torchrun``: process-group set-up, sharding, exact merges.

Launch: ``torchrun --nproc_per_node=N ...`` (and ``--nnodes``/``--rdzv-endpoint`` across
nodes). Backend: NCCL when the run's device is CUDA, gloo on CPU.

- Statistics: each rank reads a disjoint shard (``ShardSampler``: no padding duplicates) and
  the per-site moments (count, mean, centred second moment, label sums) are gathered
  (``gather_state``) and folded with Chan's merge in rank order (``real_stats.merge_moments``), so
  every rank ends with the same RealStats as one process over all the data, to rounding.
- Recover: class-batches are dealt round-robin (``shard_rounds``); after every round
  ``merge_emu`` folds all ranks' finished batches into every rank's EMU mean, so each rank
  matches against the running mean of all finished batches.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .errors import ConfigError

__all__ = ["DistInfo", "ShardSampler", "barrier", "gather", "gather_objects", "gather_state", "info", "init",
           "is_distributed", "merge_emu", "shard_loader", "shard_rounds", "shutdown"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, local rank (GPU index), device, backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def info(device=None) -> DistInfo:
    """This process's DistInfo (rank 0 of 1 outside a process group)."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo(0, 1, 0, torch.device(device or "cpu"), None)
    backend = dist.get_backend()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, torch.device(device), backend)


def init(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a no-op returning rank 0 of 1 when not launched
    by torchrun, or when the group exists already.

    device "cuda" (default when CUDA is available) uses NCCL on GPU LOCAL_RANK; "cpu" uses gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return info(device)
    if not launched_by_torchrun():
        return info(device)
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run one process without torchrun")
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for but CUDA is not available: pass --device cpu (gloo)")
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s): lower --nproc_per_node")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return info(torch.device("cuda", local))
    dist.init_process_group("gloo")
    return info(torch.device("cpu"))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Collectives run on the current GPU under NCCL, on the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """all_gather of equal-shape tensors, returned on the tensor's device in rank order
    (just ``[tensor]`` outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [tensor]
    home = tensor.device
    tensor = tensor.to(_comm_device()).contiguous()
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return [t.to(home) for t in out]


def gather_objects(obj) -> list:
    """Every rank's picklable ``obj`` in rank order, through one ``all_gather_object`` (just
    ``[obj]`` outside a process group). For small objects: it pickles them."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --- sharding ------------------------------------------------------------------------------

class ShardSampler(Sampler[int]):
    """Indices rank, rank + W, rank + 2W, ... of range(n): every index on exactly one rank and
    no padding duplicates (DistributedSampler repeats indices to even out shards, which would
    count those images twice in the statistics)."""

    def __init__(self, length: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside [0, {world_size})")
        self.length, self.rank, self.world_size = int(length), rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def shard_loader(loader, rank: int | None = None, world_size: int | None = None) -> DataLoader:
    """This rank's shard of a DataLoader (a ShardSampler, same dataset, batch size, workers,
    worker_init_fn, collate function), in the dataset's order. A loader already sharded by a ShardSampler or
    DistributedSampler is returned as it is; other iterables cannot be split safely."""
    if rank is None or world_size is None:
        here = info()
        rank, world_size = here.rank, here.world_size
    if not isinstance(loader, DataLoader):
        raise ConfigError(f"cannot shard a {type(loader).__name__} across ranks: pass a torch DataLoader "
                          "(or shard the data yourself and merge with real_stats.merge_moments)")
    if isinstance(loader.sampler, (ShardSampler, DistributedSampler)):
        return loader
    if loader.batch_size is None:
        raise ConfigError("cannot shard a DataLoader built with a batch_sampler: give it batch_size instead")
    return DataLoader(loader.dataset, batch_size=loader.batch_size,
                      sampler=ShardSampler(len(loader.dataset), rank, world_size),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      worker_init_fn=loader.worker_init_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      persistent_workers=loader.persistent_workers if loader.num_workers else False)


def shard_rounds(n_items: int, rank: int | None = None, world_size: int | None = None) -> list[int | None]:
    """Round-robin deal of ``n_items`` (class-batches): in round r this rank takes item
    r·W + rank, or None once the items run out, so every rank runs the same number of rounds
    (each ending in the collective ``merge_emu``) and the items' output files never collide."""
    if rank is None or world_size is None:
        here = info()
        rank, world_size = here.rank, here.world_size
    rounds = math.ceil(n_items / world_size)
    return [i if (i := r * world_size + rank) < n_items else None for r in range(rounds)]


# --- exact merges --------------------------------------------------------------------------

def gather_state(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Every rank's ``state`` (same keys and shapes on every rank) in rank order, through one
    all_gather of its entries flattened to float64 (exact for integers below 2**53)."""
    sizes = [v.numel() for v in state.values()]
    flat = torch.cat([v.double().flatten().cpu() for v in state.values()])
    return [{key: part.reshape(v.shape).to(v.dtype) for (key, v), part in zip(state.items(), gathered.split(sizes))}
            for gathered in gather(flat)]


def merge_emu(cfm) -> None:
    """End of a recover round under torchrun, on every rank in place of ``next_batch()``:
    fold the finished class-batch of every rank that had one this round (in rank order) into
    this rank's EMU mean, so all ranks hold the same running mean of all finished batches
    and the same batch counter. ``cfm``: a CFMLoss, or the hooks of ``compat.sre2l``.
    Collective: every rank calls it every round, with a batch or without (a None round)."""
    engine = getattr(cfm, "cfm", cfm)
    mine = engine.batch_statistics()  # {width: (psi (k,d,d), signal (k,d,c))}, detached
    dtype = next(iter(mine.values()))[0].dtype if mine else torch.float64
    flags = gather(torch.tensor([float(bool(mine)), float(dtype == torch.float64)], dtype=torch.float64))
    per_rank = [{} for _ in flags]
    for d in sorted(engine.emu.shapes):
        psi_shape, sig_shape = engine.emu.shapes[d]
        psi, sig = mine.get(d, (torch.zeros(psi_shape), torch.zeros(sig_shape)))
        for r, (p, s) in enumerate(zip(gather(psi.double()), gather(sig.double()))):
            per_rank[r][d] = (p.to(engine.device), s.to(engine.device))
    batches = []
    for (has_batch, is_double), batch in zip(flags, per_rank):
        if has_batch:
            want = torch.float64 if is_double else torch.float32
            batches.append({d: (p.to(want), s.to(want)) for d, (p, s) in batch.items()})
    cfm.next_batch(batches)
