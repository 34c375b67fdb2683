"""Triton batched (Ψ + βI)^-1 (forward + backward) against the torch backend (cholesky_ex +
cholesky_inverse), for the width groups of ResNet-18 (5 sites each of d = 64..512). Needs a
CUDA device; without one it prints the roofline PREDICTION and measures nothing.

    python bench/bench_kernels_reg_inverse.py [--beta 1e-3] [--sites 5]
"""
from __future__ import annotations

import argparse

import torch

import unidd_fast as uf
from common import median_ms, report
from unidd_fast.roofline.ops import reg_inverse, reg_inverse_bwd


def fwd_bwd(A, beta, backend):
    uf.regularized_inverse(A, beta, backend=backend).sum().backward()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beta", type=float, default=1e-3)
    parser.add_argument("--sites", type=int, default=5)
    args = parser.parse_args(argv)
    rows = []
    for d in (64, 128, 256, 512):
        k = args.sites
        row = {"shape": f"{k}x{d}x{d}",
               "predicted_triton_us": reg_inverse(k, d)["predicted_us"] + reg_inverse_bwd(k, d)["predicted_us"]}
        if torch.cuda.is_available():
            X = torch.randn(k, 2 * d, d, device="cuda")
            A = (X.mT @ X / (2 * d)).requires_grad_(True)
            for backend in ("torch", "triton"):
                row[f"{backend}_ms"] = median_ms(lambda: fwd_bwd(A, args.beta, backend), "cuda", warmup=3, repeat=20)["median_ms"]
            row["speedup"] = row["torch_ms"] / row["triton_ms"]
        rows.append(row)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured; the column below is the H100 roofline PREDICTION")
    report("kernels_reg_inverse", rows, list(rows[0]), extra={"measured": torch.cuda.is_available(), "beta": args.beta})


if __name__ == "__main__":
    main()
