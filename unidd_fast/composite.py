"""Fast PyTorch composites: what ``backend="torch"`` runs. Each matches its oracle in
``reference.py`` to the accuracy of its dtype, with fewer passes over the feature map."""
from __future__ import annotations

import torch

from . import reference

# Uncentred Gram Ψ = XᵀX/N − μμᵀ loses about eps·(1 + μ²/σ²) relative accuracy to cancellation;
# beyond this ratio μ²/σ² the centred (two-pass) formula is used instead.
CANCELLATION_LIMIT = 64.0


def site_stats(feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.site_stats`` (feat (n,d,h,w) -> psi (d,d), mu (d,), pooled (n,d)).

    One GEMM on the rows (a view, no copy, for channels_last input) plus the pooled means, from
    which μ follows for free; the centred formula is used when μ²/σ² would cost accuracy.
    """
    if feat.dim() != 4:
        raise ValueError(f"site_stats expects a (n, d, h, w) feature map, got shape {tuple(feat.shape)}")
    n, d, h, w = feat.shape
    x = feat.to(reference.acc_dtype(feat.dtype))
    pooled = x.mean((2, 3))
    mu = pooled.mean(0)
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, d)
    psi = rows.T @ rows / rows.shape[0] - torch.outer(mu, mu)
    with torch.no_grad():
        var = torch.diagonal(psi).clamp_min(0)
        safe = bool((mu * mu <= CANCELLATION_LIMIT * var).all())
    if not safe:
        centred = rows - mu
        psi = centred.T @ centred / rows.shape[0]
    return psi, mu, pooled
