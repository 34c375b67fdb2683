"""Plain PyTorch composites of the fused ops: the ``torch`` backend and the oracle of the
kernel tests. Every Triton/CUDA op in ``kernels/`` and ``csrc/`` must match these.

Accumulation dtype: float64 for float64 input, float32 for everything else (fp32, fp16,
bf16), whatever autocast says.
"""
from __future__ import annotations

import torch

from .errors import NotPositiveDefiniteError


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is accumulated in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, d)  # a view for channels_last input
    mu = rows.mean(0)
    centred = rows - mu
    psi = centred.T @ centred / rows.shape[0]
    pooled = x.mean((2, 3))
    return psi, mu, pooled


def capturing(t: torch.Tensor) -> bool:
    """True while ``t``'s CUDA stream is being captured into a CUDA graph, where a host
    synchronisation (``.item()``, ``bool(tensor)``) is an error: checks that need one skip."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_cholesky_info(info: torch.Tensor, beta, names=None) -> None:
    """Raise NotPositiveDefiniteError if any factorisation failed (skipped under CUDA-graph
    capture, where the check would need a host synchronisation)."""
    if capturing(info):
        return
    bad = torch.nonzero(info.reshape(-1)).flatten().tolist()
    if bad:
        which = [names[i] for i in bad] if names is not None else bad
        raise NotPositiveDefiniteError(
            f"(Ψ + βI) is not positive definite at {which} with β = {float(beta):g}: the matrix "
            "has NaN/Inf entries or β is too small for its rounding error; raise beta / beta_min "
            "or compute in float64"
        )


class _RegularizedInverse(torch.autograd.Function):
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
        # Y = (A + βI)^-1, dA = -Y sym(G) Y  (A is symmetric, so its gradient is too)
        sym = 0.5 * (grad + grad.transpose(-1, -2))
        return -(inv @ sym @ inv), None, None, None


def regularized_inverse(A: torch.Tensor, beta, check: bool = True, names=None) -> torch.Tensor:
    """(A + βI)^-1 by Cholesky for symmetric A of shape (..., d, d); differentiable in A.

    Raises NotPositiveDefiniteError (naming ``names[i]`` when given) if a factorisation fails.
    """
    return _RegularizedInverse.apply(A, beta, check, names)
