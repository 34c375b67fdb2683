"""Routes the fused ops of ``unidd_fast.ops`` to a kernel backend: "triton" to the kernels
of this package, "cuda" to the compiled extension's wrappers in ``unidd_fast.cuda_ops``."""
from __future__ import annotations

import importlib

from unidd_fast.errors import ConfigError


def _cuda_op(name: str):
    try:
        module = importlib.import_module("unidd_fast.cuda_ops")
    except ImportError as err:
        raise ConfigError(f"backend='cuda' needs unidd_fast.cuda_ops and the compiled extension ({err}); "
                          "build it with UNIDD_BUILD_CUDA=1 pip install -e . --no-build-isolation, "
                          "or use backend='triton' / 'torch'") from err
    op = getattr(module, name, None)
    if op is None:
        raise ConfigError(f"unidd_fast.cuda_ops has no {name}: the CUDA backend does not provide this op yet; "
                          "use backend='triton' or 'torch'")
    return op


def _unknown(name: str):
    return ConfigError(f"no kernel backend {name!r}; kernel backends are 'triton' and 'cuda'")


def site_stats(feat, name: str):
    """(psi, mu, pooled) of feat (n,d,h,w) on kernel backend ``name``."""
    if name == "triton":
        from .site_stats import site_stats as triton_site_stats

        return triton_site_stats(feat)
    if name == "cuda":
        return _cuda_op("site_stats_cuda")(feat)
    raise _unknown(name)


def regularized_inverse(A, beta, name: str, names=None):
    """(A + βI)^-1 of a stack (..., d, d) on kernel backend ``name``."""
    if name == "triton":
        from .reg_inverse import regularized_inverse as triton_regularized_inverse

        return triton_regularized_inverse(A, beta, names=names)
    if name == "cuda":
        return _cuda_op("regularized_inverse_cuda")(A, beta, names=names)
    raise _unknown(name)
