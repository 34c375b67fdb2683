"""The UniDD objective (paper Eq. 1; docs/math.md#unidd-and-the-filters) on fixed features."""
from __future__ import annotations

import torch

from .filters import SpectralFilter
from .ops import as_label_matrix
from .kernels._utils import acc_dtype


def unidd_loss(X, Y, Xs, Ys, f: SpectralFilter, signal: bool = True) -> torch.Tensor:
    """‖f(XᵀX) g − f(XsᵀXs) g_s‖²_F with g = XᵀY (``signal=True``) or g = I.

    X (n, d), Xs (m, d) features; Y, Ys one-hot/soft labels (n, c) or class ids (n,).
    The filter acts on the unnormalised Gram matrices, as in the paper's Table 1.
    """
    dtype = torch.promote_types(acc_dtype(X.dtype), acc_dtype(Xs.dtype))
    X, Xs = X.to(dtype), Xs.to(dtype)
    F_real, F_syn = f.matrix(X.T @ X), f.matrix(Xs.T @ Xs)
    if signal:
        c = None
        if Y.dim() == 1 and Ys.dim() == 1:
            c = int(max(Y.max(), Ys.max())) + 1
        Y, Ys = as_label_matrix(Y, c, dtype), as_label_matrix(Ys, c, dtype)
        F_real, F_syn = F_real @ (X.T @ Y), F_syn @ (Xs.T @ Ys)
    return ((F_real - F_syn) ** 2).sum()
