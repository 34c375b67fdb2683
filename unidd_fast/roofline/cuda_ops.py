"""Cost of the CUDA extension's kernels (csrc/, docs/cuda.md) and of the cuSOLVER inverse the
torch backend runs, per call: FLOPs and bytes counted from the kernels' actual tiling
(padding included), roofline terms of ``hardware`` plus, for the inverses, a latency model
whose per-step constants are ASSUMPTIONS (below) until a GPU measures them. H100
PREDICTIONS, nothing measured.

The tile sizes are read from the sources in csrc/ (one definition); the forward statistics'
row-chunk count is an argument, the launcher's own rule (the bench gets it from the CPU
build of the kernels).
"""
from __future__ import annotations

import functools
import re

from unidd_fast.kernels._utils import CSRC

from .hardware import ELEM, HBM, PEAK, SMS, term

BLOCKS_PER_SM = 2  # __launch_bounds__(256, 2) and <= 34 KB shared memory per block
SM_FP32 = PEAK["fp32"] / SMS
# ASSUMPTIONS of the latency model (H100 at ~1.75 GHz), to be replaced by measurements:
PASS_S = 150 / 1.755e9       # one pass of the shared-memory tile factorisation / inversion:
                             # a barrier, two shared loads, <= 16 predicated FMAs per thread
TILE_LOAD_S = 0.5e-6         # two 64x64 fp32 tiles from L2 into shared memory, first-use latency
LAUNCH_S = 2.0e-6            # kernel-to-kernel gap on a stream (CUDA graph: ~1-2 µs, eager: ~4 µs)
CUSOLVER_CALL_S = 10e-6      # one cusolverDn potrf/potri call: host API + >= 2 dependent kernels
ASSUMPTIONS = {"PASS_S": PASS_S, "TILE_LOAD_S": TILE_LOAD_S, "LAUNCH_S": LAUNCH_S, "CUSOLVER_CALL_S": CUSOLVER_CALL_S}


@functools.cache
def tiles() -> tuple[int, int, int]:
    """(inverse tile, statistics channel tile TC, statistics row stage BK) of csrc/."""
    inv = int(re.search(r"UNIDD_INV_TILE = (\d+)", (CSRC / "unidd_cuda.h").read_text()).group(1))
    stats = (CSRC / "site_stats.cu").read_text()
    tc, bk = (int(re.search(rf"constexpr int {n} = (\d+);", stats).group(1)) for n in ("TC", "BK"))
    return inv, tc, bk


def stats_fwd(n, d, h, w, dtype, chunks: int):
    """gram_kernel: lower 64x64 channel-tile pairs x row chunks, 2·rows·64² FMA-FLOPs per pair
    (rows padded to BK); X read from HBM once (the other tiles' re-reads of a chunk run
    together and hit L2), partial Grams and per-chunk sums written and read back once; 4
    launches. ``chunks``: the launcher's row-chunk count."""
    _, tc, bk = tiles()
    N, nt = n * h * w, -(-d // tc)
    pairs = nt * (nt + 1) // 2
    rows = -(-N // bk) * bk
    flops = 2 * rows * tc ** 2 * pairs
    nbytes = N * d * ELEM[dtype] + 2 * chunks * (d * d + 3 * d) * 4 + 3 * n * d * 4 + d * d * 8
    occupancy = min(1.0, pairs * chunks / (SMS * BLOCKS_PER_SM))
    r = term(flops, PEAK["fp32"] * occupancy, nbytes)
    r["predicted_us"] += 4 * LAUNCH_S * 1e6
    r["l2_bytes"] = N * tc * ELEM[dtype] * nt * nt
    return r


def stats_bwd(n, d, h, w, dtype):
    """backward_kernel: (N/64) x (d/64) blocks, K = d in stages of BK: 2·N·d_p² FLOPs; X read
    and dX written once each (the d/64 column blocks of a row block share X through L2)."""
    _, tc, bk = tiles()
    N = n * h * w
    rows, dp, kp = -(-N // tc) * tc, -(-d // tc) * tc, -(-d // bk) * bk
    flops = 2 * rows * dp * kp
    nbytes = 2 * N * d * ELEM[dtype] + n * d * 4 + d * d * 4 * 2
    r = term(flops, PEAK["fp32"], nbytes)
    r["predicted_us"] += LAUNCH_S * 1e6
    return r


def inverse_launches(ds):
    """Per launch of csrc/chol_inverse.cu for a batch of sizes ``ds``: the list of blocks, each
    as (tile GEMMs, serial passes). A tile GEMM is a 64x64x64 product (2·64³ FLOPs)."""
    tile = tiles()[0]
    nts = [-(-d // tile) for d in ds]
    nt = max(nts)
    launches = [[(0, 0)] * sum(m * (m + 1) // 2 for m in nts)]  # pack
    for s in range(nt):
        factor, panel = [], []
        for m in nts:
            if s >= m:
                continue
            factor.append((1 if s else 0, 2 * (tile + 1)))          # diagonal: update, factor, invert
            factor += [(1, 0)] * ((m - s) * (m - s + 1) // 2 - 1 if s else 0)  # trailing update of step s-1
            panel += [(1, 0)] * (m - s - 1)                               # L[i,s] = A[i,s] M_ss^T
            panel += [(s - l + 1, 0) for l in range(s)]                   # M[s,l]
        launches += [factor, panel]
    launches.append([(m - i, 0) for m in nts for i in range(m) for _ in range(i + 1)])  # lauum
    return [blocks for blocks in launches if blocks]


def inverse_model(ds):
    """Predicted time of one batched inverse: per launch, the slower of its longest block and
    its total work spread over the GPU, plus the launch gap; FLOPs at fp32 SIMT."""
    tile = tiles()[0]
    gemm_s = 2 * tile ** 3 / SM_FP32
    total = flops = 0.0
    launches = inverse_launches(ds)
    for blocks in launches:
        longest = max(g * gemm_s + (TILE_LOAD_S if g else 0) + p * PASS_S for g, p in blocks)
        spread = sum(g for g, _ in blocks) * gemm_s / SMS  # all SMs busy at their fp32 rate
        total += max(longest, spread) + LAUNCH_S
        flops += sum(g for g, _ in blocks) * 2 * tile ** 3
    nbytes = sum(4 * (2 * d * d + 2 * (-(-d // tile) * tile) ** 2 * 3) for d in ds)
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
