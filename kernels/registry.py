"""The one place where a fused op's backend is chosen.

Each backend declares which ops it implements and on which (device, dtype) it runs; ``resolve``
turns a requested name (``"auto"``, None → ``UNIDD_BACKEND`` or ``"auto"``, or a backend name)
into a concrete backend for an op and an input, and ``implementation`` returns the function
that computes the op there:

* ``torch``: the PyTorch composites of ``composite.py`` (any device, any float dtype);
* ``triton``: the Triton kernels of ``triton/`` (CUDA tensors, or CPU tensors in the interpreter);
* ``cuda``: the compiled extension ``unidd_fast._cuda`` through the host code of ``cuda/ops.py``
  (CUDA tensors; float64 input is computed by the torch backend).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from unidd_fast.errors import ConfigError

from ._utils import interpreting

OPS = ("site_stats", "site_stats_grad", "regularized_inverse")

# What "auto" tries first on a CUDA device, per op, when ``unidd-fast doctor`` has measured
# nothing on this GPU (MEASURED_ORDER), from the H100 roofline predictions in bench/RESULTS.md:
# Triton's tensor-core Gram beats the CUDA kernels' fp32 FMA Gram. For the inverse the CUDA
# extension could invert all widths in one launch set, but CFMLoss inverts one width group
# per call (one launch set per width, as Triton), so that advantage is not realised; both
# run one program per matrix, which for a few matrices of width >= LARGE_WIDTH (ResNet-50's
# 1024..2048) leaves most SMs idle: there the batched cuSOLVER factorisation of the torch
# backend (torch.linalg.cholesky_ex) uses the whole GPU.
AUTO_ORDER = {"site_stats": ("triton", "cuda"), "site_stats_grad": ("triton", "cuda"),
              "regularized_inverse": ("cuda", "triton")}
LARGE_WIDTH = 1024


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
        importlib.import_module("unidd_fast._cuda")
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Backend:
    """A backend: ``available()`` (its software is installed), ``unavailable`` (how to get it),
    ``devices(device)`` (where it runs, and ``wrong_device`` why not), the input ``dtypes`` it
    computes in (others are computed by the torch backend), and per op the module and function
    implementing it."""

    name: str
    available: Callable[[], bool]
    unavailable: str
    devices: Callable[[torch.device], bool]
    wrong_device: str
    ops: dict
    dtypes: tuple | None = None  # None: every float dtype

    def supports(self, device: torch.device | str, dtype: torch.dtype) -> bool:
        """Whether this backend computes an op on ``device`` for inputs of ``dtype`` here."""
        return self.available() and self.devices(torch.device(device)) and (self.dtypes is None or dtype in self.dtypes)

    def implementation(self, op: str):
        module, function = self.ops[op]
        return getattr(importlib.import_module(module, __package__), function)


BACKENDS = {
    "torch": Backend("torch", lambda: True, "", lambda device: True, "",
                     {"site_stats": (".composite", "site_stats"),
                      "site_stats_grad": (".composite", "site_stats_grad"),
                      "regularized_inverse": (".composite", "regularized_inverse")}),
    "triton": Backend("triton", lambda: triton_available(),
                      "backend='triton' needs the triton package (it ships with CUDA builds of torch)",
                      lambda device: device.type == "cuda" or interpreting(),
                      "backend='triton' runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1",
                      {"site_stats": (".triton.site_stats", "site_stats"),
                       "site_stats_grad": (".triton.site_stats", "site_stats_grad"),
                       "regularized_inverse": (".triton.reg_inverse", "regularized_inverse")}),
    "cuda": Backend("cuda", lambda: cuda_extension_available(),
                    "backend='cuda' needs the compiled extension: UNIDD_BUILD_CUDA=1 pip install -e . "
                    "--no-build-isolation",
                    lambda device: device.type == "cuda", "backend='cuda' runs on CUDA tensors only",
                    {"site_stats": (".cuda.ops", "site_stats_cuda"),
                     "site_stats_grad": (".cuda.ops", "site_stats_grad"),
                     "regularized_inverse": (".cuda.ops", "regularized_inverse_cuda")},
                    dtypes=(torch.float32, torch.float16, torch.bfloat16)),
}


def cache_dir() -> Path:
    """Where measured backend timings live: $XDG_CACHE_HOME/unidd_fast (default ~/.cache/unidd_fast)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "unidd_fast"


