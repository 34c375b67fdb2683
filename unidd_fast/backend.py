"""Backend selection for the fused ops.

``torch`` is the plain PyTorch reference (runs anywhere, and is the oracle of the tests);
``triton`` and ``cuda`` are the fused kernels. ``auto`` (default, or ``UNIDD_BACKEND``)
picks the fastest one available for the tensor's device.
"""
from __future__ import annotations

import functools
import os

import torch

from .errors import ConfigError

BACKENDS = ("torch", "triton", "cuda")

# What "auto" tries first on a CUDA device, per op, from the H100 roofline predictions in
# bench/RESULTS.md (not yet GPU-measured): Triton's tensor-core Gram beats the CUDA kernels'
# fp32 FMA Gram; the CUDA inverse does all widths in one launch set (~186 µs vs ~474 µs).
AUTO_ORDER = {"site_stats": ("triton", "cuda"), "regularized_inverse": ("cuda", "triton")}


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def cuda_extension_available() -> bool:
    try:
        from . import _cuda  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str | None, device: torch.device | str, op: str = "site_stats") -> str:
    """Turn ``backend`` ("auto", None or a name) into a concrete backend for ``op`` on ``device``."""
    name = backend or os.environ.get("UNIDD_BACKEND", "auto")
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            available = {"triton": triton_available(), "cuda": cuda_extension_available()}
            for candidate in AUTO_ORDER[op]:
                if available[candidate]:
                    return candidate
        return "torch"
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    if name == "triton":
        if not triton_available():
            raise ConfigError("backend='triton' needs the triton package (it ships with CUDA builds of torch)")
        if device.type != "cuda" and not interpreting():
            raise ConfigError("backend='triton' runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1")
    if name == "cuda":
        if not cuda_extension_available():
            raise ConfigError("backend='cuda' needs the compiled extension: UNIDD_BUILD_CUDA=1 pip install -e . --no-build-isolation")
        if device.type != "cuda":
            raise ConfigError("backend='cuda' runs on CUDA tensors only")
    return name
