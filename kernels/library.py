"""The fused ops as PyTorch custom operators (``torch.ops.unidd_fast.*``), so that
``torch.compile`` traces through them without a graph break (``register_fake`` gives shapes,
``register_autograd`` the backward) and autograd, CUDA graphs and eager code all call the
same thing. Each op resolves its backend in ``registry`` at run time — the torch composite on
the CPU, the chosen kernel on CUDA — and runs it outside autograd; the registered backward is
another op (site statistics) or plain torch (the inverse, docs/math.md#gradients).

Outputs are contiguous (the fake implementations promise it): d×d results are small, and a
compiled graph needs one stride per op whatever the backend.
"""
from __future__ import annotations

import torch

from . import registry
from ._utils import acc_dtype, inverse_backward, needs_float64

NAME_SEPARATOR = "\x1f"  # custom ops take no list of strings: site names travel joined


@torch.library.custom_op("unidd_fast::site_stats", mutates_args=())
def site_stats(feat: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """psi (d,d), mu (d,), pooled (n,d) in ``acc_dtype(feat.dtype)`` of feat (n,d,h,w)."""
    impl = registry.implementation("site_stats", backend, feat.device, feat.dtype)
    with torch.no_grad():
        return tuple(t.contiguous() for t in impl(feat))


@site_stats.register_fake
def _(feat, backend):
    n, d = feat.shape[:2]
    dtype = acc_dtype(feat.dtype)
    return feat.new_empty(d, d, dtype=dtype), feat.new_empty(d, dtype=dtype), feat.new_empty(n, d, dtype=dtype)


@torch.library.custom_op("unidd_fast::site_stats_grad", mutates_args=())
def site_stats_grad(feat: torch.Tensor, mu: torch.Tensor, g_psi: torch.Tensor | None, g_mu: torch.Tensor | None,
                    g_pooled: torch.Tensor | None, backend: str) -> torch.Tensor:
    """dX (n,d,h,w), dtype and layout of ``feat``, of the statistics' gradients (None = zero)."""
    impl = registry.implementation("site_stats_grad", backend, feat.device, feat.dtype)
    return impl(feat, mu, g_psi, g_mu, g_pooled).contiguous(memory_format=_layout(feat))


def _layout(feat: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if feat.is_contiguous(memory_format=torch.channels_last) and not \
        feat.is_contiguous() else torch.contiguous_format


@site_stats_grad.register_fake
def _(feat, mu, g_psi, g_mu, g_pooled, backend):
    return torch.empty_like(feat, memory_format=_layout(feat))


def _site_stats_setup(ctx, inputs, output):
    feat, backend = inputs
    ctx.save_for_backward(feat, output[1])
    ctx.backend = backend


def _site_stats_backward(ctx, g_psi, g_mu, g_pooled):
    feat, mu = ctx.saved_tensors
    return site_stats_grad(feat, mu, g_psi, g_mu, g_pooled, ctx.backend), None


site_stats.register_autograd(_site_stats_backward, setup_context=_site_stats_setup)


@torch.library.custom_op("unidd_fast::regularized_inverse", mutates_args=())
def regularized_inverse(A: torch.Tensor, beta: float, beta_tensor: torch.Tensor | None, check: bool,
                        names: str | None, backend: str) -> torch.Tensor:
    """(A + βI)^-1 of symmetric A (..., d, d) in ``acc_dtype(A.dtype)``; β is ``beta_tensor``
    (a 0-d device tensor: CUDA-graph safe) when given, else ``beta``. ``check``: raise
    NotPositiveDefiniteError naming ``names`` (joined by NAME_SEPARATOR) on a failed factorisation.
    fp32 input that fp32 cannot invert accurately (``needs_float64``) is inverted in float64."""
    labels = None if names is None else names.split(NAME_SEPARATOR)
    beta = beta if beta_tensor is None else beta_tensor
    with torch.no_grad():
        if needs_float64(A, beta):  # decided here, inside the op: torch.compile traces no host read
            impl = registry.implementation("regularized_inverse", backend, A.device, torch.float64)
            return impl(A.double(), beta, names=labels, check=check).to(acc_dtype(A.dtype)).contiguous()
        impl = registry.implementation("regularized_inverse", backend, A.device, A.dtype)
        return impl(A, beta, names=labels, check=check).contiguous()


@regularized_inverse.register_fake
def _(A, beta, beta_tensor, check, names, backend):
    return A.new_empty(A.shape, dtype=acc_dtype(A.dtype))


def _inverse_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _inverse_backward(ctx, grad):
    (inv,) = ctx.saved_tensors
    return inverse_backward(inv, grad), None, None, None, None, None


regularized_inverse.register_autograd(_inverse_backward, setup_context=_inverse_setup)
