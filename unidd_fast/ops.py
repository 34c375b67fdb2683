"""Public math ops; the fused ones run on the backend ``kernels/registry.py`` resolves.

Shapes: feat (n, d, h, w); psi (d, d) or batched (k, d, d); signals (d, c) or (k, d, c).
Float64 input gives float64 output; anything else is computed in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import library, registry
from .kernels._utils import acc_dtype


def site_stats(feat: torch.Tensor, backend: str | None = "auto"):
    """(psi (d,d), mu (d,), pooled (n,d)) of a feature map (n,d,h,w); docs/math.md#site-statistics.
    Accumulated in float32 (float64 for float64 input) also inside an autocast region, where
    hooks run: autocast would otherwise round the Gram's inputs to bf16/fp16."""
    if feat.dim() != 4:
        raise ValueError(f"site_stats expects a (n, d, h, w) feature map, got shape {tuple(feat.shape)}")
    name = registry.resolve("site_stats", backend, feat.device, feat.dtype)
    with torch.autocast(feat.device.type, enabled=False):
        return library.site_stats(feat, name)


def regularized_inverse(A: torch.Tensor, beta, backend: str | None = "auto", names=None):
    """(A + βI)^-1 for symmetric positive semi-definite A (..., d, d), by Cholesky; β a float or a
    0-d tensor (read on the device). NotPositiveDefiniteError names ``names[i]`` on failure.
    Output in ``acc_dtype(A.dtype)``; fp32 input whose κ = (λmax + β)/β fp32 cannot hold
    (``kernels._utils.needs_float64``) is inverted in float64 and rounded, never returned
    silently wrong."""
    name = registry.resolve("regularized_inverse", backend, A.device, A.dtype, A.shape[-1])
    joined = None if names is None else library.NAME_SEPARATOR.join(map(str, names))
    if torch.is_tensor(beta):
        return library.regularized_inverse(A, 0.0, beta, True, joined, name)
    return library.regularized_inverse(A, float(beta), None, True, joined, name)


def as_label_matrix(labels: torch.Tensor, num_classes: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Integer class ids (n,) -> one-hot (n, c); probabilities (n, c) pass through."""
    if labels.dim() == 1:
        if labels.is_floating_point():
            raise ValueError("1-D labels must be integer class ids; pass probabilities as (n, c)")
        c = num_classes if num_classes is not None else int(labels.max()) + 1
        return F.one_hot(labels.long(), c).to(dtype)
    if labels.dim() != 2:
        raise ValueError(f"labels must be (n,) class ids or (n, c) probabilities, got shape {tuple(labels.shape)}")
    if num_classes is not None and labels.shape[1] != num_classes:
        raise ValueError(f"labels have {labels.shape[1]} columns but num_classes={num_classes}")
    return labels.to(dtype)


def flc(pooled: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Feature-label correlation Φ = (1/n) X'ᵀ Y of pooled features (n, d) -> (d, c)."""
    x = pooled.to(acc_dtype(pooled.dtype))
    Y = as_label_matrix(labels, num_classes, x.dtype)
    if Y.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} pooled rows but {Y.shape[0]} labels")
    return x.T @ Y / x.shape[0]


def emu_fold(current: torch.Tensor, running: torch.Tensor, b: int) -> torch.Tensor:
    """EMU (paper Eq. 19): current / b + (1 − 1/b) · running, for class-batch index b >= 1."""
    return current / b + (1 - 1 / b) * running
