"""The fast features of the recover step checked against the eager fp32 step: a few full
recover steps (``step.RecoverEngine``: augment → teacher → CE + regulariser → backward →
Adam → clip) on the same images, targets and random draws, once with every feature off and
once per feature with only that feature on, or with a group of features on together (the
pre-flight's last check: the combination a run keeps); the losses and the image update must
agree within a tolerance of the feature's arithmetic (a group's: the loosest among them).
``unidd-fast doctor`` reports these rows; ``preflight.check_step_features`` runs them on a
run's own model before its first class-batch.

Features (``FEATURES``):
  cuda_graphs      the step captured once and replayed (with capturable Adam, which a
                   capture needs); CUDA only
  capturable_adam  Adam with its step counter and learning rate on the device; CUDA only
  bf16_autocast    the teacher's forward and backward under bf16 autocast
  channels_last    teacher and images in channels_last

Errors are relative: |Δ| / |reference| of the last step's cross-entropy and regulariser, and
‖Δ‖ / ‖reference‖ (Frobenius) of the image update images_after − images_before over the
steps. Adam normalises each pixel's gradient, so a pixel whose gradient is near zero moves by
up to 2·lr on a rounding difference: the update amplifies rounding far more than the losses.
Measured on the CPU, ``unidd-fast doctor --device cpu --arch resnet18 --image-size 32
--batch 10 --repeats 1 --backends torch --seed S`` for S = 0, 1, 2: channels_last (float32,
reordered) losses ≤ 2.5e-4, update ≤ 0.052; bf16 autocast (8 significant bits) losses
≤ 2.9e-3, update ≤ 0.42. Tolerances (``LOSS_TOLERANCE``, ``TOLERANCE``): float32 1e-3 and
0.25; bfloat16 5e-2 and 0.75; "tf32" (a float32 feature on CUDA, where cuDNN convolutions
round their inputs to 10 significant bits unless ``torch.backends.cudnn.allow_tf32`` is
off, and channels_last may pick other kernels than NCHW) 1e-2 and 0.5, between the two:
not measured on a GPU yet. A wrong step is caught by the losses or by the update: a step
that does not move the images, moves them twice as far or the wrong way has an update
error of 1 or more.

Where the step itself is ill-conditioned (rank-deficient Ψ at the deep sites of a small
class-batch, e.g. ResNet-50 at 32 px with 2 images: 32 rows for d = 2048) any rounding
difference is amplified past those tolerances, and a feature would be switched off for what
fp32 does anyway. So a feature that misses them is judged again against the *floor*: the
eager fp32 step's own difference when every initial pixel moves by one ulp
(``rounding_floor``, run only then), within ``FLOOR_MARGIN`` times it and at most
``LOSS_CAP`` / ``UPDATE_CAP`` (below 1: a wrong step still fails). Measured on the CPU at
that ResNet-50 case (``doctor.step_case("cpu", "resnet50", 32, 2)``, 1 thread): floor losses
5.7e-3, update 0.29; channels_last 9.2e-3 and 0.35 (passes: tolerances 2.3e-2 and 0.9).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..opcheck import FLOOR_MARGIN, relative_error, worst
from ..errors import UniddError
from .config import RecoverConfig
from .step import RecoverEngine, StepOptions

STEPS = 3  # recover steps per check: with CUDA graphs, warm-up, capture and three replays
REFERENCE = "eager_fp32"  # the row of the reference step in ``check``
EAGER_FP32 = StepOptions(precision="fp32", cuda_graphs=False, compile=False, channels_last=False, capturable=False)
TOLERANCE = {"float32": 0.25, "tf32": 0.5, "bfloat16": 0.75}  # the image update
LOSS_TOLERANCE = {"float32": 1e-3, "tf32": 1e-2, "bfloat16": 5e-2}
LOSS_CAP, UPDATE_CAP = 0.1, 0.9  # the floor's widest tolerances (FLOOR_MARGIN: opcheck's)


@dataclass(frozen=True)
class Feature:
    """name; cuda_only: runs on CUDA devices only; dtype: arithmetic of the feature (its
    tolerance, see ``arithmetic``); enable(options) -> StepOptions with the feature on; used(options) -> whether
    StepOptions use it; disable(rc) -> the RecoverConfig of a run without it; fallback: what
    that run does instead."""

    name: str
    cuda_only: bool
    dtype: str
    enable: Callable[[StepOptions], StepOptions]
    used: Callable[[StepOptions], bool]
    disable: Callable[[RecoverConfig], RecoverConfig]
    fallback: str


def _replace(**changes):
    return lambda obj: dataclasses.replace(obj, **changes)


FEATURES = (
    # a capture needs capturable Adam; the run's Adam is capturable exactly when it captures
    Feature("cuda_graphs", True, "float32", _replace(cuda_graphs=True, capturable=True), lambda o: o.cuda_graphs,
            _replace(cuda_graphs="off"), "the eager step"),
    Feature("capturable_adam", True, "float32", _replace(capturable=True), lambda o: o.capturable,
            _replace(cuda_graphs="off"), "the eager step with non-capturable Adam"),
    Feature("bf16_autocast", False, "bfloat16", _replace(precision="bf16"), lambda o: o.precision == "bf16",
            _replace(precision="fp32"), "an fp32 teacher"),
    Feature("channels_last", False, "float32", _replace(channels_last=True), lambda o: o.channels_last,
            _replace(channels_last=False), "NCHW (contiguous) images and teacher"),
)
BY_NAME = {f.name: f for f in FEATURES}


def applicable(feature: Feature, device: torch.device) -> bool:
    return torch.device(device).type == "cuda" or not feature.cuda_only


def arithmetic(feature: Feature, device: torch.device) -> str:
    """The tolerance class of ``feature`` on ``device``: its dtype, or "tf32" for a float32
    feature where cuDNN convolutions run in TF32."""
    tf32 = torch.device(device).type == "cuda" and torch.backends.cudnn.allow_tf32
    return "tf32" if feature.dtype == "float32" and tf32 else feature.dtype


def build_engine(model, regularizer, rc, augment, generator, lo, hi, options: StepOptions) -> RecoverEngine:
    """The engine a check runs (one place, so that tests can inject a faulty feature)."""
    return RecoverEngine(model, regularizer, rc, augment, generator, lo, hi, options)


@dataclass
class Case:
    """What the steps run on. model: the teacher (eval, frozen); make_regularizer() -> a fresh
    regulariser on ``model`` (or None), removed after each check; rc: lr and betas (the
    iterations are STEPS); init (k, C, H, W) and targets (k,) on the device; lo/hi (1, C, 1, 1)."""

    model: torch.nn.Module
    make_regularizer: Callable
    rc: RecoverConfig
    augment: Callable
    init: torch.Tensor
    targets: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    seed: int = 0


def _steps(case: Case, options: StepOptions, repeats: int):
    """((images after STEPS steps, CE, regulariser), median seconds per step over ``repeats`` runs)."""
    rc = dataclasses.replace(case.rc, iterations=STEPS)
    device = case.init.device
    generator = torch.Generator(device).manual_seed(case.seed)
    regularizer = case.make_regularizer()
    try:
        if regularizer is not None:
            regularizer.set_curriculum(0, 1)
        engine = build_engine(case.model, regularizer, rc, case.augment, generator, case.lo, case.hi, options)
        result, times = None, []
        for _ in range(max(repeats, 1)):
            generator.manual_seed(case.seed)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = engine.run(case.init, case.targets, desc="pre-flight")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) / STEPS)
            result = out if result is None else result
    finally:
        if regularizer is not None:
            regularizer.remove()
    return result, statistics.median(times)


def reference_step(case: Case, repeats: int = 1):
    """(images after STEPS eager fp32 steps, CE, regulariser), median seconds per step: what
    ``check`` compares with. The reference raising raises, named as the pre-flight's."""
    try:
        return _steps(case, EAGER_FP32, repeats)
    except UniddError as exc:  # the run's own step fails: not a feature's fault, and no fallback helps
        raise type(exc)(f"pre-flight, the eager fp32 recover step on random images: {exc}") from exc


