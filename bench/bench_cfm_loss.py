"""Full CFM loss, forward + backward, over the 20 BatchNorm sites of a CIFAR ResNet-18
(batch 100, 32×32): ours (CFMLoss, cached real side, batched Cholesky per width) against the
obvious implementation (torch.cov on a permuted copy + torch.linalg.solve of both sides at
every call, as public CFM code does).

Ours and the obvious implementation are timed round-robin (bench/common.interleaved_ms).

    python bench/bench_cfm_loss.py [--batch 100] [--device cpu] [--backend auto] [--threads N]
"""
from __future__ import annotations

import argparse

import torch

import unidd_fast as uf
from common import interleaved_ms, report, set_threads
from sites import SiteBank, cifar_resnet18, random_real_stats, relu_features, site_shapes


def obvious_loss(stats, names, feats, targets, num_classes, beta, eta):
    total = 0.0
    for name, feat in zip(names, feats):
        n, d = feat.shape[:2]
        rows = feat.permute(0, 2, 3, 1).reshape(-1, d)
        psi_s = torch.cov(rows.T, correction=0)
        phi_s = feat.mean((2, 3)).T @ torch.nn.functional.one_hot(targets, num_classes).float() / n
        eye = torch.eye(d, device=feat.device)
        psi_r, phi_r = stats[name].psi.float().to(feat.device), stats[name].phi.float().to(feat.device)
        inv_r = torch.linalg.solve(psi_r + beta * eye, eye)
        inv_s = torch.linalg.solve(psi_s + beta * eye, eye)
        sig_r = torch.linalg.solve(psi_r + beta * eye, phi_r)
        sig_s = torch.linalg.solve(psi_s + beta * eye, phi_s)
        total = total + eta * (torch.linalg.norm(inv_r - inv_s) + torch.linalg.norm(sig_r - sig_s))
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    shapes = site_shapes(cifar_resnet18(), 32, args.batch)
    bank = SiteBank(shapes).to(args.device)
    shapes = dict(zip(bank.site_names, shapes.values()))
    stats = random_real_stats(shapes, args.classes, "SiteBank", gen)
    targets = (torch.arange(args.batch) % args.classes).to(args.device)
    rows = []
    for fmt_name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        feats = [f.to(args.device).detach().requires_grad_(True) for f in relu_features(shapes, gen, fmt)]
        cfm = uf.CFMLoss(bank, stats, beta=0.1, sites=list(shapes), backend=args.backend)

        def ours():
            bank(feats)
            cfm(targets).backward()

        def obvious():
            obvious_loss(stats, list(shapes), feats, targets, args.classes, 0.1, 0.1).backward()

        bank(feats)
        check = cfm(targets).item()
        with torch.no_grad():
            want = float(obvious_loss(stats, list(shapes), feats, targets, args.classes, 0.1, 0.1))
        times = interleaved_ms({"ours": ours, "obvious": obvious}, args.device, warmup=2, repeat=args.repeat)
        t_ours, t_obv = times["ours"], times["obvious"]
        cfm.remove()
        rows.append({"layout": fmt_name, "sites": len(shapes), "batch": args.batch, "ours_ms": t_ours["median_ms"],
                     "obvious_ms": t_obv["median_ms"], "speedup": t_obv["median_ms"] / t_ours["median_ms"],
                     "ours_min_ms": t_ours["min_ms"], "obvious_min_ms": t_obv["min_ms"],
                     "loss_ours": check, "loss_obvious": want, "device": args.device})
    report("cfm_loss", rows, ["layout", "sites", "batch", "ours_ms", "obvious_ms", "speedup", "loss_ours", "loss_obvious"])


if __name__ == "__main__":
    main()
