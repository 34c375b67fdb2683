"""Accuracy of the statistics forward's shifted Gram S = Σ (x − K)(x − K)ᵀ for 16-bit feature
maps under the tensor-core splits a GPU runs, emulated bit-exactly on the CPU against float64.

The kernel forms e = x − K in fp32 (K = the map's first row, exact for 16-bit x and K up to
fp32 rounding) and multiplies e by itself on tensor cores. Schemes (products of the parts are
exact in float64, so each column isolates what the split drops):
  tf32x3  Triton's 3xTF32: big = e rounded to TF32 (cvt.rna: nearest, ties away), small = e − big
          truncated to TF32 by the MMA; big·big + big·small + small·big.
  bf16x4  hi = bf16(e), lo = bf16(e − hi), both round-to-nearest-even; all four products.
  bf16x3  the same split without lo·lo (≥ 0 on the diagonal: a bias of one sign).
"split" errors use exact sums; "acc" errors add the fp32 accumulation of the kernel: each
32-row tile's product rounded to fp32 (the tensor-core accumulator, modelled as one rounding to
nearest), added to one running fp32 Gram (a single chunk: the longest sequential sum). The
reference is float64 on the same rounded 16-bit map. Ψ = S/N − m mᵀ shares m between schemes,
so ΔΨ = ΔS/N. Metrics: ‖ΔΨ‖_F/‖Ψ‖_F, max |ΔΨ_ij|/√(Ψ_ii Ψ_jj), max |ΔS_ii|/S_ii (a channel's
systematic error), the mean relative diagonal error ΔΨ_ii/Ψ_ii and its t statistic (mean over
its standard error across the d channels: |t| ≫ 1 is a bias of one sign, which κ amplifies in
the regularised inverse).

    python bench/bench_gram_precision.py [--rows 100 10000 1000000] [--d 32] [--seed 0]
"""
from __future__ import annotations

import argparse
import math

import torch

from common import report

TILE = 32  # rows per tl.dot of the kernel (site_stats.BLOCK_R)
SCHEMES = ("tf32x3", "bf16x4", "bf16x3")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ACC_METRICS = ("rel_fro", "diag_bias", "diag_t")


def round_fp32(x: torch.Tensor, dropped_bits: int, mode: str) -> torch.Tensor:
    """fp32 ``x`` with its ``dropped_bits`` low mantissa bits removed: "even" (nearest, ties to
    even: cvt.rn), "away" (nearest, ties away from zero: cvt.rna) or "trunc" (toward zero, what
    a TF32 MMA does to fp32 operand bits). Sign-magnitude, so the carry of a rounding goes into
    the exponent as it should."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    half = 1 << (dropped_bits - 1)
    if mode == "even":
        bits = bits + (half - 1) + ((bits >> dropped_bits) & 1)
    elif mode == "away":
        bits = bits + half
    elif mode != "trunc":
        raise ValueError(f"unknown rounding {mode!r}")
    bits = bits & ~((1 << dropped_bits) - 1) & 0xFFFFFFFF
    return torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32).view(torch.float32)


def scheme_tiles(e: torch.Tensor) -> torch.Tensor:
    """(schemes, tiles, d, d) float64: each 32-row tile's Gram of fp32 ``e`` (rows, d), rows a
    multiple of TILE, as each scheme in SCHEMES computes it with exact products."""
    def tile_gram(a, b):
        a, b = (t.double().view(-1, TILE, e.shape[1]) for t in (a, b))
        return a.transpose(1, 2) @ b

    big = round_fp32(e, 13, "away")
    small = round_fp32(e - big, 13, "trunc")
    hi = round_fp32(e, 16, "even")
    lo = round_fp32(e - hi, 16, "even")
    tf32x3 = tile_gram(small, big) + tile_gram(big, small) + tile_gram(big, big)
    bf16x3 = tile_gram(lo, hi) + tile_gram(hi, lo) + tile_gram(hi, hi)
    return torch.stack([tf32x3, tile_gram(lo, lo) + bf16x3, bf16x3])


def gram_errors(x: torch.Tensor, block_tiles: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(ΔS with exact sums, ΔS with fp32 accumulation), each (schemes, d, d), against float64
    of map rows ``x`` (N, d) in a 16-bit dtype."""
    shift = x[0]
    d = x.shape[1]
    ref = torch.zeros(d, d, dtype=torch.float64)
    split = torch.zeros(len(SCHEMES), d, d, dtype=torch.float64)
    acc = torch.zeros(len(SCHEMES), d, d, dtype=torch.float32)
    rows = block_tiles * TILE
    for r0 in range(0, x.shape[0], rows):
        block = x[r0:r0 + rows]
        exact = block.double() - shift.double()
        ref += exact.T @ exact
        e = block.float() - shift.float()
        pad = (-e.shape[0]) % TILE
        if pad:  # masked rows of the last tile are zeros in the kernel
            e = torch.cat([e, e.new_zeros(pad, d)])
        tiles = scheme_tiles(e)
        split += tiles.sum(1)
        for tile in tiles.float().unbind(1):  # the kernel's running sum: one fp32 rounding per tile
            acc += tile
    return split - ref, acc.double() - ref


