"""NVTX ranges in unidd_fast's own domain (visible in Nsight Systems; a no-op without a profiler).

The ``nvtx`` package is a dependency, but an environment that lacks it (a GPU machine whose
image holds torch and nothing else of ours, where nothing can be installed) still runs
everything: ``annotate`` then marks nothing, and ``NVTX`` is False.
"""
from __future__ import annotations

import contextlib

try:
    import nvtx
except ImportError:
    nvtx = None

DOMAIN = "unidd_fast"
NVTX = nvtx is not None


class _Unmarked(contextlib.ContextDecorator):
    """What ``annotate`` returns without the nvtx package: a context manager and decorator
    that does nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def annotate(name: str, color: str = "blue"):
    """Context manager / decorator marking ``name`` (e.g. "recover/forward") in the unidd_fast domain."""
    if nvtx is None:
        return _Unmarked()
    return nvtx.annotate(name, color=color, domain=DOMAIN)