def rounding_floor(case: Case, reference) -> tuple[float, float]:
    """(loss error, update error) of the eager fp32 step from the initial images each moved
    by one ulp (up or down at random), against ``reference`` (a ``reference_step`` result):
    what rounding alone changes in this step."""
    gen = torch.Generator().manual_seed(case.seed + 1)
    away = (torch.randint(0, 2, case.init.shape, generator=gen) * 2 - 1).to(case.init) * float("inf")
    moved = dataclasses.replace(case, init=torch.nextafter(case.init, away))
    result, _ = _steps(moved, EAGER_FP32, 1)
    return differences(result, moved.init, reference, case.init)


def differences(result, init, reference, reference_init) -> tuple[float, float]:
    """(loss error, update error) of a steps ``result`` (images, CE, regulariser) from
    ``init`` against ``reference`` from ``reference_init``: the worse relative error of the
    two losses, and that of the image update (images − init)."""
    images, ce, reg = result
    return (worst([relative_error(ce, reference[1]), relative_error(reg, reference[2])]),
            relative_error(images - init, reference[0] - reference_init))


def group(names) -> tuple[Feature, ...]:
    """The features of ``names``: one FEATURES name, or a sequence of them (checked together)."""
    return tuple(BY_NAME[n] for n in ((names,) if isinstance(names, str) else names))


