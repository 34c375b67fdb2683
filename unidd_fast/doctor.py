"""``unidd-fast doctor``: every available backend of every fused op, at the site shapes of a
real teacher, against a float64 torch reference, with median times; the measured times then
steer ``auto`` (``kernels/registry.py``, cached per GPU and software build).

Ops checked (each per backend that runs on the device and dtype):
  site_stats            Ψ (d,d), μ (d,), pooled (n,d) of a feature map (n,d,h,w)
  site_stats_grad       dX of random gradients of the three statistics
  regularized_inverse   (Ψ + βI)^-1 of the site's Ψ
  regularized_inverse_grad  dΨ of a random upstream gradient
  cfm_site_loss         statistics → FLC → CFM filter + signal losses of the site, value and dX
The reference is the torch backend on float64 copies of the same inputs; errors are relative
Frobenius norms, the worst over the teacher's sites; times are medians, summed over the sites.

Then the fast features of the recover step (CUDA graphs, capturable Adam, bf16 autocast,
channels_last) are each run for a few full recover steps (CFM, on the teacher with random
weights and statistics of random images) against the eager fp32 step
(``unidd_fast.pipeline.stepcheck``); a CUDA-only feature is "not applicable" on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from .errors import ConfigError, UniddError

OPS = ("site_stats", "site_stats_grad", "regularized_inverse", "regularized_inverse_grad", "cfm_site_loss")
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2}  # relative, against float64
BETA = 0.1
CLASSES = 4  # targets of the FLC in cfm_site_loss


def site_inputs(arch: str, image_size: int, batch: int) -> list[tuple[int, int, int, int]]:
    """(n, d, h, w) input of every BatchNorm site of the teacher ``arch`` (torchvision's
    ResNet with the small-image stem at <= 64 px), in hook order, for ``batch`` images."""
    from .pipeline.models import build_model
    from .sites import SiteHooks

    model = build_model(arch, num_classes=10, image_size=image_size).eval()
    shapes: list = []
    with SiteHooks(model, "bn", lambda name, x: shapes.append(tuple(x.shape))), torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    return [(batch,) + s[1:] for s in shapes]


def site_shapes(arch: str, image_size: int, batch: int) -> list[tuple[int, int, int, int]]:
    """Distinct (n, d, h, w) inputs of the teacher's BatchNorm sites for a batch of ``batch`` images."""
    return list(dict.fromkeys(site_inputs(arch, image_size, batch)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ (Frobenius, float64; NaN when got is not finite)."""
    got, want = got.detach().double(), want.detach().double()
    scale = float(want.norm())
    return float((got - want).norm()) / (scale if scale > 0 else 1.0)


def worst(errors) -> float:
    """The largest of ``errors``, NaN if any is NaN (``max`` would skip a NaN after the first)."""
    errors = list(errors)
    return float("nan") if any(e != e for e in errors) else max(errors)


def _timed(fn, device, repeats: int):
    """(result of the first call, median seconds over ``repeats`` calls)."""
    times, result = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        result = out if result is None else result
    return result, statistics.median(times)


def _cases(shape, dtype, device, gen, memory_format=torch.contiguous_format):
    """The op functions of one site shape: op -> f(backend) returning a tuple of tensors; the
    feature maps in ``memory_format``."""
    from . import ops
    from .site_loss import cfm_site_loss

    n, d, h, w = shape
    feat = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.3).to(device)
    feat = feat.contiguous(memory_format=memory_format)
    g_psi, g_mu, g_pooled = (torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in ((d, d), (d,), (n, d)))
    targets = torch.randint(0, CLASSES, (n,), generator=gen).to(device)
    psi_real, _, pooled_real = ops.site_stats(torch.randn(shape, generator=gen, dtype=torch.float64).to(device), "torch")
    sig_real = ops.flc(pooled_real, targets, CLASSES)
    g_inv = torch.randn((d, d), generator=gen, dtype=torch.float64).to(device)

    def cast(t):
        return t.to(dtype) if dtype != torch.float64 or t.dtype == torch.float64 else t

    def stats(backend, x=None):
        return tuple(ops.site_stats(cast(feat) if x is None else x, backend))

    def stats_grad(backend):
        x = cast(feat).requires_grad_(True)
        psi, mu, pooled = ops.site_stats(x, backend)
        acc = psi.dtype
        torch.autograd.backward((psi, mu, pooled), (g_psi.to(acc), g_mu.to(acc), g_pooled.to(acc)))
        return (x.grad,)

    psi_in = ops.site_stats(feat, "torch")[0]

    def inverse(backend):
        return (ops.regularized_inverse(cast(psi_in) if dtype != torch.bfloat16 else psi_in.float(), BETA, backend),)

    def inverse_grad(backend):
        A = (psi_in.float() if dtype != torch.float64 else psi_in).clone().requires_grad_(True)
        ops.regularized_inverse(A, BETA, backend).backward(g_inv.to(A.dtype))
        return (A.grad,)

    def loss(backend):
        x = cast(feat).requires_grad_(True)
        psi, _, pooled = ops.site_stats(x, backend)
        acc = psi.dtype
        f, s = cfm_site_loss(psi_real.to(acc), sig_real.to(acc), psi, ops.flc(pooled, targets, CLASSES), BETA, backend)
        (f + s).backward()
        return f.detach(), s.detach(), x.grad

    return {"site_stats": stats, "site_stats_grad": stats_grad, "regularized_inverse": inverse,
            "regularized_inverse_grad": inverse_grad, "cfm_site_loss": loss}


def step_case(device, arch: str, image_size: int, batch: int, seed: int = 0):
    """The recover-step check case of ``arch`` with random weights: a class-batch of ``batch``
    random images, CFM with the default recover settings and the statistics of two batches of
    random images."""
    from .pipeline.config import RecoverConfig
    from .pipeline.models import build_model
    from .pipeline.recover import step_case as run_case
    from .real_stats import collect_real_stats

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classes = max(batch, CLASSES)
    model = build_model(arch, num_classes=classes, image_size=image_size).to(device).eval().requires_grad_(False)
    data = [(torch.randn(batch, 3, image_size, image_size, generator=gen), torch.arange(batch) % classes)
            for _ in range(2)]
    stats = collect_real_stats(model, data, classes, device=device, show_progress=False)
    return run_case(model, stats, RecoverConfig(), True, (0.5,) * 3, (0.25,) * 3, (3, image_size, image_size),
                    batch, device, seed)


def run(device="cpu", arch="resnet18", image_size=32, batch=8, dtypes=None, repeats=3, seed=0,
        shapes=None, backends=None, progress=None, ops=OPS, step_features=True,
        memory_format=torch.contiguous_format) -> dict:
    """Check every (op, backend, dtype) at the teacher's site shapes; returns the report dict
    {"environment", "shapes", "results": [{op, backend, dtype, passed, error, tolerance, median_s,
    failure}], "step_features": [stepcheck.check rows]}. ``shapes`` overrides the teacher's
    (n, d, h, w) list; ``backends`` limits the backends checked (default: every one that runs
    here); ``ops`` the ops; ``memory_format`` that of the feature maps (a run's teacher in
    channels_last hands its sites channels_last maps); ``step_features=False`` leaves out the
    recover-step features."""
    from .kernels import registry

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("doctor --device cuda: no CUDA device is visible; use --device cpu")
    dtypes = dtypes or ([torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32])
    shapes = shapes or site_shapes(arch, image_size, batch)
    results = []
    for dtype in dtypes:
        for op in ops:
            backends = [name for name, b in registry.BACKENDS.items()
                        if b.available() and b.devices(device) and b.supports(device, dtype)
                        and (backends is None or name in backends)]
            for backend in backends:
                row = {"op": op, "backend": backend, "dtype": str(dtype).replace("torch.", ""),
                       "tolerance": TOLERANCE[dtype], "error": 0.0, "median_s": 0.0, "passed": True, "failure": None}
                for shape in shapes:
                    gen = torch.Generator().manual_seed(seed)
                    cases = _cases(shape, dtype, device, gen, memory_format)
                    ref_gen = torch.Generator().manual_seed(seed)
                    ref_cases = _cases(shape, torch.float64, device, ref_gen)
                    try:
                        got, seconds = _timed(lambda: cases[op](backend), device, repeats)
                        want = ref_cases[op]("torch")
                        error = worst(relative_error(g, w) for g, w in zip(got, want))
                    except Exception as exc:  # a backend that raises fails the check, it does not stop it
                        row.update(passed=False, error=None, failure=f"{shape}: {type(exc).__name__}: {exc}")
                        break
                    row["median_s"] += seconds
                    row["error"] = worst([row["error"], error])
                    if not error <= TOLERANCE[dtype]:
                        row.update(passed=False, failure=f"{shape}: relative error {error:.3g}")
                results.append(row)
                if progress is not None:
                    progress(row)
    features = []
    if step_features:
        from .pipeline import stepcheck

        features = stepcheck.check(step_case(device, arch, image_size, batch, seed), repeats=repeats)
        if progress is not None:
            for row in features:
                progress({"op": "recover_step", "backend": row["feature"], "dtype": row["dtype"],
                          "passed": row["passed"]})
    return {"environment": registry.environment_key(device), "arch": arch, "image_size": image_size,
            "batch": batch, "shapes": [list(s) for s in shapes], "results": results, "step_features": features}


def measured_timings(report: dict) -> dict:
    """{registry op: {backend: seconds}} of the fp32 rows that passed (what ``auto`` ranks)."""
    timings: dict = {}
    for row in report["results"]:
        if row["passed"] and row["dtype"] == "float32" and row["op"] in ("site_stats", "site_stats_grad",
                                                                          "regularized_inverse"):
            timings.setdefault(row["op"], {})[row["backend"]] = row["median_s"]
    return timings


def verdict(row: dict) -> str:
    """"pass", "FAIL", "n/a" (a check that cannot run on this device: never a pass) or "ref"
    (the eager fp32 step the step features are compared with)."""
    from .pipeline.stepcheck import REFERENCE

    if row.get("feature") == REFERENCE:
        return "ref"
    return "n/a" if row["passed"] is None else "pass" if row["passed"] else "FAIL"


def _number(value, scale=1.0, form=".2e") -> str:
    return "-" if value is None else format(scale * value, form)


def table(report: dict) -> str:
    lines = [f"{'op':26} {'backend':8} {'dtype':9} {'result':6} {'error':>10} {'median ms':>10}"]
    for row in report["results"]:
        lines.append(f"{row['op']:26} {row['backend']:8} {row['dtype']:9} {verdict(row):6} "
                     f"{_number(row['error']):>10} {_number(row['median_s'], 1e3, '.3f'):>10}")
        if row["failure"]:
            lines.append(f"    {row['failure']}")
    if report.get("step_features"):
        lines += ["", f"{'recover step feature':26} {'dtype':9} {'result':6} {'loss error':>10} {'update err':>10} "
                      f"{'ms/step':>10}"]
        for row in report["step_features"]:
            lines.append(f"{row['feature']:26} {row['dtype']:9} {verdict(row):6} {_number(row['loss_error']):>10} "
                         f"{_number(row['error']):>10} {_number(row['median_s'], 1e3, '.3f'):>10}")
            if row["failure"]:
                lines.append(f"    {row['failure']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unidd-fast doctor", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when visible")
    p.add_argument("--arch", choices=("resnet18", "resnet50", "convnet"), default="resnet18")
    p.add_argument("--image-size", type=int, default=32, metavar="N")
    p.add_argument("--batch", type=int, default=8, metavar="N", help="images per class-batch (n of every site)")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="timed calls per op (median)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random inputs and weights")
    p.add_argument("--backends", metavar="LIST", help="comma-separated backends to check (default: all that run here)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--interpret", action="store_true",
                   help="on the CPU, run the Triton kernels in the Triton interpreter (slow: keep shapes tiny)")
    p.add_argument("--no-cache", action="store_true", help="on CUDA, do not store the times that steer auto")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.interpret:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("unidd-fast doctor: error: --interpret must be chosen before triton is imported", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    if min(args.image_size, args.batch, args.repeats) < 1:
        print("unidd-fast doctor: error: --image-size, --batch and --repeats must be >= 1", file=sys.stderr)
        return 2
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    from .kernels import registry

    backends = None if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends or ()) - set(registry.BACKENDS))
    if unknown:
        print(f"unidd-fast doctor: error: unknown backends {unknown}; choose from {list(registry.BACKENDS)}",
              file=sys.stderr)
        return 2
    try:
        report = run(device, args.arch, args.image_size, args.batch, repeats=args.repeats, seed=args.seed,
                     backends=backends,
                     progress=lambda row: print(f"  {row['op']} {row['backend']} {row['dtype']}: {verdict(row)}",
                                                file=sys.stderr))
    except UniddError as exc:
        print(f"unidd-fast doctor: error: {exc}", file=sys.stderr)
        return 2
    print(table(report))
    if device == "cuda" and not args.no_cache:
        print(f"auto will use the measured order: {registry.save_timings(report['environment'], measured_timings(report))}")
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, path)
    return 0 if all(row["passed"] is not False for row in report["results"] + report["step_features"]) else 1
