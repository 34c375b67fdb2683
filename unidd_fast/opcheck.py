"""The fused ops checked against a float64 reference: every available backend of every op, at
given site shapes, with median times (``unidd-fast doctor`` and the run pre-flight use it).

Ops checked (each per backend that runs on the device and dtype):
  site_stats            Ψ (d,d), μ (d,), pooled (n,d) of a feature map (n,d,h,w)
  site_stats_grad       dX of random gradients of the three statistics
  regularized_inverse   (Ψ + βI)^-1 of the site's Ψ
  regularized_inverse_grad  dΨ of a random upstream gradient
  cfm_site_loss         statistics → FLC → CFM filter + signal losses of the site, value and dX
The reference is the torch backend on float64 copies of the same inputs; errors are relative
Frobenius norms, the worst over the sites; times are medians, summed over the sites.

A backend passes within ``TOLERANCE[dtype]``, or within ``FLOOR_MARGIN`` times the *floor*:
the error of the torch backend itself in the same dtype at the same site, measured only when
a backend misses the fixed tolerance there. At an ill-conditioned site (n·h·w < d, as at the
deep sites of a small class-batch: Ψ is rank-deficient and κ = (λmax + β)/β large) fp32
arithmetic itself cannot reach the fixed tolerance (the input gradient of the CFM loss at
(2, 2048, 4, 4) loses 2.9e-3 with the torch backend), and a fast backend must not be failed,
and a run not fall back, for what any fp32 computation loses there. The torch rows keep the
fixed tolerance: such a row failing says that fp32 is not that accurate at this shape.
``FLOOR_CAP`` bounds the widened tolerance, so a wrong result (error of order 1) always fails.
"""
from __future__ import annotations

import statistics
import time

import torch


OPS = ("site_stats", "site_stats_grad", "regularized_inverse", "regularized_inverse_grad", "cfm_site_loss")
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2}  # relative, against float64
FLOOR_MARGIN = 4  # a backend may lose this many times what the torch backend loses in its dtype
FLOOR_CAP = 0.1
BETA = 0.1
CLASSES = 4  # targets of the FLC in cfm_site_loss


def site_inputs(arch: str, image_size: int, batch: int) -> list[tuple[int, int, int, int]]:
    """(n, d, h, w) input of every BatchNorm site of the teacher ``arch`` (torchvision's
    ResNet with the small-image stem at <= 64 px), in hook order, for ``batch`` images."""
    from .pipeline.models import build_model
    from .sites import site_input_shapes

    model = build_model(arch, num_classes=10, image_size=image_size)
    return [(batch,) + s for s in site_input_shapes(model, "bn", (3, image_size, image_size)).values()]


def site_shapes(arch: str, image_size: int, batch: int) -> list[tuple[int, int, int, int]]:
    """Distinct (n, d, h, w) inputs of the teacher's BatchNorm sites for a batch of ``batch`` images."""
    return list(dict.fromkeys(site_inputs(arch, image_size, batch)))


def sync(device: torch.device) -> None:
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


def timed(fn, device, repeats: int):
    """(result of the first call, median seconds over ``repeats`` calls)."""
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
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


def check_ops(device, shapes, dtypes, repeats=3, seed=0, backends=None, progress=None, ops=OPS,
              memory_format=torch.contiguous_format) -> list[dict]:
    """Check every (op, backend, dtype) at the (n, d, h, w) ``shapes``: a list of rows {op,
    backend, dtype, passed, error, tolerance, floor, median_s, failure} (tolerance: the widest
    one applied over the shapes; floor: the worst torch-backend error measured, None when
    none was needed). ``backends`` limits the backends checked (default: every one that runs
    on ``device``); ``memory_format`` is that of the feature maps (a teacher in channels_last
    hands its sites channels_last maps); ``progress`` is called with each row."""
    from .kernels import registry

    device = torch.device(device)
    results = []
    for dtype in dtypes:
        for op in ops:
            names = [name for name, b in registry.BACKENDS.items()
                     if b.available() and b.devices(device) and b.supports(device, dtype)
                     and (backends is None or name in backends)]
            rows = {name: {"op": op, "backend": name, "dtype": str(dtype).replace("torch.", ""),
                           "tolerance": TOLERANCE[dtype], "error": 0.0, "floor": None, "median_s": 0.0,
                           "passed": True, "failure": None} for name in names}
            for shape in shapes:
                def case(dt):  # fresh inputs of this shape in dtype dt, the same numbers for every backend
                    return _cases(shape, dt, device, torch.Generator().manual_seed(seed), memory_format)[op]

                want = case(torch.float64)("torch")

                def error_of(got):
                    return worst(relative_error(g, w) for g, w in zip(got, want))

                errors = {}  # backend -> its error at this shape; "torch" also serves as the floor
                for name, row in rows.items():
                    if row["error"] is None:  # raised at an earlier shape
                        continue
                    try:
                        run = case(dtype)
                        got, seconds = timed(lambda: run(name), device, repeats)
                        errors[name] = error = error_of(got)
                    except Exception as exc:  # a backend that raises fails the check, it does not stop it
                        row.update(passed=False, error=None, failure=f"{shape}: {type(exc).__name__}: {exc}")
                        continue
                    row["median_s"] += seconds
                    row["error"] = worst([row["error"], error])
                    tolerance = TOLERANCE[dtype]
                    if not error <= tolerance and name != "torch":
                        if "torch" not in errors:  # torch not among the backends checked (BACKENDS lists it first)
                            errors["torch"] = error_of(case(dtype)("torch"))
                        floor = errors["torch"]
                        row["floor"] = floor if row["floor"] is None else worst([row["floor"], floor])
                        if floor == floor:
                            tolerance = max(tolerance, min(FLOOR_MARGIN * floor, FLOOR_CAP))
                            row["tolerance"] = max(row["tolerance"], tolerance)
                    if not error <= tolerance:
                        why = "" if name != "torch" else (" (the torch backend itself: this dtype's arithmetic is this far "
                                                          "from float64 at this site; the other backends are judged against it)")
                        row.update(passed=False, failure=f"{shape}: relative error {error:.3g}{why}")
            for row in rows.values():
                results.append(row)
                if progress is not None:
                    progress(row)
    return results
