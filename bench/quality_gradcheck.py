"""Implementation checks behind docs/quality.md, on a trained teacher and real images.

1. Finite differences: the gradient CFMLoss gives the images, against central differences
   of paper Eq. 20 (+ the signal term) written out independently here in float64
   (covariance, ``torch.linalg.inv``, Frobenius norms), at a few random image pixels.
2. fp32 vs fp64: relative error of the float32 regulariser's image gradient against the
   float64 one at the β_t the curriculum reaches (β, the last IPC-10 index, β_min-like).
3. Term balance: |∇ CE| vs |∇ η·regulariser| on the images at each of those β_t.

    python bench/quality_gradcheck.py --dataset digits --teacher T --stats S
"""
from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F

from unidd_fast.loss import CFMLoss
from unidd_fast.pipeline import config as config_mod
from unidd_fast.pipeline.datasets import prepare_data
from unidd_fast.pipeline.models import load_teacher
from unidd_fast.pipeline.recover import pick_real
from unidd_fast.real_stats import RealStats
from unidd_fast.schedule import beta_schedule


def eq20_reference(model, x, targets, stats: RealStats, names, beta: float, num_classes: int) -> torch.Tensor:
    """Σ_sites ‖(Ψ+βI)⁻¹ − (Ψ_s+βI)⁻¹‖_F + ‖(Ψ+βI)⁻¹Φ − (Ψ_s+βI)⁻¹Φ_s‖_F (paper Eqs. 18, 20),
    float64, from the inputs of the sites ``names`` of ``model`` (no EMU: first class-batch)."""
    feats = {}
    handles = [dict(model.named_modules())[n].register_forward_pre_hook(
        lambda m, inp, n=n: feats.__setitem__(n, inp[0])) for n in names]
    model(x)
    for h in handles:
        h.remove()
    total = x.new_zeros(())
    y = F.one_hot(targets, num_classes).to(x.dtype)
    for n in names:
        f = feats[n]
        rows = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        centred = rows - rows.mean(0)
        psi_s = centred.T @ centred / rows.shape[0]
        phi_s = f.mean((2, 3)).T @ y / f.shape[0]
        eye = torch.eye(psi_s.shape[0], dtype=x.dtype)
        real_inv = torch.linalg.inv(stats[n].psi.to(x.dtype) + beta * eye)
        syn_inv = torch.linalg.inv(psi_s + beta * eye)
        total = total + torch.linalg.norm(real_inv - syn_inv) + torch.linalg.norm(
            real_inv @ stats[n].phi.to(x.dtype) - syn_inv @ phi_s)
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--pixels", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = config_mod.defaults(args.dataset)
    data = prepare_data(cfg)
    model, _ = load_teacher(args.teacher, "cpu")
    model.requires_grad_(False).eval()
    stats = RealStats.load(args.stats, "cpu")
    gen = torch.Generator().manual_seed(0)
    picks = pick_real(data.train_labels, data.num_classes, 1, gen)[0]
    x32 = data.train_images(picks)
    targets = torch.arange(data.num_classes)
    model64 = copy.deepcopy(model).double()
    out = {"dataset": args.dataset}

    # 1. finite differences of the independent Eq. 20 vs CFMLoss's autograd gradient (float64)
    beta = cfg.recover.beta
    x = x32.double().requires_grad_(True)
    reg = CFMLoss(model64, stats, beta=beta, eta=1.0, backend="torch")
    model64(x)
    ours = reg(targets)
    (grad,) = torch.autograd.grad(ours, x)
    names = reg.names
    reg.remove()
    with torch.no_grad():
        ref = eq20_reference(model64, x, targets, stats, names, beta, data.num_classes)
    flat = grad.flatten()
    idx = torch.randperm(flat.numel(), generator=gen)[: args.pixels]
    rows = []
    eps = 1e-5
    for i in idx.tolist():
        with torch.no_grad():
            xp, xm = x.detach().clone().flatten(), x.detach().clone().flatten()
            xp[i] += eps
            xm[i] -= eps
            fd = (eq20_reference(model64, xp.view_as(x), targets, stats, names, beta, data.num_classes)
                  - eq20_reference(model64, xm.view_as(x), targets, stats, names, beta, data.num_classes)) / (2 * eps)
        rows.append({"pixel": i, "autograd": float(flat[i]), "finite_difference": float(fd)})
    rel = max(abs(r["autograd"] - r["finite_difference"]) for r in rows) / max(abs(r["finite_difference"]) for r in rows)
    out["value"] = {"cfmloss": ours.item(), "eq20": ref.item()}
    out["fd"] = {"rows": rows, "max_rel_error": rel}

    # 2.-3. fp32 vs fp64 gradient and the CE / regulariser balance along the curriculum
    eta = cfg.recover.eta
    out["curriculum"] = []
    for t in (0, 9):
        beta_t = beta_schedule(beta, t, 10)
        grads = {}
        for dtype, net in ((torch.float32, model), (torch.float64, model64)):
            xi = x32.to(dtype).requires_grad_(True)
            r = CFMLoss(net, stats, beta=beta, eta=eta, backend="torch")
            r.set_curriculum(t, 10)
            logits = net(xi)
            ce = F.cross_entropy(logits, targets)
            g_reg = torch.autograd.grad(r(targets), xi)[0]
            g_ce = torch.autograd.grad(F.cross_entropy(net(xi), targets), xi)[0]
            r.remove()
            grads[dtype] = (g_reg.double(), g_ce.double(), float(ce))
        g64, g32 = grads[torch.float64][0], grads[torch.float32][0]
        out["curriculum"].append({
            "t": t, "beta_t": beta_t,
            "fp32_rel_error": float((g32 - g64).norm() / g64.norm()),
            "grad_norm_eta_reg": float(g64.norm()), "grad_norm_ce": float(grads[torch.float64][1].norm()),
            "ce": grads[torch.float64][2]})
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
