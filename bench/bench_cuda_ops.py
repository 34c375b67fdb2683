"""Time the CUDA backend against the torch backend, in the same run, at ResNet-18 geometry.

    python bench/bench_cuda_ops.py [--image 32|224] [--batch 100] [--dtype bf16|fp32]
    python bench/bench_cuda_ops.py --emulate     # CPU emulation: exercises the code only

Needs a GPU and the built extension (docs/cuda.md). Rows: per distinct site shape, the
statistics forward + backward (median ms); then the regularized inverse of all 20 sites
in one batched call against the torch backend's per-width calls (cholesky_ex +
cholesky_inverse). With --emulate the kernels run under csrc/emu.h on tiny shapes: the
timings then say nothing about a GPU and are labelled so.
"""
from __future__ import annotations

import argparse

import torch
import torchvision

from common import OUT, median_ms, report
from sites import cifar_resnet18, site_shapes
from unidd_fast import ops
from unidd_fast.kernels.cuda import ops as cuda_ops
from unidd_fast.kernels.cuda.emulator import EmulatedKernels, build_emulator

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def stats_step(feat, backend, kernels):
    def run():
        feat.grad = None
        if backend == "cuda":
            psi, mu, pooled = cuda_ops.site_stats_cuda(feat, kernels=kernels)
        else:
            psi, mu, pooled = ops.site_stats(feat, backend="torch")
        (psi.sum() + mu.sum() + pooled.sum()).backward()
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=int, default=32, choices=(32, 224))
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--beta", type=float, default=1e-3)
    parser.add_argument("--emulate", action="store_true", help="CPU emulation of the kernels, tiny shapes")
    args = parser.parse_args(argv)
    if args.emulate:
        kernels, device, label = EmulatedKernels(build_emulator(OUT)), torch.device("cpu"), "EMULATED on CPU (not a GPU timing)"
        shapes = {"a": (2, 8, 4, 4), "b": (2, 70, 2, 2)}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU, or pass --emulate to exercise the code on CPU")
        kernels, device, label = cuda_ops.extension(), torch.device("cuda"), f"measured on {torch.cuda.get_device_name()}"
        model = cifar_resnet18() if args.image == 32 else torchvision.models.resnet18().eval()
        shapes = site_shapes(model, args.image, args.batch)
    gen = torch.Generator().manual_seed(0)
    rows, seen = [], set()
    for shape in shapes.values():
        if shape in seen:
            continue
        seen.add(shape)
        feat = torch.relu(torch.randn(shape, generator=gen)).to(device, DTYPES[args.dtype]).requires_grad_()
        t_cuda = median_ms(stats_step(feat, "cuda", kernels), device)["median_ms"]
        t_torch = median_ms(stats_step(feat, "torch", kernels), device)["median_ms"]
        rows.append({"op": "site_stats fwd+bwd", "shape": "x".join(map(str, shape)), "cuda_ms": t_cuda,
                     "torch_ms": t_torch, "torch_over_cuda": t_torch / t_cuda})
    widths = [shape[1] for shape in shapes.values()]
    mats = []
    for d in widths:
        X = torch.randn(d, 2 * d, generator=gen)
        mats.append((X @ X.T / (2 * d)).to(device))
    groups = {d: torch.stack([m for m, w in zip(mats, widths) if w == d]) for d in sorted(set(widths))}
    t_cuda = median_ms(lambda: cuda_ops.regularized_inverse_cuda(list(groups.values()), args.beta, kernels=kernels),
                       device)["median_ms"]
    t_torch = median_ms(lambda: [ops.regularized_inverse(g, args.beta, backend="torch") for g in groups.values()],
                        device)["median_ms"]
    rows.append({"op": "regularized_inverse, all sites", "shape": "+".join(f"{len(g)}x{d}" for d, g in groups.items()),
                 "cuda_ms": t_cuda, "torch_ms": t_torch, "torch_over_cuda": t_torch / t_cuda})
    name = "cuda_ops_emulated" if args.emulate else f"cuda_ops_{args.image}_{args.dtype}"
    report(name, rows, ["op", "shape", "cuda_ms", "torch_ms", "torch_over_cuda"], extra={"label": label})
    print(label)


if __name__ == "__main__":
    main()
