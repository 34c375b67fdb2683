"""Triton site statistics (forward + backward) against the torch backend, per ResNet-18
site shape (CIFAR 32×32 or ImageNet 224×224). Needs a CUDA device: the Triton kernels only
run in the (non-representative) interpreter on CPU, so without a GPU this prints the
roofline PREDICTION instead and measures nothing.

    python bench/bench_kernels_site_stats.py [--geometry imagenet|cifar] [--batch 100] [--dtype bf16|fp32]
"""
from __future__ import annotations

import argparse

import torch
import torchvision

import unidd_fast as uf
from common import median_ms, report
from unidd_fast.roofline.ops import site_stats_bwd, site_stats_fwd
from sites import cifar_resnet18, site_shapes

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def fwd_bwd(feat, backend):
    psi, mu, pooled = uf.site_stats(feat, backend=backend)
    (psi.sum() + mu.sum() + pooled.sum()).backward()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=("imagenet", "cifar"), default="imagenet")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    model, size = ((torchvision.models.resnet18().eval(), 224) if args.geometry == "imagenet"
                   else (cifar_resnet18(), 32))
    shapes = sorted(set(site_shapes(model, size, args.batch).values()))
    rows = []
    for n, d, h, w in shapes:
        pred = site_stats_fwd(n, d, h, w, args.dtype)["predicted_us"] + site_stats_bwd(n, d, h, w, args.dtype)["predicted_us"]
        row = {"shape": f"{n}x{d}x{h}x{w}", "predicted_triton_us": pred}
        if torch.cuda.is_available():
            fmt = torch.channels_last if args.channels_last else torch.contiguous_format
            feat = torch.randn(n, d, h, w, device="cuda", dtype=DTYPES[args.dtype]).contiguous(memory_format=fmt)
            feat.requires_grad_(True)
            for backend in ("torch", "triton"):
                row[f"{backend}_ms"] = median_ms(lambda: fwd_bwd(feat, backend), "cuda", warmup=3, repeat=20)["median_ms"]
            row["speedup"] = row["torch_ms"] / row["triton_ms"]
        rows.append(row)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured; the column below is the H100 roofline PREDICTION")
    report(f"kernels_site_stats_{args.geometry}_{args.dtype}", rows, list(rows[0]) if torch.cuda.is_available()
           else ["shape", "predicted_triton_us"], extra={"measured": torch.cuda.is_available()})


if __name__ == "__main__":
    main()
