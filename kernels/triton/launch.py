"""Kernel launches of this package go through ``launch`` so that the AOT report
(``compile_report.py``) can record the exact arguments and meta-parameters the launchers
pick, and compile those configurations for a GPU target without a GPU."""
from __future__ import annotations

import contextlib

import torch

_recorded: list | None = None


def _device_guard(args):
    """``torch.cuda.device`` of the first CUDA tensor among ``args``: Triton launches on the
    *current* device, so a ``cuda:1`` tensor with ``cuda:0`` current would be read through
    the wrong context (the CUDA binding guards the same way). A no-op for CPU tensors."""
    for arg in args:
        device = getattr(arg, "device", None)
        if isinstance(device, torch.device) and device.type == "cuda":
            return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` on the device of its tensors, or record the call
    inside ``recording()``."""
    if _recorded is not None:
        _recorded.append((kernel, grid, args, meta))
        return
    with _device_guard(args):
        kernel[grid](*args, **meta)


@contextlib.contextmanager
def recording():
    """Collect (kernel, grid, args, meta) of every launch in the block instead of running it."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous
