"""Pre-flight of a run: before its first batch, the fused-op backends and the recover-step
features it will use are checked on its own model, and whatever fails is switched off for
the run, with a warning naming what failed (``log``, and the stage's ``"fallbacks"``).
``strict`` makes a failure a ConfigError instead.

- ``check_backends``: the ops a backend other than torch would compute (always on CUDA under
  ``auto``; on the CPU only when a kernel backend is named), one call each at the teacher's
  own site shapes against float64 (``unidd_fast.doctor``); a failing backend hands the run
  to the torch backend. ``recover`` checks every fused op, ``stats`` its site statistics.
- ``check_step_features``: the fast features of the recover step the run uses (CUDA graphs,
  capturable Adam, bf16 autocast, channels_last), a few steps each against the eager fp32
  step (``stepcheck``); a failing feature is turned off in the run's RecoverConfig.
The same code runs in the CPU tests with injected faults.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import doctor
from ..errors import ConfigError
from ..kernels import registry
from ..sites import SiteHooks
from . import stepcheck
from .config import RecoverConfig
from .step import resolve_options

REGISTRY_OPS = {"site_stats": "site_stats", "site_stats_grad": "site_stats_grad",
                "regularized_inverse": "regularized_inverse", "regularized_inverse_grad": "regularized_inverse"}


def teacher_shapes(model: nn.Module, image_shape: tuple, batch: int, sites: str, device) -> list[tuple]:
    """Distinct (n, d, h, w) site inputs of ``model`` for ``batch`` images of ``image_shape`` (C, H, W)."""
    shapes: list = []
    with SiteHooks(model, sites, lambda name, x: shapes.append(tuple(x.shape))), torch.no_grad():
        model(torch.zeros(batch, *image_shape, device=device))
    return list(dict.fromkeys(shapes))


def fall_back(fallbacks: list[dict], strict: bool, log=None) -> list[dict]:
    """Warn about ``fallbacks`` ({"feature", "failure", "fallback"}) through ``log``, or raise
    ConfigError with ``strict``; returns them."""
    if not fallbacks:
        return fallbacks
    message = "; ".join(f"{f['feature']} failed the pre-flight check ({f['failure']}): the run uses "
                        f"{f['fallback']} instead" for f in fallbacks)
    if strict:
        raise ConfigError(f"{message}; --strict makes this an error (drop --strict to fall back)")
    if log is not None:
        log(f"warning: {message}")
    return fallbacks


def check_backends(model: nn.Module, image_shape: tuple, batch: int, device, backend: str, sites: str = "bn",
                   strict: bool = False, log=None, ops=tuple(REGISTRY_OPS),
                   memory_format=torch.contiguous_format) -> tuple[str, list[dict]]:
    """(backend the run should use, fallbacks) for the doctor ``ops`` the run computes with
    ``backend``, on feature maps in ``memory_format`` (the teacher's). Each fallback is
    {"feature", "failure", "fallback"}; with ``strict`` a failure raises ConfigError instead
    of falling back."""
    device = torch.device(device)
    shapes = teacher_shapes(model, image_shape, batch, sites, device)
    chosen = {registry.resolve(REGISTRY_OPS[op], backend, device, torch.float32, width) for op in ops
              for width in {s[1] for s in shapes}}
    chosen.discard("torch")
    if not chosen:
        return backend, []
    report = doctor.run(device, shapes=shapes, repeats=1, backends=sorted(chosen), dtypes=[torch.float32], ops=ops,
                        step_features=False, memory_format=memory_format)
    fallbacks = [{"feature": f"backend {row['backend']} for {row['op']}", "failure": row["failure"],
                  "fallback": "backend torch"} for row in report["results"] if not row["passed"]]
    return ("torch" if fallbacks else backend), fall_back(fallbacks, strict, log)


def check_step_features(case: stepcheck.Case, rc: RecoverConfig, strict: bool = False,
                        log=None) -> tuple[RecoverConfig, list[dict]]:
    """(the RecoverConfig the run should use, fallbacks): the step features ``rc`` uses on
    the device of ``case`` (``step.resolve_options``), checked on ``case``; a failing one is
    switched off (``stepcheck.Feature.disable``). Nothing runs when the step uses none."""
    options = resolve_options(rc, case.init.device)
    used = [f.name for f in stepcheck.FEATURES if f.used(options)]
    if not used or rc.iterations == 0:
        return rc, []
    fallbacks = []
    for row in stepcheck.check(case, used):
        if row["passed"] is False:
            feature = stepcheck.BY_NAME[row["feature"]]
            rc = feature.disable(rc)
            fallbacks.append({"feature": f"step feature {feature.name}", "failure": row["failure"],
                              "fallback": feature.fallback})
    return rc, fall_back(fallbacks, strict, log)
