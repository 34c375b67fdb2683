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


# NCHW input: the Gram as n per-sample products X_i X_iᵀ (i = one sample's (d, h·w) view) summed,
# while their n·d² partial sums cost less than a copy of the n·d·h·w map; beyond d = 2·h·w the
# channel-major (d, n·h·w) copy (contiguous runs of h·w values, cheaper than the transposing row
# copy) and one GEMM are cheaper (CPU, bench/bench_nchw_gram.py: the batched Gram 1.07–1.25× faster
# at d ≤ h·w/2; the copy 1.06–1.2× faster at d = 4·h·w, 1.4–7.7× at d ≥ 8·h·w).
BATCHED_GRAM_MAX_RATIO = 2


def _row_view(x: torch.Tensor) -> bool:
    """Whether the (n·h·w, d) rows of x (n, d, h, w) are a view (channels_last strides)."""
    return x.is_contiguous(memory_format=torch.channels_last)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(n, d, h, w) -> (n·h·w, d) rows: a view for channels_last input, a copy otherwise."""
    n, d, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n * h * w, d)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """Σ over the n·h·w rows r of r rᵀ (d, d) of x (n, d, h, w), read in its own layout."""
    n, d, h, w = x.shape
    if _row_view(x):
        rows = _rows(x)
        return rows.T @ rows
    if d > BATCHED_GRAM_MAX_RATIO * h * w:
        columns = x.transpose(0, 1).reshape(d, n * h * w)  # a copy: NCHW has no (d, n·h·w) view
        return columns @ columns.T
    per_sample = x.reshape(n, d, h * w)  # a view for NCHW input
    return torch.bmm(per_sample, per_sample.mT).sum(0)


class _SiteStats(torch.autograd.Function):
    """psi, mu, pooled with a hand-written backward: one GEMM and one broadcast add,
    dX = (1/N)(X − μ)(Gψ + Gψᵀ) + gμ/N + gpooled/(h·w)."""

    @staticmethod
    def forward(ctx, feat):
        n, d, h, w = feat.shape
        count = n * h * w
        x = feat.to(acc_dtype(feat.dtype))
        pooled = x.mean((2, 3))
        mu = pooled.mean(0)
        psi = _gram(x) / count - torch.outer(mu, mu)
        var = torch.diagonal(psi).clamp_min(0)
        # under CUDA-graph capture the test (a host sync) is skipped for the always-safe centred form
        if _utils.capturing(feat) or not bool((mu * mu <= CANCELLATION_LIMIT * var).all()):
            psi = _gram(x - mu[:, None, None]) / count  # the difference keeps x's layout
        ctx.save_for_backward(feat, mu)
        return psi, mu, pooled

    @staticmethod
    def backward(ctx, g_psi, g_mu, g_pooled):
        feat, mu = ctx.saved_tensors
        return site_stats_grad(feat, mu, g_psi, g_mu, g_pooled)


def site_stats_grad(feat, mu, g_psi, g_mu, g_pooled) -> torch.Tensor:
    """dX (n,d,h,w), dtype and memory format of ``feat`` (channels_last for channels_last
    input, contiguous otherwise), of the gradients of psi (d,d), mu (d,), pooled (n,d)
    (None = zero), with μ (d,) of the forward. One GEMM on the rows (channels_last) or one
    batched GEMM S·X_i over the samples' (d, h·w) views (NCHW), the bias added in it."""
    n, d, h, w = feat.shape
    count = n * h * w
    dtype = mu.dtype
    bias = torch.zeros(n, d, dtype=dtype, device=mu.device)
    if g_psi is not None:
        S = (g_psi + g_psi.T) / count
        bias -= mu @ S
    if g_mu is not None:
        bias += g_mu / count
    if g_pooled is not None:
        bias += g_pooled / (h * w)
    if _row_view(feat):
        if g_psi is None:
            grad = bias[:, None, :].expand(n, h * w, d).contiguous()
        else:
            grad = (_rows(feat.to(dtype)) @ S).view(n, h * w, d).add_(bias[:, None, :])
        grad = grad.view(n, h, w, d).permute(0, 3, 1, 2)
    else:
        if g_psi is None:
            grad = bias[:, :, None].expand(n, d, h * w).contiguous()
        else:
            grad = torch.baddbmm(bias[:, :, None], S.expand(n, d, d), feat.to(dtype).reshape(n, d, h * w))
        grad = grad.view(n, d, h, w)
    return grad.to(feat.dtype)


def site_stats(feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``unidd_fast.reference.site_stats`` (feat (n,d,h,w) -> psi (d,d), mu (d,), pooled (n,d)).

    Reads the feature map in its own layout, without a permuted copy: one GEMM on the rows (a
    view for channels_last input), or for NCHW input one batched GEMM over the samples'
    (d, h·w) views (the channel-major copy and one GEMM where d > BATCHED_GRAM_MAX_RATIO·h·w
    makes it cheaper); μ
    follows from the pooled means; the centred formula is used when μ²/σ² would cost accuracy.
    The backward is one (batched) GEMM too, and its gradient has the input's memory format.
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
