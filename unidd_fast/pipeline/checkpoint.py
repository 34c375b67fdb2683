"""Checkpoints of the long-running stages.

Epoch checkpoints of the training loops (squeeze, evaluate): model, optimizer, the
learning-rate schedule's position and the random generators, written atomically with
``torch.save`` of tensors and plain containers only, and read back with
``torch.load(weights_only=True)`` (no pickle of arbitrary objects).

Resuming from one reproduces an uninterrupted run bit for bit on the CPU: the schedule is
a function of the step, and the generators are restored to where the epoch left them.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import ConfigError
from ..real_stats import atomic_write

FORMAT = "unidd_fast.epoch_checkpoint/1"
RECOVER_FORMAT = "unidd_fast.recover_checkpoint/1"


class EpochCheckpoint:
    """Checkpoint file ``path`` of one training run. ``generators`` ({name: torch.Generator})
    are the run's random streams; ``every`` seconds at least between two saves (0: every
    epoch). Only the process with ``write=True`` (rank 0) writes; every process reads."""

    def __init__(self, path, generators: dict[str, torch.Generator], every: float = 0.0, write: bool = True,
                 log=None):
        self.path, self.generators, self.every, self.write, self.log = Path(path), generators, every, write, log
        self._last_save = time.monotonic()

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
        """Restore the state saved last; returns (epochs done, steps done), (0, 0) if none."""
        if not self.path.is_file():
            return 0, 0
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if state.get("format") != FORMAT:
                raise ValueError(f"format {state.get('format')!r}")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            for name, generator in self.generators.items():
                generator.set_state(state["rng"][name])
        except Exception as exc:
            raise ConfigError(f"cannot resume from {self.path} ({exc}); rerun with --force to start over") from exc
        if self.log is not None:
            self.log(f"resumed from {self.path.name} after epoch {state['epoch']}")
        return int(state["epoch"]), int(state["step"])

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, step: int,
             force: bool = False) -> bool:
        """Write the state after ``epoch`` epochs (``step`` steps) if ``every`` seconds have
        passed since the last save, or ``force``. Returns whether it wrote."""
        if not self.write or not (force or time.monotonic() - self._last_save >= self.every):
            return False
        state = {"format": FORMAT, "epoch": epoch, "step": step, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(),
                 "rng": {name: g.get_state() for name, g in self.generators.items()}}
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))
        self._last_save = time.monotonic()
        return True

    def remove(self) -> None:
        if self.write:
            self.path.unlink(missing_ok=True)


class RecoverCheckpoint:
    """Progress of one distilled set's recover run, one file per rank,
    ``checkpoints/recover_rank{r}.safetensors``, rewritten atomically after every round (one
    class-batch per rank and round; a single process has one rank):

    - ``done``: how many class-batches of the plan are finished; always a prefix, since the
      class-batches are dealt round-robin and a round ends with all of its batches;
    - the regulariser's EMU state after them (identical on every rank after ``merge_emu``)
      and its step counter;
    - the 8-bit pixels (uint8) of the class-batch this rank finished in that round, so that a
      kill between this file and the set's image files loses nothing: ``load`` hands them back.

    The checkpoint is committed before the set's files of the batch are written: a batch
    with files on disk is never recomputed in one process. Under torchrun a round whose
    checkpoints some rank had not written yet is recomputed (with the same result).
    """

    def __init__(self, folder, rank: int = 0, world_size: int = 1):
        self.folder, self.rank, self.world_size = Path(folder), rank, world_size

    def _file(self, rank: int) -> Path:
        return self.folder / f"recover_rank{rank}.safetensors"

    def save(self, done: int, state: dict[str, torch.Tensor], step: int, index: int | None = None,
             pixels: torch.Tensor | None = None) -> None:
        tensors = {f"emu/{k}": v.detach().cpu().contiguous() for k, v in state.items()}
        if pixels is not None:
            tensors["pixels"] = pixels.detach().cpu().contiguous()
        meta = {"format": RECOVER_FORMAT, "done": str(done), "step": str(step),
                "index": "" if index is None else str(index)}
        atomic_write(self._file(self.rank), lambda tmp: save_file(tensors, tmp, metadata=meta))

    def load(self, device) -> tuple[int, dict | None, int, list[tuple[int, torch.Tensor]]]:
        """(class-batches done, EMU state or None, step, [(class-batch index, pixels)] whose
        files may still be missing) from every rank's file; (0, None, 0, []) if there are none."""
        entries = []
        for file in sorted(self.folder.glob("recover_rank*.safetensors")):
            try:
                with safe_open(str(file), framework="pt") as handle:
                    meta = handle.metadata() or {}
                    tensors = {k: handle.get_tensor(k) for k in handle.keys()}
                if meta.get("format") != RECOVER_FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}")
            except Exception as exc:
                raise ConfigError(f"cannot resume from {file} ({exc}); rerun with --force to start over") from exc
            entries.append((int(meta["done"]), int(meta["step"]), meta["index"], tensors))
        if not entries:
            return 0, None, 0, []
        done = min(e[0] for e in entries)
        step, tensors = next((e[1], e[3]) for e in entries if e[0] == done)
        state = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("emu/")}
        pending = [(int(index), t["pixels"]) for d, _, index, t in entries if d == done and index != ""]
        return done, state or None, step, pending

    def rebase(self, done: int, state: dict[str, torch.Tensor], step: int) -> None:
        """After a resume (maybe with another world size): every rank's file says ``done``
        and files of ranks that no longer exist are removed. Collective under torchrun."""
        from .. import distributed

        distributed.barrier()  # every rank has read every file before any is rewritten
        self.save(done, state, step)
        distributed.barrier()
        if self.rank == 0:
            for file in self.folder.glob("recover_rank*.safetensors"):
                if int(file.stem.removeprefix("recover_rank")) >= self.world_size:
                    file.unlink()
        distributed.barrier()

    def remove(self) -> None:
        if self.rank == 0:
            for file in self.folder.glob("recover_rank*.safetensors"):
                file.unlink()
            if self.folder.is_dir() and not any(self.folder.iterdir()):
                self.folder.rmdir()
