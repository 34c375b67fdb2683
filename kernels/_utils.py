"""Helpers shared by every backend of the fused ops: accumulation dtype, CUDA-graph capture,
the Cholesky status check, the regularised inverse's backward, and where the sources live."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from unidd_fast.errors import NotPositiveDefiniteError

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is accumulated in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def capturing(t: torch.Tensor) -> bool:
    """True while ``t``'s CUDA stream is being captured into a CUDA graph, where a host
    synchronisation (``.item()``, ``bool(tensor)``) is an error: checks that need one skip."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# fp32 holds (A + βI)^-1 to about κ·2^-24 relative, κ = (λmax + β)/β; beyond this κ (≈ 6e-4
# relative; a rank-deficient Ψ with λmax = 100 at β = 1e-4 has κ = 1e6 and an fp32 inverse
# off by percents with info = 0) the inverse is computed in float64 and rounded to fp32.
FP32_MAX_CONDITION = 1e4


def needs_float64(A: torch.Tensor, beta) -> bool:
    """Whether (A + βI)^-1 of symmetric PSD A (..., d, d), computed in fp32, could lose more
    than FP32_MAX_CONDITION·2^-24 relative: λmax ≤ ‖A‖_F bounds κ from above (one host sync).
    While a CUDA graph is captured nothing can be read on the host and β may change between
    replays, so fp32 input is always promoted there (exact whatever β_t becomes)."""
    if acc_dtype(A.dtype) != torch.float32:
        return False
    if capturing(A):
        return True
    b = float(beta)
    bound = float(torch.linalg.matrix_norm(A.detach().float()).max()) if A.numel() else 0.0
    return not bound + b <= FP32_MAX_CONDITION * b  # NaN/Inf: float64 too (the check names it)


# While a CUDA graph is captured, check_cholesky_info cannot raise (it would read info on the
# host); a graph-safe caller installs device buffers here instead, keyed by the names of the
# matrices it factorises together, and the check records into them (collect_cholesky_failures).
_failure_buffers: dict[tuple[str, ...], torch.Tensor] | None = None


@contextlib.contextmanager
def collect_cholesky_failures(buffers: dict[tuple[str, ...], torch.Tensor]):
    """Inside the block, a factorisation of matrices named ``names`` under CUDA-graph capture
    records its info into ``buffers[tuple(names)]`` ((k,) int32 on the device, k matrices:
    0, or the 1-based column of the first failed pivot, the first failure kept) with device
    operations only, so that every replay of the graph records again. The caller reads the
    buffers outside the graph."""
    global _failure_buffers
    previous, _failure_buffers = _failure_buffers, buffers
    try:
        yield
    finally:
        _failure_buffers = previous


def check_cholesky_info(info: torch.Tensor, beta, names=None) -> None:
    """Raise NotPositiveDefiniteError if any factorisation failed. Under CUDA-graph capture
    (no host synchronisation allowed) record ``info`` into the buffer that
    ``collect_cholesky_failures`` holds for ``names`` instead, if any."""
    if capturing(info):
        buffer = None if _failure_buffers is None or names is None else _failure_buffers.get(tuple(names))
        if buffer is not None:
            info = info.reshape(buffer.shape).to(buffer.dtype)
            buffer.copy_(torch.where(buffer == 0, info, buffer))
        return
    bad = torch.nonzero(info.reshape(-1)).flatten().tolist()
    if bad:
        which = [names[i] for i in bad] if names is not None else bad
        raise NotPositiveDefiniteError(
            f"(Ψ + βI) is not positive definite at {which} with β = {float(beta):g}: the matrix "
            "has NaN/Inf entries or β is too small for its rounding error; raise beta / beta_min "
            "or compute in float64"
        )


def inverse_backward(inv: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient of Y = (A + βI)^-1 for symmetric A (..., d, d): dA = −Y sym(G) Y
    (docs/math.md#regularised-inverse-backward)."""
    sym = 0.5 * (grad + grad.transpose(-1, -2))
    return -(inv @ sym @ inv)
