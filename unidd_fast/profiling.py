"""NVTX ranges in unidd_fast's own domain (visible in Nsight Systems; a no-op without a profiler)."""
from __future__ import annotations

import nvtx

DOMAIN = "unidd_fast"


def annotate(name: str, color: str = "blue"):
    """Context manager / decorator marking ``name`` (e.g. "recover/forward") in the unidd_fast domain."""
    return nvtx.annotate(name, color=color, domain=DOMAIN)
