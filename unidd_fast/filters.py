"""Spectral filters f(λ) of UniDD (paper Table 1; docs/math.md#unidd-and-the-filters).

Each filter is a callable on eigenvalue tensors, ``f(lam)``, and applies to a symmetric
matrix A = U diag(λ) Uᵀ as ``f.matrix(A) = U diag(f(λ)) Uᵀ``. Filters with a closed form
(KRR: a Cholesky inverse; low-pass: A itself; all-pass: I; MTT: matrix powers) skip the
eigendecomposition, so their gradients stay exact when eigenvalues repeat.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable

import torch

from . import ops
from .errors import ConfigError


def _eye_like(A: torch.Tensor) -> torch.Tensor:
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)


class SpectralFilter(abc.ABC):
    """Base class: a function of the eigenvalues, applied through the eigendecomposition."""

    name = "filter"

    @abc.abstractmethod
    def __call__(self, lam: torch.Tensor) -> torch.Tensor:
        """f(λ), elementwise on an eigenvalue tensor."""

    def matrix(self, A: torch.Tensor, names=None, backend: str | None = "auto") -> torch.Tensor:
        """f(A) for symmetric A of shape (..., d, d); ``names`` label batch entries in errors."""
        lam, U = torch.linalg.eigh(A)
        return self.from_eigh(U, lam)

    def from_eigh(self, U: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """U diag(f(λ)) Uᵀ from a precomputed eigendecomposition (the cached real side)."""
        return (U * self(lam).unsqueeze(-2)) @ U.transpose(-1, -2)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class KRR(SpectralFilter):
    """Kernel ridge regression / FRePo: f(λ) = (λ + β)^-1 (the CFM filter, a high-pass)."""

    name = "krr"

    def __init__(self, beta):
        if not float(beta) > 0:
            raise ConfigError(f"the KRR filter needs beta > 0, got {float(beta)}")
        self.beta = beta

    def __call__(self, lam):
        return 1.0 / (lam + self.beta)

    def matrix(self, A, names=None, backend="auto"):
        return ops.regularized_inverse(A, self.beta, backend, names=names)


class LowPass(SpectralFilter):
    """Gradient matching (DC): f(λ) = λ, i.e. match Ψ itself."""

    name = "lowpass"

    def __call__(self, lam):
        return lam

    def matrix(self, A, names=None, backend="auto"):
        return A


class AllPass(SpectralFilter):
    """Distribution matching (DM): f(λ) = 1, so f(A) = I and only the signal is matched."""

    name = "allpass"

    def __call__(self, lam):
        return torch.ones_like(lam)

    def matrix(self, A, names=None, backend="auto"):
        return _eye_like(A)


class MTT(SpectralFilter):
    """Trajectory matching, parameter term: f(λ) = (1 − αλ)^steps."""

    name = "mtt"

    def __init__(self, alpha: float, steps: int):
        if steps < 0 or not float(alpha) > 0:
            raise ConfigError(f"MTT needs alpha > 0 and steps >= 0, got alpha={alpha}, steps={steps}")
        self.alpha, self.steps = float(alpha), int(steps)

    def __call__(self, lam):
        return (1.0 - self.alpha * lam) ** self.steps

    def matrix(self, A, names=None, backend="auto"):
        return torch.linalg.matrix_power(_eye_like(A) - self.alpha * A, self.steps)


class MTTSum(SpectralFilter):
    """Trajectory matching, signal term: f(λ) = Σ_{p<steps} (1 − αλ)^p."""

    name = "mtt_sum"

    def __init__(self, alpha: float, steps: int):
        if steps < 1 or not float(alpha) > 0:
            raise ConfigError(f"MTT-sum needs alpha > 0 and steps >= 1, got alpha={alpha}, steps={steps}")
        self.alpha, self.steps = float(alpha), int(steps)

    def __call__(self, lam):
        step = 1.0 - self.alpha * lam
        return sum(step**p for p in range(self.steps))

    def matrix(self, A, names=None, backend="auto"):
        eye = _eye_like(A)
        step = eye - self.alpha * A
        total = eye
        for _ in range(self.steps - 1):  # Horner: I + M (I + M (...))
            total = eye + step @ total
        return total


@dataclass(frozen=True)
class FilterChoice:
    """One ``filter=`` option of CFMLoss (paper Table 1). ``pair(beta, alpha, steps)`` builds
    (f, g): f filters Ψ in the filter term, g multiplies the signal (the same object when
    they are one filter); ``curriculum``: β_t follows the schedule (otherwise it stays β);
    ``alpha_on_signal``: the signal term is weighted by α (MTT in Table 1)."""

    pair: Callable[..., tuple[SpectralFilter, SpectralFilter]]
    curriculum: bool = False
    alpha_on_signal: bool = False


def _same(f: SpectralFilter) -> tuple[SpectralFilter, SpectralFilter]:
    return f, f


# The filter options of the loss, by name: the one table that CFMLoss, the config choices
# and the CLI read. "cfm" is KRR with the β curriculum (CFM), "krr" KRR at a fixed β (FRePo);
# "dc" Table 1's DC (f = λ, signal unfiltered), "lfm" the authors' release's LFM (Ψ in both
# terms); "allpass" DM; "mtt" trajectory matching (steps: P on the real side, Q synthetic).
LOSS_FILTERS: dict[str, FilterChoice] = {
    "cfm": FilterChoice(lambda beta, alpha, steps: _same(KRR(beta)), curriculum=True),
    "krr": FilterChoice(lambda beta, alpha, steps: _same(KRR(beta))),
    "dc": FilterChoice(lambda beta, alpha, steps: (LowPass(), AllPass())),
    "lfm": FilterChoice(lambda beta, alpha, steps: _same(LowPass())),
    "allpass": FilterChoice(lambda beta, alpha, steps: _same(AllPass())),
    "mtt": FilterChoice(lambda beta, alpha, steps: (MTT(alpha, steps), MTTSum(alpha, steps)), alpha_on_signal=True),
}

# Names no longer in the table, with the error that says what to use instead.
RENAMED_FILTERS = {
    "lowpass": "filter 'lowpass' has two readings, choose one: 'lfm' (the authors' release: Ψ in both terms) "
               "or 'dc' (paper Table 1's DC: Ψ in the filter term, signal unfiltered)",
}


def krr(beta) -> KRR:
    return KRR(beta)


def all_pass() -> AllPass:
    return AllPass()


def low_pass() -> LowPass:
    return LowPass()


def mtt(alpha: float, steps: int) -> MTT:
    return MTT(alpha, steps)


def mtt_sum(alpha: float, steps: int) -> MTTSum:
    return MTTSum(alpha, steps)
