"""Where the torch backend's NCHW Gram switches formulation (kernels/composite.py,
BATCHED_GRAM_MAX_RATIO): Σ_i X_i X_iᵀ as one batched GEMM over the samples' (d, h·w) views
(no copy; n partial d×d Grams summed) against the channel-major (d, n·h·w) copy and one GEMM,
for widths d from 1/16 to 32 times h·w, both timed round-robin (common.interleaved_times).

    python bench/bench_nchw_gram.py [--batch 50] [--threads 1] [--repeat 15]
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch

from common import interleaved_times, report, set_threads
from unidd_fast.kernels import composite

SHAPES = [(64, 32, 32), (128, 16, 16), (64, 4, 4), (256, 8, 8), (128, 4, 4), (512, 8, 8), (256, 4, 4), (512, 4, 4)]


def gram_with(ratio: float):
    """composite._gram with the switch at d > ratio·h·w."""
    def run(x):
        saved, composite.BATCHED_GRAM_MAX_RATIO = composite.BATCHED_GRAM_MAX_RATIO, ratio
        try:
            return composite._gram(x)
        finally:
            composite.BATCHED_GRAM_MAX_RATIO = saved
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    batched, channel_copy = gram_with(math.inf), gram_with(0.0)
    rows = []
    for d, h, w in SHAPES:
        x = torch.relu(torch.randn(args.batch, d, h, w, generator=gen))
        torch.testing.assert_close(batched(x), channel_copy(x), rtol=1e-4, atol=1e-3)
        times = interleaved_times({"batched": lambda: batched(x), "channel_copy": lambda: channel_copy(x)},
                                  warmup=2, repeat=args.repeat)
        med = {k: statistics.median(t) for k, t in times.items()}
        rows.append({"shape": f"{args.batch}x{d}x{h}x{w}", "d_over_hw": d / (h * w), "batched_ms": med["batched"],
                     "channel_copy_ms": med["channel_copy"], "copy_over_batched": med["channel_copy"] / med["batched"],
                     "chosen": "batched" if d <= composite.BATCHED_GRAM_MAX_RATIO * h * w else "channel_copy"})
    report("nchw_gram", rows, ["shape", "d_over_hw", "batched_ms", "channel_copy_ms", "copy_over_batched", "chosen"])


if __name__ == "__main__":
    main()
