"""The ``torch`` backend: PyTorch composites of the fused ops, for any device. Each matches
the test oracle ``unidd_fast.reference`` to the accuracy of its dtype, with fewer passes over
the feature map."""
from __future__ import annotations

import torch

from . import _utils
from ._utils import acc_dtype, check_cholesky_info, inverse_backward

# Uncentred Gram Ψ = XᵀX/N − μμᵀ loses about eps·(1 + μ²/σ²) relative accuracy to cancellation;
# beyond this ratio μ²/σ² the centred (two-pass) formula is used instead.
CANCELLATION_LIMIT = 64.0


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(n, d, h, w) -> (n·h·w, d) rows: a view for channels_last input, a copy otherwise."""
    n, d, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n * h * w, d)


class _SiteStats(torch.autograd.Function):
    """psi, mu, pooled with a hand-written backward: one GEMM and one broadcast add,
    dX = (1/N)(X − μ)(Gψ + Gψᵀ) + gμ/N + gpooled/(h·w)."""

    @staticmethod
    def forward(ctx, feat):
        n, d, h, w = feat.shape
        x = feat.to(acc_dtype(feat.dtype))
        pooled = x.mean((2, 3))
        mu = pooled.mean(0)
        rows = _rows(x)
        psi = rows.T @ rows / rows.shape[0] - torch.outer(mu, mu)
        var = torch.diagonal(psi).clamp_min(0)
        # under CUDA-graph capture the test (a host sync) is skipped for the always-safe centred form
        if _utils.capturing(feat) or not bool((mu * mu <= CANCELLATION_LIMIT * var).all()):
            centred = rows - mu
            psi = centred.T @ centred / rows.shape[0]
        ctx.save_for_backward(feat, mu)
        return psi, mu, pooled

    @staticmethod
    def backward(ctx, g_psi, g_mu, g_pooled):
        feat, mu = ctx.saved_tensors
        return site_stats_grad(feat, mu, g_psi, g_mu, g_pooled)


def site_stats_grad(feat, mu, g_psi, g_mu, g_pooled) -> torch.Tensor:
    """dX (n,d,h,w), dtype of ``feat``, of the gradients of psi (d,d), mu (d,), pooled (n,d)
    (None = zero), with μ (d,) of the forward."""
    n, d, h, w = feat.shape
    count = n * h * w
    dtype = mu.dtype
    bias = torch.zeros(n, d, dtype=dtype, device=mu.device)
    if g_psi is not None:
        S = (g_psi + g_psi.T) / count
        grad_rows = _rows(feat.to(dtype)) @ S
        bias -= mu @ S
    else:
        grad_rows = torch.zeros(count, d, dtype=dtype, device=mu.device)
    if g_mu is not None:
        bias += g_mu / count
    if g_pooled is not None:
        bias += g_pooled / (h * w)
    grad = grad_rows.view(n, h * w, d).add_(bias[:, None, :])
    return grad.view(n, h, w, d).permute(0, 3, 1, 2).to(feat.dtype)


def site_stats(feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``unidd_fast.reference.site_stats`` (feat (n,d,h,w) -> psi (d,d), mu (d,), pooled (n,d)).

    One GEMM on the rows (a view, no copy, for channels_last input) plus the pooled means, from
    which μ follows for free; the centred formula is used when μ²/σ² would cost accuracy.
    The backward is one GEMM too. The result is channels_last-strided for any input layout.
    """
    if feat.dim() != 4:
        raise ValueError(f"site_stats expects a (n, d, h, w) feature map, got shape {tuple(feat.shape)}")
    return _SiteStats.apply(feat)


class RegularizedInverse(torch.autograd.Function):
    """(A + βI)^-1 by Cholesky (``cholesky_ex``: no host sync unless ``check``); backward
    dA = −Y sym(G) Y."""

    @staticmethod
    def forward(ctx, A, beta, check, names):
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        L, info = torch.linalg.cholesky_ex(A + beta * eye)
        if check:
            check_cholesky_info(info, beta, names)
        inv = torch.cholesky_inverse(L)
        ctx.save_for_backward(inv)
        return inv

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return inverse_backward(inv, grad), None, None, None


def regularized_inverse(A: torch.Tensor, beta, check: bool = True, names=None) -> torch.Tensor:
    """(A + βI)^-1 by Cholesky for symmetric A of shape (..., d, d); differentiable in A.

    Raises NotPositiveDefiniteError (naming ``names[i]`` when given) if a factorisation fails.
    """
    return RegularizedInverse.apply(A, beta, check, names)
