"""H100 roofline PREDICTIONS for the Triton kernels, at ResNet-18 geometry (the model:
``unidd_fast/roofline/ops.py``; this script prints its tables).

For every kernel: FLOPs (at the precision it runs: TF32, 3xTF32 = three TF32 products,
bf16x4 / bf16x3 = four / three bf16 products, or fp32 SIMT), HBM bytes, predicted time = max(FLOPs / peak, bytes / bandwidth), and which term
is larger. Nothing here is measured on a GPU; the Newton–Schulz iteration counts are
measured (CPU, float64) on synthetic covariances.

    python bench/roofline.py [--dtype bf16|fp32] [--markdown]

Geometries: CIFAR ResNet-18 (32×32, batch 100) and ImageNet ResNet-18 (224×224, batch 100
and 200); sites = the inputs of the 20 BatchNorm2d (d = 64, 128, 256, 512).

The full recover step: ``roofline_step.py`` (its model: ``unidd_fast/roofline/step.py``).
"""
from __future__ import annotations

from collections import Counter
import math

import torch
import torchvision

from common import prediction_args, report
from sites import cifar_resnet18, site_shapes
from unidd_fast.roofline.hardware import PEAK, SMS, term
from unidd_fast.roofline.ops import (reg_inverse, reg_inverse_bwd, site_stats_bwd, site_stats_fwd,
                                     torch_site_stats_bwd, torch_site_stats_fwd)


def geometries():
    """name -> {site: (n, d, h, w)} for the three workloads."""
    cifar = site_shapes(cifar_resnet18(), 32)
    imagenet = site_shapes(torchvision.models.resnet18().eval(), 224)
    out = {}
    for label, shapes, batch in (("CIFAR 32x32 b100", cifar, 100), ("ImageNet 224 b100", imagenet, 100),
                                 ("ImageNet 224 b200", imagenet, 200)):
        out[label] = {k: (batch,) + tuple(v[1:]) for k, v in shapes.items()}
    return out


def newton_schulz(k, d, iters):
    """X ← X (2I − A X): two batched GEMMs of 2d³ per iteration, fp32-accurate via 3xTF32,
    on k·(d/128)² output tiles of 128×128 (a fraction of the 132 SMs for these sizes)."""
    tiles = k * math.ceil(d / 128) ** 2
    return term(k * iters * 4 * d ** 3 * 3, PEAK["tf32"] * min(1.0, tiles / SMS), k * iters * 4 * d * d * 4)


