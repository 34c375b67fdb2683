"""EMU: the running means of a recover run's finished class-batches (docs/math.md#emu).

One ``EMU`` per CFMLoss. Per site width d it holds (Ψ̄ (k,d,d), signal̄ (k,d,c)), the
means over the finished class-batches of the k sites of that width, and the index b of
the current class-batch (1 for the first). The loss matches the current batch blended in
with weight 1/b (``blend``); after the batch, its detached statistics are folded into the
means (``fold``, or ``fold_all`` for the batches of every rank of a torchrun round).

Graph-safe mode (``make_graph_safe``) keeps b in a 0-d float64 device tensor and the means
in buffers updated in place, so a captured CUDA graph reads the current values; the numbers
are the same as in the eager mode.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import StatsFileError, StatsMismatchError
from .ops import emu_fold
from .real_stats import atomic_write

FORMAT = "unidd_fast.emu/1"

Batch = dict[int, tuple[torch.Tensor, torch.Tensor]]  # width d -> (Ψ (k,d,d), signal (k,d,c))


class EMU:
    """Running means per site width and the class-batch index b.

    shapes: per width d, the shapes (Ψ (k,d,d), signal (k,d,c)) of its k stacked sites;
    ``load_state_dict`` refuses tensors of other widths or shapes.
    """

    def __init__(self, shapes: dict[int, tuple[torch.Size, torch.Size]]):
        self.shapes = {d: (torch.Size(p), torch.Size(s)) for d, (p, s) in shapes.items()}
        self.b = 1
        self.means: Batch = {}
        self._b_dev: torch.Tensor | None = None

    @property
    def batches_done(self) -> int:
        return self.b - 1

    @property
    def graph_safe(self) -> bool:
        return self._b_dev is not None

    def make_graph_safe(self, device) -> None:
        """Keep b in a device tensor and update the means in place from now on."""
        if self._b_dev is None:
            self._b_dev = torch.tensor(float(self.b), dtype=torch.float64, device=device)

    def blend(self, d: int, psi: torch.Tensor, sig: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Ψ, signal) of the current class-batch at width d, blended with the running means:
        x / b + (1 − 1/b) x̄ (unchanged at b = 1). Graph-safe, the blend runs at every b: at
        b = 1 it reads zero buffers, x / 1 + 0 · 0 = x exactly."""
        if self._b_dev is None:
            if self.b == 1:
                return psi, sig
            bar_psi, bar_sig = self.means[d]
            return emu_fold(psi, bar_psi, self.b), emu_fold(sig, bar_sig, self.b)
        if d not in self.means:  # the buffers a captured graph reads
            self.means[d] = (torch.zeros_like(psi, requires_grad=False), torch.zeros_like(sig, requires_grad=False))
        bar_psi, bar_sig = self.means[d]
        return emu_fold(psi, bar_psi, self._b_dev), emu_fold(sig, bar_sig, self._b_dev)

    def fold(self, batch: Batch) -> None:
        """Fold one finished class-batch's detached statistics into the means; b += 1."""
        b = self.b
        for d, (psi, sig) in batch.items():
            if self._b_dev is not None and d in self.means:  # in place: a captured graph reads these
                for bar, value in zip(self.means[d], (psi, sig)):
                    bar.copy_(emu_fold(value, bar, b))
            elif b == 1:
                self.means[d] = (psi.clone(), sig.clone())
            else:
                bar_psi, bar_sig = self.means[d]
                self.means[d] = (emu_fold(psi, bar_psi, b), emu_fold(sig, bar_sig, b))
        self.b += 1
        if self._b_dev is not None:
            self._b_dev.fill_(float(self.b))

    def fold_all(self, batches: list[Batch]) -> None:
        """Fold several finished class-batches in order (torchrun: every rank's, in rank order)."""
        for batch in batches:
            self.fold(batch)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"b": b, "{d}/psi": Ψ̄, "{d}/sig": signal̄} (no means before the first fold)."""
        state = {"b": torch.tensor(self.b)}
        for d, (psi, sig) in (self.means.items() if self.b > 1 else ()):
            state[f"{d}/psi"], state[f"{d}/sig"] = psi, sig
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()`` output (graph-safe: into the existing buffers, in place)."""
        self._check(state)
        self.b = int(state["b"])
        means = {d: (state[f"{d}/psi"], state[f"{d}/sig"]) for d in self.shapes if f"{d}/psi" in state}
        if self._b_dev is None:
            self.means = means
            return
        self._b_dev.fill_(float(self.b))
        for d, buffers in self.means.items():
            for i, buffer in enumerate(buffers):
                if d in means:
                    buffer.copy_(means[d][i])
                else:
                    buffer.zero_()
        self.means.update({d: tuple(t.clone() for t in pair) for d, pair in means.items() if d not in self.means})

    def _check(self, state: dict[str, torch.Tensor]) -> None:
        if "b" not in state or state["b"].numel() != 1 or int(state["b"]) < 1:
            raise StatsMismatchError("an EMU state needs a class-batch index 'b' >= 1")
        wanted = {f"{d}/{part}": shape for d, pair in self.shapes.items() for part, shape in zip(("psi", "sig"), pair)}
        for key, value in state.items():
            if key == "b":
                continue
            if key not in wanted:
                raise StatsMismatchError(f"EMU state entry {key!r} matches no site width of this loss "
                                         f"{sorted(self.shapes)}: the state belongs to another model or sites")
            if value.shape != wanted[key]:
                raise StatsMismatchError(f"EMU state entry {key!r} has shape {tuple(value.shape)}, this loss needs "
                                         f"{tuple(wanted[key])}: the state belongs to another model, sites or signal")
        if int(state["b"]) > 1 and not any(key in state for key in wanted):
            raise StatsMismatchError(f"EMU state at class-batch {int(state['b'])} holds no running means")

    def save(self, path, metadata: dict | None = None) -> None:
        """Write the state as a safetensors file, atomically; ``metadata``: JSON-able facts
        kept beside it (the drop-in records the sites and signal), returned by ``load``."""
        save_state(path, self.state_dict(), metadata)

    def load(self, path, device=None) -> dict:
        """Restore a state written by ``save``; returns its metadata."""
        state, metadata = load_state(path, device)
        self.load_state_dict(state)
        return metadata


def save_state(path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """An EMU ``state_dict`` (and JSON-able ``metadata``) as a safetensors file, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "metadata": metadata or {}}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata={"unidd": json.dumps(meta)}))


def load_state(path, device=None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state, metadata) of a file written by ``save_state``; StatsFileError if it is missing,
    unreadable or not an EMU file."""
    path = Path(path)
    if not path.is_file():
        raise StatsFileError(f"EMU state file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as handle:
            raw = (handle.metadata() or {}).get("unidd")
            state = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = json.loads(raw) if raw is not None else {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise StatsFileError(f"{path} is not a readable EMU state file ({exc}); it may be truncated") from exc
    if meta.get("format") != FORMAT or not isinstance(meta.get("metadata"), dict):
        raise StatsFileError(f"{path} is not an EMU state file (format {meta.get('format')!r}, expected {FORMAT!r})")
    return state, meta["metadata"]
