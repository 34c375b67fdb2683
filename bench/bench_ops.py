"""Per-op microbenchmarks: every backend available on this machine against the reference
written the obvious way, at the site widths of ResNet-18 (d = 64, 128, 256, 512) with their
real n·h·w (CIFAR 32×32 or ImageNet 224×224 geometry, batch 100).

ops (one width group = the 5 sites of that width, as CFMLoss batches them):
- site_stats fwd / fwd+bwd: Ψ, μ, pooled of one feature map vs torch.cov on a permuted copy
  (+ mean, pooled), autograd backward;
- emu_fold: the EMU update of a width group's stacked (Ψ, Φ) vs a per-site loop;
- inverse fwd / fwd+bwd: batched (Ψ + βI)⁻¹ by Cholesky vs torch.linalg.solve(Ψ + βI, I) per site;
- loss fwd+bwd: the group's filter + signal norms from (Ψ_s, Φ_s), real side cached, vs
  solving both sides of every site at every call (public CFM code).

Backends: torch everywhere; triton and cuda on a CUDA device when installed (the Triton
interpreter on CPU is a correctness tool, not timed). Ratios are measured round-robin in one
run (bench/common.interleaved_ms).

    python bench/bench_ops.py [--geometry cifar|imagenet] [--batch 100] [--repeat 7] [--threads 1]
"""
from __future__ import annotations

import argparse

import torch
import torchvision

import unidd_fast as uf
from common import interleaved_ms, report, set_threads
from sites import cifar_resnet18, site_shapes
from unidd_fast import filters, ops
from unidd_fast.kernels.registry import cuda_extension_available, triton_available
from unidd_fast.site_loss import filtered_norms

SITES_PER_WIDTH = 5
BETA = 0.1


def backends(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["torch"]
    return ["torch"] + (["triton"] if triton_available() else []) + (["cuda"] if cuda_extension_available() else [])


def obvious_stats(feat):
    n, d = feat.shape[:2]
    rows = feat.permute(0, 2, 3, 1).reshape(-1, d)
    return torch.cov(rows.T, correction=0), rows.mean(0), feat.mean((2, 3))


def obvious_norms(psi_r, phi_r, psi_s, phi_s, beta):
    """Per site: solve both sides at every call (what public CFM code does)."""
    eye = torch.eye(psi_r.shape[-1], device=psi_r.device, dtype=psi_r.dtype)
    f, s = [], []
    for pr, fr, ps, fs in zip(psi_r, phi_r, psi_s, phi_s):
        inv_r, inv_s = torch.linalg.solve(pr + beta * eye, eye), torch.linalg.solve(ps + beta * eye, eye)
        sig_r, sig_s = torch.linalg.solve(pr + beta * eye, fr), torch.linalg.solve(ps + beta * eye, fs)
        f.append(torch.linalg.matrix_norm(inv_r - inv_s))
        s.append(torch.linalg.matrix_norm(sig_r - sig_s))
    return torch.stack(f), torch.stack(s)


def spd(k, d, gen, device):
    A = torch.randn(k, d, 2 * d, generator=gen)
    return (A @ A.transpose(-1, -2) / (2 * d)).to(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=("cifar", "imagenet"), default="cifar")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--widths", default="64,128,256,512")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    model, size = ((torchvision.models.resnet18().eval(), 224) if args.geometry == "imagenet"
                   else (cifar_resnet18(), 32))
    by_width = {}
    for shape in site_shapes(model, size, args.batch).values():  # the largest map of each width
        if shape[1] not in by_width or shape[2] * shape[3] > by_width[shape[1]][2] * by_width[shape[1]][3]:
            by_width[shape[1]] = shape
    widths = [int(d) for d in args.widths.split(",")]
    k, c = SITES_PER_WIDTH, args.classes
    rows = []

    def add(op, shape, t_obvious, times):
        for name, t in times.items():
            rows.append({"op": op, "shape": shape, "impl": name, "median_ms": t["median_ms"],
                         "speedup_vs_obvious": t_obvious / t["median_ms"], "device": str(device)})

    for d in widths:
        n, _, h, w = by_width[d]
        shape = f"{n}x{d}x{h}x{w}"
        feat = torch.relu(torch.randn(n, d, h, w, generator=gen)).to(device)
        feat_cl = feat.contiguous(memory_format=torch.channels_last)
        g_psi = torch.randn(d, d, generator=gen).to(device)

        def stats_fwd(fn, x):
            with torch.no_grad():
                fn(x)

        def stats_bwd(fn, x):
            x = x.detach().requires_grad_(True)
            psi, mu, pooled = fn(x)
            ((psi * g_psi).sum() + mu.sum() + pooled.sum()).backward()

        for op, run in (("site_stats fwd", stats_fwd), ("site_stats fwd+bwd", stats_bwd)):
            fns = {"obvious (NCHW)": lambda run=run: run(obvious_stats, feat)}
            for b in backends(device):
                fns[f"{b} (NCHW)"] = lambda run=run, b=b: run(lambda x: ops.site_stats(x, b), feat)
                fns[f"{b} (channels_last)"] = lambda run=run, b=b: run(lambda x: ops.site_stats(x, b), feat_cl)
            times = interleaved_ms(fns, device, repeat=args.repeat)
            add(op, shape, times.pop("obvious (NCHW)")["median_ms"], times)

        psi_s, psi_r = spd(k, d, gen, device), spd(k, d, gen, device)
        phi_s, phi_r = (torch.rand(k, d, c, generator=gen).to(device) / c for _ in range(2))
        bar_psi, bar_phi = spd(k, d, gen, device), torch.rand(k, d, c, generator=gen).to(device) / c
        times = interleaved_ms({"obvious": lambda: [(ops.emu_fold(p, bp, 3), ops.emu_fold(f, bf, 3)) for p, bp, f, bf
                                                    in zip(psi_s, bar_psi, phi_s, bar_phi)],
                                "torch (stacked)": lambda: (ops.emu_fold(psi_s, bar_psi, 3),
                                                            ops.emu_fold(phi_s, bar_phi, 3))},
                               device, repeat=args.repeat)
        add("emu_fold", f"{k}x{d}x{d}", times.pop("obvious")["median_ms"], times)

        eye = torch.eye(d, device=device)

        def inv_obvious(grad):
            A = psi_s.detach().requires_grad_(grad)
            Y = torch.stack([torch.linalg.solve(a + BETA * eye, eye) for a in A])
            if grad:
                Y.sum().backward()

        def inv_ours(grad, b):
            A = psi_s.detach().requires_grad_(grad)
            Y = ops.regularized_inverse(A, BETA, b)
            if grad:
                Y.sum().backward()

        for op, grad in (("inverse fwd", False), ("inverse fwd+bwd", True)):
            fns = {"obvious": lambda grad=grad: inv_obvious(grad)}
            fns.update({b: (lambda grad=grad, b=b: inv_ours(grad, b)) for b in backends(device)})
            times = interleaved_ms(fns, device, repeat=args.repeat)
            add(op, f"{k}x{d}x{d}", times.pop("obvious")["median_ms"], times)

        krr = filters.krr(BETA)
        inv_r = ops.regularized_inverse(psi_r, BETA, "torch")
        F_real, T_real = inv_r, inv_r @ phi_r  # the cached real side of CFMLoss

        def loss(fn):
            ps, fs = psi_s.detach().requires_grad_(True), phi_s.detach().requires_grad_(True)
            f, s = fn(ps, fs)
            (f.sum() + s.sum()).backward()

        fns = {"obvious": lambda: loss(lambda ps, fs: obvious_norms(psi_r, phi_r, ps, fs, BETA))}
        fns.update({b: (lambda b=b: loss(lambda ps, fs: filtered_norms(F_real, T_real, ps, fs, krr, backend=b)))
                    for b in backends(device)})
        times = interleaved_ms(fns, device, repeat=args.repeat)
        add("loss fwd+bwd", f"{k}x{d}x{d}, c={c}", times.pop("obvious")["median_ms"], times)

    report(f"ops_{args.geometry}", rows, ["op", "shape", "impl", "median_ms", "speedup_vs_obvious"],
           extra={"beta": BETA, "sites_per_width": k, "classes": c})


if __name__ == "__main__":
    main()