def environment_key(device: torch.device | str) -> dict:
    """What a measurement holds for: the GPU's name, torch, triton and the extension build."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else device.type
    triton_version = importlib.import_module("triton").__version__ if triton_available() else None
    build = None
    if cuda_extension_available():
        try:
            path = Path(importlib.import_module("unidd_fast._cuda").__file__)
            build = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        except (ImportError, OSError, TypeError):
            build = "unreadable"
    return {"device": gpu, "torch": torch.__version__, "triton": triton_version, "extension": build}


def timings_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"backends-{digest}.json"


def save_timings(key: dict, timings: dict) -> Path:
    """Store ``timings`` {op: {backend: median seconds}} of the backends that passed (atomic write)."""
    path = timings_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "timings": timings}, indent=1))
    os.replace(tmp, path)
    _load_timings.cache_clear()
    measured_order.cache_clear()
    return path


@functools.lru_cache(maxsize=None)
def _load_timings(device: str) -> dict:
    key = environment_key(device)
    try:
        data = json.loads(timings_path(key).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("timings"), dict):
        return {}  # a hostile or stale file is ignored: the prediction order stands
    return data["timings"]


@functools.lru_cache(maxsize=None)
def measured_order(op: str, device: str) -> tuple[str, ...] | None:
    """Backends of ``op`` that passed ``unidd-fast doctor`` on this GPU, fastest first, or None."""
    times = _load_timings(device).get(op)
    if not isinstance(times, dict):
        return None
    valid = [(t, name) for name, t in times.items() if name in BACKENDS and isinstance(t, (int, float))]
    return tuple(name for _, name in sorted(valid)) or None


def resolve(op: str, backend: str | None, device: torch.device | str, dtype: torch.dtype | None = None,
            width: int | None = None) -> str:
    """Turn ``backend`` ("auto", None or a name) into a concrete backend for ``op`` on ``device``
    with inputs of ``dtype`` (and matrices of ``width``, for the inverse). "auto" on CUDA takes
    the fastest backend doctor measured on this GPU, else AUTO_ORDER. A named backend that is
    missing or runs elsewhere is a ConfigError; one that does not compute in ``dtype`` (the
    CUDA kernels and float64) hands it to torch."""
    name = backend or os.environ.get("UNIDD_BACKEND", "auto")
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            order = measured_order(op, str(device))
            if order is None:
                if op == "regularized_inverse" and width is not None and width >= LARGE_WIDTH:
                    return "torch"
                order = AUTO_ORDER[op]
            for candidate in order:
                if BACKENDS[candidate].available() and (dtype is None or BACKENDS[candidate].supports(device, dtype)):
                    return candidate
        return "torch"
    chosen = BACKENDS.get(name)
    if chosen is None:
        raise ConfigError(f"unknown backend {name!r}; choose one of {('auto',) + tuple(BACKENDS)}")
    if not chosen.available():
        raise ConfigError(chosen.unavailable)
    if not chosen.devices(device):
        raise ConfigError(chosen.wrong_device)
    return name if dtype is None or chosen.supports(device, dtype) else "torch"


def implementation(op: str, backend: str | None, device: torch.device | str, dtype: torch.dtype | None = None):
    """The function computing ``op`` on ``device`` for ``dtype`` inputs with the resolved ``backend``."""
    return BACKENDS[resolve(op, backend, device, dtype)].implementation(op)
