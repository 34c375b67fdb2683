"""Plain PyTorch oracle of the fused ops, written as directly from docs/math.md as possible:
the tests compare every backend (``unidd_fast.kernels``: torch composites, Triton, CUDA)
against it, in float64. Nothing in the package calls it.
"""
from __future__ import annotations

import torch

from .errors import NotPositiveDefiniteError
from .kernels._utils import acc_dtype


def site_stats(feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel statistics of one feature map.

    feat: (n, d, h, w), any float dtype, NCHW or channels_last.
    Returns psi (d, d) population covariance of the n·h·w rows, mu (d,) their mean, and
    pooled (n, d) per-sample spatial means; all in ``acc_dtype(feat.dtype)``.
    """
    if feat.dim() != 4:
        raise ValueError(f"site_stats expects a (n, d, h, w) feature map, got shape {tuple(feat.shape)}")
    n, d, h, w = feat.shape
    x = feat.to(acc_dtype(feat.dtype))
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, d)
    mu = rows.mean(0)
    centred = rows - mu
    psi = centred.T @ centred / rows.shape[0]
    pooled = x.mean((2, 3))
    return psi, mu, pooled


def regularized_inverse(A: torch.Tensor, beta, names=None) -> torch.Tensor:
    """(A + βI)^-1 of symmetric A (..., d, d) by Cholesky, differentiated by autograd through
    the symmetric part of A (so dA = −Y sym(G) Y); NotPositiveDefiniteError if it fails."""
    S = 0.5 * (A + A.transpose(-1, -2)) + beta * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    L, info = torch.linalg.cholesky_ex(S)
    bad = torch.nonzero(info.reshape(-1)).flatten().tolist()
    if bad:
        which = [names[i] for i in bad] if names is not None else bad
        raise NotPositiveDefiniteError(f"(Ψ + βI) is not positive definite at {which} with β = {float(beta):g}")
    return torch.cholesky_inverse(L)
