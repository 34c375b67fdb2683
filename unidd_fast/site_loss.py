"""Per-site spectral matching terms: the filtered distance of a synthetic Ψ_s (and signal) to the
real side, and the CFM site loss of paper Eq. 20 (docs/math.md#the-cfm-loss)."""
from __future__ import annotations

import torch

from .filters import krr
from .kernels._utils import acc_dtype
from .ops import regularized_inverse


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
    dtype = torch.promote_types(acc_dtype(psi_syn.dtype), acc_dtype(psi_real.dtype))
    psi_real, sig_real, psi_syn, sig_syn = (t.to(dtype) for t in (psi_real, sig_real, psi_syn, sig_syn))
    inv_real = regularized_inverse(psi_real, beta, backend)
    return filtered_norms(inv_real, inv_real @ sig_real, psi_syn, sig_syn, krr(beta), backend=backend)
