"""Pre-flight of a run: before its first batch, the fused-op backends and the recover-step
features it will use are checked on its own model, and whatever fails is switched off for
the run, with a warning naming what failed (``log``, and the stage's ``"fallbacks"``).
``strict`` makes a failure a ConfigError instead.

- ``check_backends``: the ops a backend other than torch would compute (always on CUDA under
  ``auto``; on the CPU only when a kernel backend is named), one call each at the teacher's
  own site shapes (d, h, w) with ``checked_batch`` images against float64
  (``unidd_fast.opcheck``); a failing backend hands the run to the torch backend. ``recover``
  checks every fused op, ``stats`` its site statistics.
- ``check_step_features``: the fast features of the recover step the run uses (CUDA graphs,
  capturable Adam, bf16 autocast, channels_last), a few steps each against the eager fp32
  step (``stepcheck``), then the ones left all together; a failing feature is turned off in
  the run's RecoverConfig.
Under torchrun the ranks agree after each check (``agree``, one small all_gather): a check
failing on any rank switches the feature off on every rank, and the warning names the
ranks. The same code runs in the CPU tests with injected faults.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .. import distributed, opcheck
from ..errors import ConfigError, UniddError
from ..kernels import registry
from ..sites import site_input_shapes
from . import stepcheck
from .config import RecoverConfig
from .step import resolve_options

# Images per site in the backend check; each site keeps the run's (d, h, w). Float64 copies of
# a ResNet stem map (64, 112, 112) take 0.8 GB at 128 images instead of 3.2 GB at a class-batch
# of 500. The site-statistics kernels still take the reduction paths of a full batch: their
# chunk plans depend on the shape only, and Triton splits a site's rows into ≥ 3 chunks (its
# two-level chunk sum) only when n·h·w·(bytes per value) ≥ 24·d
# (``kernels.triton.site_stats.num_chunks``), which at the deepest ResNet site that splits,
# (512, 7, 7), needs n ≥ 63 in fp32 and 126 in bf16; the CUDA plan splits from n·h·w > 32
# rows. tests/test_preflight.py checks both plans on ResNet-18/50 at 224 px.
PREFLIGHT_BATCH = 128
REGISTRY_OPS = {"site_stats": "site_stats", "site_stats_grad": "site_stats_grad",
                "regularized_inverse": "regularized_inverse", "regularized_inverse_grad": "regularized_inverse"}


def teacher_shapes(model: nn.Module, image_shape: tuple, batch: int, sites: str) -> list[tuple]:
    """Distinct (n, d, h, w) site inputs of ``model`` for ``batch`` images of ``image_shape`` (C, H, W)."""
    return list(dict.fromkeys((batch,) + s for s in site_input_shapes(model, sites, image_shape).values()))


def feature_dtypes(precision: str) -> tuple:
    """Dtypes of the feature maps the fused ops see in a recover step of ``precision``
    (``StepOptions.precision``): bf16 autocast hands them bf16 maps; the backend check also
    covers float32, which the step falls back to."""
    return (torch.float32, torch.bfloat16) if precision == "bf16" else (torch.float32,)


def checked_batch(batch: int) -> int:
    """Images per site of the backend check for a run computing ``batch`` at once."""
    return min(batch, PREFLIGHT_BATCH)


def agree(local) -> list[dict]:
    """The fallbacks of all ranks: ``local()`` (this rank's checks, returning its fallbacks
    {"feature", "failure", "fallback"}), then one all_gather (``distributed.gather_objects``).
    Each feature that failed on any rank is returned once, as the first failing rank
    reported it, with "ranks": the ranks where it failed; every rank gets the same list. A
    rank whose ``local()`` raises re-raises its error, and the other ranks raise UniddError
    naming it instead of waiting for it at the next collective. Collective under torchrun:
    every rank calls it the same number of times. One process: ``local()``, "ranks": [0]."""
    try:
        mine, error = local(), None
    except Exception as exc:  # told to the other ranks before it propagates here
        mine, error = [], exc
    everyone = distributed.gather_objects((mine, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    for rank, (_, failed) in enumerate(everyone):
        if failed is not None:
            raise UniddError(f"the pre-flight failed on rank {rank}: {failed}")
    merged: dict = {}
    for rank, (fallbacks, _) in enumerate(everyone):
        for fallback in fallbacks:
            merged.setdefault(fallback["feature"], dict(fallback, ranks=[]))["ranks"].append(rank)
    return list(merged.values())


def fall_back(fallbacks: list[dict], strict: bool, log=None) -> list[dict]:
    """Warn about ``fallbacks`` ({"feature", "failure", "fallback", "ranks"}, from ``agree``)
    through ``log``, or raise ConfigError with ``strict``; returns them. Under torchrun the
    message names the ranks where the check failed."""
    if not fallbacks:
        return fallbacks
    where = (lambda f: f" on rank{'s' * (len(f['ranks']) > 1)} {', '.join(map(str, f['ranks']))}"
             if distributed.is_distributed() else "")
    message = "; ".join(f"{f['feature']} failed the pre-flight check{where(f)} ({f['failure']}): the run uses "
                        f"{f['fallback']} instead" for f in fallbacks)
    if strict:
        raise ConfigError(f"{message}; --strict makes this an error (drop --strict to fall back)")
    if log is not None:
        log(f"warning: {message}")
    return fallbacks


def check_backends(model: nn.Module, image_shape: tuple, batch: int, device, backend: str, sites: str = "bn",
                   strict: bool = False, log=None, ops=tuple(REGISTRY_OPS),
                   memory_format=torch.contiguous_format, dtypes=(torch.float32,)) -> tuple[str, list[dict]]:
    """(backend the run should use, fallbacks) for the doctor ``ops`` the run computes with
    ``backend`` on batches of ``batch`` images, checked on ``checked_batch(batch)`` images,
    feature maps in ``memory_format`` (the teacher's) and each of ``dtypes`` (a bf16 run's
    kernels see bf16 maps: ``feature_dtypes``). Each fallback is {"feature",
    "failure", "fallback", "ranks"}; with ``strict`` a failure raises ConfigError instead of
    falling back. Collective under torchrun (``agree``)."""
    device = torch.device(device)

    def local() -> list[dict]:
        shapes = teacher_shapes(model, image_shape, checked_batch(batch), sites)
        chosen = {registry.resolve(REGISTRY_OPS[op], backend, device, dtype, width) for op in ops
                  for width in {s[1] for s in shapes} for dtype in dtypes}
        chosen.discard("torch")
        if not chosen:
            return []
        results = opcheck.check_ops(device, shapes, list(dtypes), repeats=1, backends=sorted(chosen), ops=ops,
                                    memory_format=memory_format)
        return [{"feature": f"backend {row['backend']} for {row['op']}" +
                            ("" if row["dtype"] == "float32" else f" on {row['dtype']} maps"),
                 "failure": row["failure"], "fallback": "backend torch"} for row in results if not row["passed"]]

    fallbacks = agree(local)
    return ("torch" if fallbacks else backend), fall_back(fallbacks, strict, log)


def _step_fallback(feature: stepcheck.Feature, failure: str) -> dict:
    return {"feature": f"step feature {feature.name}", "failure": failure, "fallback": feature.fallback}


def _check_together(case: stepcheck.Case, names: list[str], reference) -> list[dict]:
    """[the fallback of the first of ``names``] if they fail together on ``case``, else []."""
    _, row = stepcheck.check(case, [tuple(names)], reference=reference)
    if row["passed"] is not False:
        return []
    return [_step_fallback(stepcheck.BY_NAME[names[0]], f"together with {', '.join(names[1:])}: {row['failure']}")]


def check_step_features(case: stepcheck.Case, rc: RecoverConfig, strict: bool = False,
                        log=None) -> tuple[RecoverConfig, list[dict]]:
    """(the RecoverConfig the run should use, fallbacks): the step features ``rc`` uses on
    the device of ``case`` (``step.resolve_options``), checked on ``case``. First each alone
    (``stepcheck.check``): a failing one is switched off (``stepcheck.Feature.disable``).
    Then the features left, together, as the run will use them (when no one of them alone
    makes that step, ``stepcheck.new_combination``): while the combination fails, the first
    of it in FEATURES order is switched off (CUDA graphs, then bf16 autocast: the step
    without graphs is the simpler one, and fp32 the exact one) and the rest is checked
    again. Nothing runs when the step uses no feature. Collective under torchrun: the ranks
    agree after each check (``agree``), so they all run the same combination and end with
    the same RecoverConfig."""
    device = case.init.device
    used = [f.name for f in stepcheck.FEATURES if f.used(resolve_options(rc, device))]
    if not used or rc.iterations == 0:
        return rc, []
    reference = []  # filled inside agree: a rank whose reference step raises tells the others

    def alone() -> list[dict]:
        reference.append(stepcheck.reference_step(case))
        return [_step_fallback(stepcheck.BY_NAME[row["feature"]], row["failure"])
                for row in stepcheck.check(case, used, reference=reference[0]) if row["passed"] is False]

    fallbacks = agree(alone)
    for fallback in fallbacks:
        rc = stepcheck.BY_NAME[fallback["feature"].removeprefix("step feature ")].disable(rc)
    while stepcheck.new_combination(kept := [f.name for f in stepcheck.FEATURES
                                             if f.used(resolve_options(rc, device))]):
        failed = agree(functools.partial(_check_together, case, kept, reference[0]))
        if not failed:
            break
        rc = stepcheck.BY_NAME[kept[0]].disable(rc)
        fallbacks += failed
    return rc, fall_back(fallbacks, strict, log)
