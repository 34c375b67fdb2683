"""H100 PREDICTIONS for the CUDA kernels of csrc/, at ResNet-18 geometry. Nothing here ran
on a GPU: FLOPs and bytes are counted from the kernels' actual tiling (padding included),
times are roofline terms (H100 SXM peaks) plus, for the inverse, a latency model whose
per-step constants are ASSUMPTIONS until a GPU measures them (the model:
``unidd_fast/roofline/cuda_ops.py``; this script prints its tables).

    python bench/bench_cuda_roofline.py [--dtype bf16|fp32] [--markdown]

Kernels (docs/cuda.md): site statistics forward (gram + vec + psi kernels) and backward, in
fp32 SIMT FMAs (no tensor cores); batched regularized inverse of all 20 BN sites in one set
of 2·nt + 2 launches (nt = ⌈max d / 64⌉), compared with the alternative it replaces:
cuSOLVER, which has no batched inverse (no potriBatched; potrsBatched takes one right-hand
side), so per matrix potrf + potri, serialised on the stream.
"""
from __future__ import annotations

from collections import Counter
import functools

from common import OUT, prediction_args, report
from roofline import geometries
from unidd_fast.kernels.cuda.emulator import EmulatedKernels, build_emulator
from unidd_fast.roofline.cuda_ops import ASSUMPTIONS, cusolver_model, inverse_model, stats_bwd, stats_fwd
from unidd_fast.roofline.ops import torch_site_stats_bwd, torch_site_stats_fwd


@functools.lru_cache(maxsize=None)
def stats_chunks(n, d, hw):
    """The forward's row-chunk count, from the launcher itself (csrc/site_stats.cu, via the
    CPU build of the kernels: one rule, no copy of it here)."""
    return EmulatedKernels(build_emulator(OUT)).stats_chunks(n, d, hw)


def main(argv=None):
    args = prediction_args(__doc__, argv)
    rows, totals = [], []
    for geo, shapes in geometries().items():
        by_shape = Counter(shapes.values())
        ours = torch_total = 0.0
        for (n, d, h, w), count in by_shape.items():
            cuda_fwd = functools.partial(stats_fwd, chunks=stats_chunks(n, d, h * w))
            for kernel, model in (("stats fwd (cuda)", cuda_fwd), ("stats bwd (cuda)", stats_bwd),
                                  ("torch composite fwd", torch_site_stats_fwd),
                                  ("torch composite bwd", torch_site_stats_bwd)):
                r = model(n, d, h, w, args.dtype)
                rows.append({"geometry": geo, "kernel": kernel, "shape": f"{n}x{d}x{h}x{w}", "sites": count, **r})
                if "cuda" in kernel:
                    ours += count * r["predicted_us"]
                else:
                    torch_total += count * r["predicted_us"]
        ds = [shape[1] for shape in shapes.values()]
        inv, alt = inverse_model(ds), cusolver_model(ds)
        shape = "+".join(f"{ds.count(d)}x{d}" for d in sorted(set(ds)))
        rows.append({"geometry": geo, "kernel": "inverse, batched (cuda)", "shape": shape, "sites": len(ds), **inv})
        rows.append({"geometry": geo, "kernel": "inverse, cuSOLVER per matrix", "shape": shape, "sites": len(ds), **alt})
        totals.append({"geometry": geo, "stats_cuda_us": ours, "stats_torch_us": torch_total,
                       "stats_ratio": torch_total / ours, "inverse_cuda_us": inv["predicted_us"],
                       "inverse_cusolver_us": alt["predicted_us"], "inverse_launches": inv["launches"]})
    columns = ["geometry", "kernel", "shape", "sites", "flops", "bytes", "t_compute_us", "t_memory_us", "predicted_us",
               "bound"]
    report(f"cuda_roofline_{args.dtype}", rows, columns,
           extra={"label": "PREDICTION (H100 roofline + latency model)", "assumptions": ASSUMPTIONS, "totals": totals})
    print()
    report(f"cuda_roofline_{args.dtype}_totals", totals, list(totals[0]))
    if args.markdown:
        print("\n| geometry | kernel | shape | GFLOP | MB | compute µs | memory µs | predicted µs | bound |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['geometry']} | {r['kernel']} | {r['shape']} | {r['flops'] / 1e9:.2f} | {r['bytes'] / 1e6:.1f} "
                  f"| {r['t_compute_us']:.1f} | {r['t_memory_us']:.1f} | {r['predicted_us']:.1f} | {r['bound']} |")
        print(f"\n| geometry ({args.dtype}) | stats fwd+bwd cuda µs | torch µs | ratio | inverse cuda µs (launches) "
              "| cuSOLVER per matrix µs |")
        print("|---|---|---|---|---|---|")
        for t in totals:
            print(f"| {t['geometry']} | {t['stats_cuda_us']:.0f} | {t['stats_torch_us']:.0f} | {t['stats_ratio']:.1f}× "
                  f"| {t['inverse_cuda_us']:.0f} ({t['inverse_launches']}) | {t['inverse_cusolver_us']:.0f} |")


if __name__ == "__main__":
    main()