def summarise(delta_s: torch.Tensor, psi: torch.Tensor, shift_mean: torch.Tensor, n: int) -> dict:
    d_psi = delta_s / n
    diag = psi.diagonal()
    rel_diag = d_psi.diagonal() / diag
    spread = rel_diag.std().item() / math.sqrt(len(rel_diag))
    mean = rel_diag.mean().item()
    sums = diag + shift_mean ** 2  # S_ii/N, what the Gram accumulates per channel
    return {"rel_fro": (d_psi.norm() / psi.norm()).item(),
            "max_corr": (d_psi.abs() / (diag[:, None] * diag[None, :]).sqrt()).max().item(),
            "max_diag": (d_psi.diagonal().abs() / sums).max().item(),
            "diag_bias": mean,
            "diag_t": mean / spread if spread > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))}


def families(n: int, d: int, gen: torch.Generator) -> dict:
    """float64 maps (n, d): |μ| ≫ σ, |μ| ~ σ, the same with a first row (the shift K) near
    zero, heavy tails, five decades of magnitudes."""
    scale = 0.1 + 0.9 * torch.rand(d, generator=gen, dtype=torch.float64)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    u = torch.rand(n, d, generator=gen, dtype=torch.float64)
    chi = torch.randn(n, d, 3, generator=gen, dtype=torch.float64).square().sum(-1)
    sign = torch.where(torch.rand(n, d, generator=gen) < 0.5, -1.0, 1.0).double()
    near_zero_first = 0.5 + scale * z
    near_zero_first[0] = 1e-3 * scale * (1 + u[0])
    return {"mean>>sigma (100)": 100.0 + scale * z,
            "mean~sigma (0.5)": 0.5 + scale * z,
            "mean~sigma, K~1e-3σ": near_zero_first,
            "heavy tail (t3)": 0.5 + scale * z / (chi / 3).sqrt(),
            "log-uniform 1e-4..10": sign * torch.exp(math.log(1e-4) + (math.log(10) - math.log(1e-4)) * u)}


def psi_ref(x64: torch.Tensor) -> torch.Tensor:
    centred = x64 - x64.mean(0)
    return centred.T @ centred / x64.shape[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100, 10_000, 1_000_000], help="N = n·h·w")
    parser.add_argument("--d", type=int, default=32, help="channels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for n in args.rows:
        for family, data in families(n, args.d, gen).items():
            for dname, dtype in DTYPES.items():
                x = data.to(dtype)
                psi = psi_ref(x.double())
                shift_mean = x.double().mean(0) - x[0].double()  # μ − K
                split, acc = gram_errors(x)
                for i, scheme in enumerate(SCHEMES):
                    row = {"rows": n, "family": family, "dtype": dname, "scheme": scheme}
                    row.update({f"split_{name}": v for name, v in summarise(split[i], psi, shift_mean, n).items()})
                    row.update({f"acc_{name}": v for name, v in summarise(acc[i], psi, shift_mean, n).items()
                                if name in ACC_METRICS})
                    rows.append(row)
    columns = ["rows", "family", "dtype", "scheme", "split_rel_fro", "split_max_corr", "split_max_diag",
               "split_diag_bias", "split_diag_t"] + [f"acc_{name}" for name in ACC_METRICS]
    report("gram_precision", rows, columns, {"d": args.d, "seed": args.seed, "tile_rows": TILE})


if __name__ == "__main__":
    main()