def ns_iterations(d: int, beta: float, tol: float = 1e-6, gen=None, max_iter: int = 200) -> int:
    """Newton–Schulz iterations to ‖I − (A + βI) X‖₂ ≤ tol from X₀ = 2/(λmax+λmin)·I (the
    optimal scaled start; with no host sync λmax would only be bounded, e.g. by the trace,
    which costs more), measured in float64 on a rank-deficient covariance with ‖Ψ‖ = 1."""
    X = torch.randn(d // 2, d, generator=gen, dtype=torch.float64)
    psi = X.T @ X
    psi /= torch.linalg.matrix_norm(psi, ord=2)
    A = psi + beta * torch.eye(d, dtype=torch.float64)
    lam = torch.linalg.eigvalsh(A)
    Y = 2 / (lam[-1] + lam[0]) * torch.eye(d, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    for it in range(1, max_iter + 1):
        Y = Y @ (2 * eye - A @ Y)
        if torch.linalg.matrix_norm(eye - A @ Y, ord=2) <= tol:
            return it
    return max_iter


def main(argv=None):
    args = prediction_args(__doc__, argv)
    dtype = args.dtype

    rows, totals = [], []
    for geo, shapes in geometries().items():
        widths = {}
        for site, (n, d, h, w) in shapes.items():
            widths.setdefault(d, []).append(site)
        # per distinct site shape: count × per-site kernels
        by_shape = Counter(shapes.values())
        total_ours = total_torch = 0.0
        for (n, d, h, w), count in by_shape.items():
            for kernel, model in (("site_stats fwd", site_stats_fwd), ("site_stats bwd", site_stats_bwd),
                                  ("torch composite fwd", torch_site_stats_fwd),
                                  ("torch composite bwd", torch_site_stats_bwd)):
                r = model(n, d, h, w, dtype)
                rows.append({"geometry": geo, "kernel": kernel, "shape": f"{n}x{d}x{h}x{w}", "sites": count, **r})
                if kernel.startswith("torch"):
                    total_torch += count * r["predicted_us"]
                else:
                    total_ours += count * r["predicted_us"]
        inv_total = 0.0
        for d, group in sorted(widths.items()):
            for kernel, model in (("reg_inverse (Cholesky)", reg_inverse), ("reg_inverse bwd (torch GEMMs)", reg_inverse_bwd)):
                r = model(len(group), d)
                rows.append({"geometry": geo, "kernel": kernel, "shape": f"{len(group)}x{d}x{d}", "sites": len(group), **r})
                inv_total += r["predicted_us"]
        totals.append({"geometry": geo, "site_stats_triton_us": total_ours, "site_stats_torch_us": total_torch,
                       "predicted_speedup": total_torch / total_ours, "reg_inverse_fwd_bwd_us": inv_total})

    columns = ["geometry", "kernel", "shape", "sites", "flops", "bytes", "t_compute_us", "t_memory_us",
               "latency_floor_us", "predicted_us", "bound"]
    report(f"roofline_{dtype}", rows, columns, extra={"totals": totals, "label": "PREDICTION (H100 roofline)"})
    print()
    report(f"roofline_{dtype}_totals", totals, list(totals[0]))

    gen = torch.Generator().manual_seed(0)
    ns_rows = []
    for beta in (1e-1, 1e-2, 1e-3, 1e-6):
        iters = ns_iterations(256, beta, gen=gen)
        ns = newton_schulz(5, 512, iters)
        chol = reg_inverse(5, 512)
        ns_rows.append({"beta": beta, "kappa": (1 + beta) / beta, "ns_iterations_measured": iters,
                        "ns_predicted_us": ns["predicted_us"], "cholesky_predicted_us": chol["predicted_us"],
                        "ns_fp32_error_bound": (1 + beta) / beta * 2 ** -24})
    print()
    report("roofline_newton_schulz", ns_rows, list(ns_rows[0]))
    if args.markdown:
        print_markdown(rows, totals, ns_rows, dtype)


def print_markdown(rows, totals, ns_rows, dtype):
    print("\n| geometry | kernel | shape | sites | GFLOP | MB | compute µs | memory µs | latency µs | predicted µs | bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lat = f"{r['latency_floor_us']:.0f}" if "latency_floor_us" in r else ""
        print(f"| {r['geometry']} | {r['kernel']} | {r['shape']} | {r['sites']} | {r['flops'] / 1e9:.2f} | "
              f"{r['bytes'] / 1e6:.1f} | {r['t_compute_us']:.1f} | {r['t_memory_us']:.1f} | {lat} | "
              f"{r['predicted_us']:.1f} | {r['bound']} |")
    print(f"\n| geometry ({dtype} features) | site_stats fwd+bwd, Triton (µs) | torch composite (µs) | ratio | reg_inverse fwd+bwd, all widths (µs) |")
    print("|---|---|---|---|---|")
    for t in totals:
        print(f"| {t['geometry']} | {t['site_stats_triton_us']:.0f} | {t['site_stats_torch_us']:.0f} | "
              f"{t['predicted_speedup']:.1f}× | {t['reg_inverse_fwd_bwd_us']:.0f} |")
    print("\n| β (‖Ψ‖ = 1) | κ | Newton–Schulz iterations (measured, d = 256) | NS predicted µs (5×512) | Cholesky predicted µs (5×512) | NS fp32 error bound κ·2⁻²⁴ |")
    print("|---|---|---|---|---|---|")
    for r in ns_rows:
        print(f"| {r['beta']:g} | {r['kappa']:.0f} | {r['ns_iterations_measured']} | {r['ns_predicted_us']:.0f} | "
              f"{r['cholesky_predicted_us']:.0f} | {r['ns_fp32_error_bound']:.1e} |")


if __name__ == "__main__":
    main()
