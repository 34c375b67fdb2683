"""Pre-flight of a run's fused-op backends: before the first class-batch, the ops the run will
use are checked (``unidd_fast.doctor``, one timed call each) at the teacher's own site shapes
against float64; a backend that fails or raises is switched off for the run (the torch
backend takes over), with a warning naming what failed. Runs whenever a backend other than
torch would compute (always on CUDA under ``auto``; on the CPU only when a kernel backend is
named), so the same code runs in the CPU tests with an injected faulty backend.

Not covered yet: the step features (CUDA graphs, capturable Adam, bf16 autocast,
channels_last) are not compared against the eager fp32 step here.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import doctor
from ..errors import ConfigError
from ..kernels import registry
from ..sites import SiteHooks

REGISTRY_OPS = {"site_stats": "site_stats", "site_stats_grad": "site_stats_grad",
                "regularized_inverse": "regularized_inverse", "regularized_inverse_grad": "regularized_inverse"}


def teacher_shapes(model: nn.Module, image_shape: tuple, batch: int, sites: str, device) -> list[tuple]:
    """Distinct (n, d, h, w) site inputs of ``model`` for ``batch`` images of ``image_shape`` (C, H, W)."""
    shapes: list = []
    with SiteHooks(model, sites, lambda name, x: shapes.append(tuple(x.shape))), torch.no_grad():
        model(torch.zeros(batch, *image_shape, device=device))
    return list(dict.fromkeys(shapes))


def check_backends(model: nn.Module, image_shape: tuple, batch: int, device, backend: str, sites: str = "bn",
                   strict: bool = False, log=None) -> tuple[str, list[dict]]:
    """(backend the run should use, fallbacks). Each fallback is {"feature", "failure"}; with
    ``strict`` a failure raises ConfigError instead of falling back."""
    device = torch.device(device)
    shapes = teacher_shapes(model, image_shape, batch, sites, device)
    chosen = {registry.resolve(op, backend, device, torch.float32, width) for op in REGISTRY_OPS.values()
              for width in {s[1] for s in shapes}}
    chosen.discard("torch")
    if not chosen:
        return backend, []
    report = doctor.run(device, shapes=shapes, repeats=1, backends=sorted(chosen), dtypes=[torch.float32])
    failed = [row for row in report["results"] if not row["passed"]]
    if not failed:
        return backend, []
    fallbacks = [{"feature": f"backend {row['backend']} for {row['op']}", "failure": row["failure"],
                  "fallback": "torch backend"} for row in failed]
    message = "; ".join(f"{f['feature']} failed the pre-flight check ({f['failure']})" for f in fallbacks)
    if strict:
        raise ConfigError(f"{message}; --strict makes this an error (drop --strict to fall back to backend torch)")
    if log is not None:
        log(f"warning: {message}: the run uses backend torch instead")
    return "torch", fallbacks
