"""Kernel launches of this package go through ``launch`` so that the AOT report
(``aot.py``) can record the exact arguments and meta-parameters the launchers pick, and
compile those configurations for a GPU target without a GPU."""
from __future__ import annotations

import contextlib

_recorded: list | None = None


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, or record the call inside ``recording()``."""
    if _recorded is not None:
        _recorded.append((kernel, grid, args, meta))
        return
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
