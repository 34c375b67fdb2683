"""``unidd-fast doctor``: every available backend of every fused op, at the site shapes of a
real teacher, against a float64 torch reference, with median times; the measured times then
steer ``auto`` (``kernels/registry.py``, cached per GPU and software build).

The op checks themselves are ``unidd_fast.opcheck`` (which the run pre-flight shares).

Then the fast features of the recover step (CUDA graphs, capturable Adam, bf16 autocast,
channels_last) are each run for a few full recover steps (CFM, on the teacher with random
weights and statistics of random images) against the eager fp32 step
(``unidd_fast.pipeline.stepcheck``); a CUDA-only feature is "not applicable" on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .errors import ConfigError, UniddError
from .opcheck import CLASSES, OPS, check_ops, site_shapes


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
    {"environment", "shapes", "results": [{op, backend, dtype, passed, error, tolerance, floor,
    median_s, failure}], "step_features": [stepcheck.check rows]} (``opcheck.check_ops``: the
    tolerance widens to the torch backend's own error at an ill-conditioned site). ``shapes`` overrides the teacher's
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
    results = check_ops(device, shapes, dtypes, repeats, seed, backends, progress, ops, memory_format)
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
    lines = [f"{'op':26} {'backend':8} {'dtype':9} {'result':6} {'error':>10} {'tolerance':>10} {'median ms':>10}"]
    for row in report["results"]:
        lines.append(f"{row['op']:26} {row['backend']:8} {row['dtype']:9} {verdict(row):6} "
                     f"{_number(row['error']):>10} {_number(row['tolerance']):>10} "
                     f"{_number(row['median_s'], 1e3, '.3f'):>10}")
        if row["failure"]:
            lines.append(f"    {row['failure']}")
    if report.get("step_features"):
        lines += ["", f"{'recover step feature':26} {'dtype':9} {'result':6} {'loss error':>10} {'loss tol':>10} "
                      f"{'update err':>10} {'update tol':>10} {'ms/step':>10}"]
        for row in report["step_features"]:
            lines.append(f"{row['feature']:26} {row['dtype']:9} {verdict(row):6} {_number(row['loss_error']):>10} "
                         f"{_number(row['loss_tolerance']):>10} {_number(row['error']):>10} "
                         f"{_number(row['tolerance']):>10} {_number(row['median_s'], 1e3, '.3f'):>10}")
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
