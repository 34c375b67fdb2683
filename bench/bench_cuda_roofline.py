"""H100 PREDICTIONS for the CUDA kernels of csrc/, at ResNet-18 geometry. Nothing here ran
on a GPU: FLOPs and bytes are counted from the kernels' actual tiling (padding included),
times are roofline terms (H100 SXM peaks from roofline.py) plus, for the inverse, a latency
model whose per-step constants are ASSUMPTIONS (below) until a GPU measures them.

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
import re

from common import OUT, prediction_args, report
from roofline import HBM, PEAK, SMS, geometries, term, torch_site_stats_bwd, torch_site_stats_fwd
from unidd_fast.kernels._utils import CSRC
from unidd_fast.kernels.cuda.emulator import EmulatedKernels, build_emulator

ELEM = {"bf16": 2, "fp32": 4}
INV_TILE = int(re.search(r"UNIDD_INV_TILE = (\d+)", (CSRC / "unidd_cuda.h").read_text()).group(1))
STATS_TILE, STATS_BK = (int(re.search(rf"constexpr int {n} = (\d+);", (CSRC / "site_stats.cu").read_text()).group(1))
                        for n in ("TC", "BK"))
BLOCKS_PER_SM = 2  # __launch_bounds__(256, 2) and <= 34 KB shared memory per block
SM_FP32 = PEAK["fp32"] / SMS
# ASSUMPTIONS of the latency model (H100 at ~1.75 GHz), to be replaced by measurements:
PASS_S = 150 / 1.755e9       # one pass of the shared-memory tile factorisation / inversion:
                             # a barrier, two shared loads, <= 16 predicated FMAs per thread
TILE_LOAD_S = 0.5e-6         # two 64x64 fp32 tiles from L2 into shared memory, first-use latency
LAUNCH_S = 2.0e-6            # kernel-to-kernel gap on a stream (CUDA graph: ~1-2 µs, eager: ~4 µs)
CUSOLVER_CALL_S = 10e-6      # one cusolverDn potrf/potri call: host API + >= 2 dependent kernels


@functools.lru_cache(maxsize=None)
def stats_chunks(n, d, hw):
    """The forward's row-chunk count, from the launcher itself (csrc/site_stats.cu, via the
    CPU build of the kernels: one rule, no copy of it here)."""
    return EmulatedKernels(build_emulator(OUT)).stats_chunks(n, d, hw)


def stats_fwd(n, d, h, w, dtype):
    """gram_kernel: lower 64x64 channel-tile pairs x row chunks, 2·rows·64² FMA-FLOPs per pair
    (rows padded to BK); X read from HBM once (the other tiles' re-reads of a chunk run
    together and hit L2), partial Grams and per-chunk sums written and read back once; 4 launches."""
    N, nt = n * h * w, -(-d // STATS_TILE)
    pairs, chunks = nt * (nt + 1) // 2, stats_chunks(n, d, h * w)
    rows = -(-N // STATS_BK) * STATS_BK
    flops = 2 * rows * STATS_TILE ** 2 * pairs
    nbytes = N * d * ELEM[dtype] + 2 * chunks * (d * d + 3 * d) * 4 + 3 * n * d * 4 + d * d * 8
    occupancy = min(1.0, pairs * chunks / (SMS * BLOCKS_PER_SM))
    r = term(flops, PEAK["fp32"] * occupancy, nbytes)
    r["predicted_us"] += 4 * LAUNCH_S * 1e6
    r["l2_bytes"] = N * STATS_TILE * ELEM[dtype] * nt * nt
    return r


def stats_bwd(n, d, h, w, dtype):
    """backward_kernel: (N/64) x (d/64) blocks, K = d in stages of BK: 2·N·d_p² FLOPs; X read
    and dX written once each (the d/64 column blocks of a row block share X through L2)."""
    N = n * h * w
    rows, dp, kp = -(-N // STATS_TILE) * STATS_TILE, -(-d // STATS_TILE) * STATS_TILE, -(-d // STATS_BK) * STATS_BK
    flops = 2 * rows * dp * kp
    nbytes = 2 * N * d * ELEM[dtype] + n * d * 4 + d * d * 4 * 2
    r = term(flops, PEAK["fp32"], nbytes)
    r["predicted_us"] += LAUNCH_S * 1e6
    return r


def inverse_launches(ds):
    """Per launch of csrc/chol_inverse.cu for a batch of sizes ``ds``: the list of blocks, each
    as (tile GEMMs, serial passes). A tile GEMM is a 64x64x64 product (2·64³ FLOPs)."""
    nts = [-(-d // INV_TILE) for d in ds]
    nt = max(nts)
    launches = [[(0, 0)] * sum(m * (m + 1) // 2 for m in nts)]  # pack
    for s in range(nt):
        factor, panel = [], []
        for m in nts:
            if s >= m:
                continue
            factor.append((1 if s else 0, 2 * (INV_TILE + 1)))          # diagonal: update, factor, invert
            factor += [(1, 0)] * ((m - s) * (m - s + 1) // 2 - 1 if s else 0)  # trailing update of step s-1
            panel += [(1, 0)] * (m - s - 1)                               # L[i,s] = A[i,s] M_ss^T
            panel += [(s - l + 1, 0) for l in range(s)]                   # M[s,l]
        launches += [factor, panel]
    launches.append([(m - i, 0) for m in nts for i in range(m) for _ in range(i + 1)])  # lauum
    return [blocks for blocks in launches if blocks]


def inverse_model(ds):
    """Predicted time of one batched inverse: per launch, the slower of its longest block and
    its total work spread over the GPU, plus the launch gap; FLOPs at fp32 SIMT."""
    gemm_s = 2 * INV_TILE ** 3 / SM_FP32
    total = flops = 0.0
    launches = inverse_launches(ds)
    for blocks in launches:
        longest = max(g * gemm_s + (TILE_LOAD_S if g else 0) + p * PASS_S for g, p in blocks)
        spread = sum(g for g, _ in blocks) * gemm_s / SMS  # all SMs busy at their fp32 rate
        total += max(longest, spread) + LAUNCH_S
        flops += sum(g for g, _ in blocks) * 2 * INV_TILE ** 3
    nbytes = sum(4 * (2 * d * d + 2 * (-(-d // INV_TILE) * INV_TILE) ** 2 * 3) for d in ds)
    return {"launches": len(launches), "flops": flops, "bytes": nbytes, "t_compute_us": flops / PEAK["fp32"] * 1e6,
            "t_memory_us": nbytes / HBM * 1e6, "predicted_us": total * 1e6, "bound": "latency"}


def cusolver_model(ds, dtype: str = "fp32"):
    """The alternative: per matrix cusolverDn?potrf + the inverse from the factor on one
    stream. Lower bound: the API/launch cost of 2 calls per matrix plus, per matrix, the same
    serial chain of pivot passes (d columns factored, d inverted) as ours, summed — the
    calls of one stream do not overlap. ``dtype`` "fp64": the float64 inverse the custom op
    runs when it promotes fp32 input (always inside a CUDA-graph capture), with its casts
    (fp32 in, fp64 copy, fp64 result, fp32 out)."""
    e = 8 if dtype == "fp64" else 4
    t = sum(2 * CUSOLVER_CALL_S + 2 * d * PASS_S for d in ds)
    flops = sum(d ** 3 for d in ds)
    nbytes = sum(3 * d * d * e + (2 * d * d * (4 + 8) if dtype == "fp64" else 0) for d in ds)
    return {"launches": (4 if dtype == "fp64" else 2) * len(ds), "flops": flops, "bytes": nbytes,
            "t_compute_us": flops / PEAK[dtype] * 1e6, "t_memory_us": nbytes / HBM * 1e6,
            "predicted_us": t * 1e6 + nbytes / HBM * 1e6, "bound": "latency"}


def main(argv=None):
    args = prediction_args(__doc__, argv)
    rows, totals = [], []
    for geo, shapes in geometries().items():
        by_shape = Counter(shapes.values())
        ours = torch_total = 0.0
        for (n, d, h, w), count in by_shape.items():
            for kernel, model in (("stats fwd (cuda)", stats_fwd), ("stats bwd (cuda)", stats_bwd),
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
    assumptions = {"PASS_S": PASS_S, "TILE_LOAD_S": TILE_LOAD_S, "LAUNCH_S": LAUNCH_S,
                   "CUSOLVER_CALL_S": CUSOLVER_CALL_S}
    report(f"cuda_roofline_{args.dtype}", rows, columns,
           extra={"label": "PREDICTION (H100 roofline + latency model)", "assumptions": assumptions, "totals": totals})
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
