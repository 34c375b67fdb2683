"""Cost of the fused ops as the Triton kernels and the torch composites run them, per call:
FLOPs at the precision each kernel's dots run (read from the kernels' own helpers, so a
change there changes the prediction), HBM bytes, and the roofline term of ``hardware``
(H100 PREDICTIONS). The CUDA extension's kernels and cuSOLVER are in ``cuda_ops``.

Every function takes the feature map's (n, d, h, w) and its dtype name ("bf16" | "fp32"),
or the batch of k matrices of width d, and returns ``hardware.term``'s dict (µs).
"""
from __future__ import annotations

import math

import torch

from unidd_fast.kernels.triton.reg_inverse import BLOCK as CHOL_B
from unidd_fast.kernels.triton.site_stats import (BLOCK_R, REDUCE_BLOCK, block_d, dot_precision, grad_precision,
                                                  num_chunks, reduce_group)

from .hardware import ELEM, HBM, PEAK, SMS, term

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# (tensor-core passes, peak) per input precision of the Triton kernels' dots
PRECISION = {"tf32x3": (3, PEAK["tf32"]), "tf32": (1, PEAK["tf32"]), "bf16x3": (3, PEAK["bf16"]),
             "bf16x4": (4, PEAK["bf16"]), "ieee": (1, PEAK["fp32"])}

# ASSUMPTIONS of the Cholesky latency model, to be replaced by measurements: one serial
# step of the in-register B×B tile factorisation/inverse (a masked row/column extraction =
# two cross-warp reductions, ~300 cycles at 1.75 GHz), and one dependent tile round trip
# (L2 load -> tl.dot -> store, ~500 cycles).
TILE_STEP_S = 0.17e-6
ROUND_TRIP_S = 0.3e-6


def site_stats_fwd(n, d, h, w, dtype):
    """One pass over X (HBM once: the nb re-reads of other channel blocks hit the 50 MB L2;
    every map of these geometries that needs them, d ≥ 128, is ≤ 40 MB), Gram on tensor cores
    over the I ≤ J tile pairs, padded rows included, at the occupancy of the launcher's grid,
    with the kernel's dot precision (bf16 maps: bf16x4, four bf16 products; fp32: 3xTF32);
    partial Grams (chunks·(d² + d)) written by it, summed in two fixed-order levels: the reduce
    kernel (groups of ⌈√chunks⌉ rows) and the finalize over the group sums, each kernel at its
    grid's share of the bandwidth (the finalize's nb² programs are a few for d ≤ 512: the
    compile report flags them LOW), as a grid's occupancy scales its peak throughout this model."""
    bd = block_d(d)
    nb = math.ceil(d / bd)
    pairs = nb * (nb + 1) // 2
    chunks = num_chunks(n, d, n * h * w, ELEM[dtype])
    rows_padded = n * math.ceil(h * w / BLOCK_R) * BLOCK_R
    passes, peak = PRECISION[dot_precision(TORCH_DTYPES[dtype])]
    flops = 2 * rows_padded * bd * bd * pairs * passes
    row = (d * d + d) * 4
    nbytes = n * h * w * d * ELEM[dtype] + chunks * row + n * d * 4
    r = term(flops, peak * min(1.0, chunks * pairs / SMS), nbytes)
    group = reduce_group(chunks)
    groups = math.ceil(chunks / group)
    sum_bytes = sum_s = 0.0
    if group < chunks:  # reduce kernel: reads every partial, writes the group sums
        reduce_programs = groups * math.ceil((d * d + d) / REDUCE_BLOCK)
        sum_bytes += (chunks + groups) * row
        sum_s += (chunks + groups) * row / (HBM * min(1.0, reduce_programs / SMS))
    sum_bytes += groups * row + d * d * 4  # finalize: the group sums in, Ψ out
    sum_s += (groups * row + d * d * 4) / (HBM * min(1.0, nb * nb / SMS))
    r["bytes"] += sum_bytes
    r["t_memory_us"] += sum_s * 1e6
    r["predicted_us"] += sum_s * 1e6
    r["bound"] = "compute" if r["t_compute_us"] > r["t_memory_us"] else "memory"
    r["programs"] = chunks * pairs
    return r


def site_stats_bwd(n, d, h, w, dtype):
    """dX = (X − μ) Gs / N + broadcasts: read X, write dX (same dtype), one GEMM on tensor
    cores at the kernel's precision (``grad_precision``: bf16x3, three bf16 passes)."""
    bd = block_d(d)
    dp = math.ceil(d / bd) * bd
    rows_padded = n * math.ceil(h * w / BLOCK_R) * BLOCK_R
    passes, peak = PRECISION[grad_precision(TORCH_DTYPES[dtype])]
    flops = 2 * rows_padded * dp * dp * passes
    nbytes = 2 * n * h * w * d * ELEM[dtype] + n * d * 4 + d * d * 4
    return term(flops, peak, nbytes)


def torch_site_stats_fwd(n, d, h, w, dtype):
    """The torch backend (kernels/composite.py) for comparison: cast to fp32 (bf16 only),
    pooled mean, (n·h·w, d) row copy (NCHW input), fp32 GEMM (allow_tf32 off by default)."""
    N = n * h * w * d
    nbytes = (N * (ELEM[dtype] + 4) if dtype == "bf16" else 0) + N * 4 + 2 * N * 4 + N * 4
    return term(2 * n * h * w * d * d, PEAK["fp32"], nbytes)


def torch_site_stats_bwd(n, d, h, w, dtype):
    """composite backward: fp32 copy of X (bf16 only), GEMM (rows · S), broadcast add, permute
    + cast back to the input dtype."""
    N = n * h * w * d
    nbytes = (N * (ELEM[dtype] + 4) if dtype == "bf16" else 0) + 2 * N * 4 + 2 * N * 4 + N * (4 + ELEM[dtype])
    return term(2 * n * h * w * d * d, PEAK["fp32"], nbytes)


def reg_inverse(k, d):
    """Blocked Cholesky + triangular inverse + YᵀY (kernels/reg_inverse.py), fp32 via 3xTF32.
    FLOPs ≈ d³ per matrix (⅓ per stage). The Cholesky kernel runs one CTA per matrix (k/132
    of the chip) and is latency-bound: a serial chain of 2·DP in-register tile steps (factor
    + invert each diagonal tile) and nb(nb+1)/2 dependent tile round trips (diagonal and
    panel tiles; their Σ_m updates are pipelined dots, counted at the CTA's throughput); the
    triangular inverse's longest program (column 0) adds nb(nb−1)/2 round trips."""
    dp = math.ceil(d / CHOL_B) * CHOL_B
    nb = dp // CHOL_B
    flops = k * dp ** 3 * 3  # three stages of dp³/3, each product done three times (3xTF32)
    nbytes = k * (2 * d * d * 4 + 6 * dp * dp * 4)  # A in, inverse out, workspaces (L2-resident)
    t = term(flops, PEAK["tf32"] * min(1.0, k / SMS), nbytes)
    floor = 2 * dp * TILE_STEP_S + (nb * (nb + 1) // 2 + nb * (nb - 1) // 2) * ROUND_TRIP_S
    t["latency_floor_us"] = floor * 1e6
    if floor * 1e6 >= t["predicted_us"]:
        t["predicted_us"], t["bound"] = floor * 1e6, "latency"
    return t


def reg_inverse_bwd(k, d):
    """dA = −Y sym(G) Y: two batched fp32 GEMMs in torch (cuBLAS, allow_tf32 off)."""
    return term(k * 4 * d ** 3, PEAK["fp32"], k * 4 * d * d * 4)
