"""Public math ops with backend dispatch (see ``backend.py``).

Shapes: feat (n, d, h, w); psi (d, d) or batched (k, d, d); signals (d, c) or (k, d, c).
Float64 input gives float64 output; anything else is computed in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import composite, reference
from .backend import resolve_backend


def site_stats(feat: torch.Tensor, backend: str | None = "auto"):
    """(psi (d,d), mu (d,), pooled (n,d)) of a feature map (n,d,h,w); see reference.site_stats.
    Accumulated in float32 (float64 for float64 input) also inside an autocast region, where
    hooks run: autocast would otherwise round the Gram's inputs to bf16/fp16."""
    name = resolve_backend(backend, feat.device)
    with torch.autocast(feat.device.type, enabled=False):
        if name == "torch":
            return composite.site_stats(feat)
        from .kernels import dispatch

        return dispatch.site_stats(feat, name)


def regularized_inverse(A: torch.Tensor, beta, backend: str | None = "auto", names=None):
    """(A + βI)^-1 for symmetric positive semi-definite A (..., d, d), by Cholesky."""
    name = resolve_backend(backend, A.device, "regularized_inverse")
    if name == "torch":
        return reference.regularized_inverse(A, beta, names=names)
    from .kernels import dispatch

    return dispatch.regularized_inverse(A, beta, name, names=names)


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
    x = pooled.to(reference.acc_dtype(pooled.dtype))
    Y = as_label_matrix(labels, num_classes, x.dtype)
    if Y.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} pooled rows but {Y.shape[0]} labels")
    return x.T @ Y / x.shape[0]


def emu_fold(current: torch.Tensor, running: torch.Tensor, b: int) -> torch.Tensor:
    """EMU (paper Eq. 19): current / b + (1 − 1/b) · running, for class-batch index b >= 1."""
    return current / b + (1 - 1 / b) * running


def filtered_norms(F_real, T_real, psi_syn, sig_syn, f_filter, f_signal=None, names=None,
                   backend: str | None = "auto"):
    """Per-site norms ‖F_real − f(Ψ_s)‖_F and ‖T_real − g(Ψ_s) Φ_s‖_F.

    F_real (k,d,d) = f(Ψ) and T_real (k,d,c) = g(Ψ) Φ of the real side; psi_syn (k,d,d),
    sig_syn (k,d,c); ``f_signal`` (g) defaults to ``f_filter``. Returns two (k,) tensors.
    """
    F_syn = f_filter.matrix(psi_syn, names=names, backend=backend)
    F_sig = F_syn if f_signal is None or f_signal is f_filter else f_signal.matrix(psi_syn, backend=backend)
    f_norm = torch.linalg.matrix_norm(F_real - F_syn)
    s_norm = torch.linalg.matrix_norm(T_real - F_sig @ sig_syn)
    return f_norm, s_norm


def cfm_site_loss(psi_real, sig_real, psi_syn, sig_syn, beta, backend: str | None = "auto"):
    """CFM filter and signal losses of one site (or a stack of sites), paper Eq. 20.

    f_loss = ‖(Ψ + βI)^-1 − (Ψ_s + βI)^-1‖_F, s_loss = ‖(Ψ + βI)^-1 Φ − (Ψ_s + βI)^-1 Φ_s‖_F
    (norms, not squared). psi_*: (..., d, d); sig_*: (..., d, c). Returns two tensors of
    the leading shape, differentiable in every input.
    """
    from .filters import krr

    dtype = torch.promote_types(reference.acc_dtype(psi_syn.dtype), reference.acc_dtype(psi_real.dtype))
    psi_real, sig_real, psi_syn, sig_syn = (t.to(dtype) for t in (psi_real, sig_real, psi_syn, sig_syn))
    inv_real = regularized_inverse(psi_real, beta, backend)
    return filtered_norms(inv_real, inv_real @ sig_real, psi_syn, sig_syn, krr(beta), backend=backend)