def enabled(features) -> StepOptions:
    """The eager fp32 step with every one of ``features`` on."""
    options = EAGER_FP32
    for feature in features:
        options = feature.enable(options)
    return options


def new_combination(names) -> bool:
    """Whether ``names`` together make a step that no one of them alone makes (graphs turn
    capturable Adam on themselves: cuda_graphs with capturable_adam is cuda_graphs alone)."""
    features = group(names)
    return len(features) > 1 and all(enabled(features) != f.enable(EAGER_FP32) for f in features)


def check(case: Case, features=None, repeats: int = 1, reference=None) -> list[dict]:
    """Rows {"feature", "dtype", "applicable", "passed", "loss_error", "error", "tolerance",
    "loss_tolerance", "loss_floor", "floor", "median_s", "failure"} (the floors: None unless the
    fixed tolerances were missed and ``rounding_floor`` widened them): first "eager_fp32" (the reference, its time),
    then one per entry of ``features`` in its order (default: every feature in FEATURES
    order): a FEATURES name, or a tuple of names checked together (feature "a+b", the
    tolerance of the loosest arithmetic among them). A check that does not run on this device
    is "not applicable": passed None, never True. ``reference``: a ``reference_step`` of
    ``case`` already run (else it runs here; it raising raises)."""
    device = case.init.device
    reference, seconds = reference or reference_step(case, repeats)
    rows = [{"feature": REFERENCE, "dtype": "float32", "applicable": True, "passed": True, "loss_error": 0.0,
             "error": 0.0, "tolerance": 0.0, "loss_tolerance": 0.0, "loss_floor": None, "floor": None,
             "median_s": seconds, "failure": None}]
    floor = None
    for names in (features if features is not None else [f.name for f in FEATURES]):
        checked = group(names)
        dtype = max((arithmetic(f, device) for f in checked), key=TOLERANCE.get)
        row = {"feature": "+".join(f.name for f in checked), "dtype": dtype,
               "applicable": all(applicable(f, device) for f in checked), "passed": None, "loss_error": None,
               "error": None, "tolerance": TOLERANCE[dtype], "loss_tolerance": LOSS_TOLERANCE[dtype],
               "loss_floor": None, "floor": None, "median_s": None, "failure": None}
        rows.append(row)
        if not row["applicable"]:
            continue
        try:
            result, seconds = _steps(case, enabled(checked), repeats)
        except Exception as exc:  # a feature that raises fails its check, it does not stop the others
            row.update(passed=False, failure=f"{type(exc).__name__}: {exc}")
            continue
        loss_error, error = differences(result, case.init, reference, case.init)
        row.update(loss_error=loss_error, error=error, median_s=seconds)
        if not (loss_error <= row["loss_tolerance"] and error <= row["tolerance"]):
            floor = floor or rounding_floor(case, reference)
            row.update(loss_floor=floor[0], floor=floor[1])
            if floor[0] == floor[0] and floor[1] == floor[1]:  # NaN: the fixed tolerances stay
                row["loss_tolerance"] = max(row["loss_tolerance"], min(FLOOR_MARGIN * floor[0], LOSS_CAP))
                row["tolerance"] = max(row["tolerance"], min(FLOOR_MARGIN * floor[1], UPDATE_CAP))
        row["passed"] = bool(loss_error <= row["loss_tolerance"] and error <= row["tolerance"])  # False for NaN
        if not row["passed"]:
            row["failure"] = (f"loss relative error {loss_error:.3g} (tolerance {row['loss_tolerance']:g}), "
                              f"image update {error:.3g} (tolerance {row['tolerance']:g}) against the eager fp32 step")
    return rows
