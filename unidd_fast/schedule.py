"""The β curriculum of CFM (paper Eq. 16; docs/math.md#curriculum)."""
from __future__ import annotations

import math

import torch

from .errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


def beta_schedule(beta, t, T, kind: str = "cosine", beta_min: float = 1e-6):
    """β_t for step ``t`` of ``T`` (0 <= t <= T), floored at ``beta_min`` > 0.

    cosine: β (1 + cos(π t / T)) / 2 (paper Eq. 16); linear: β (1 − t / T); constant: β.
    Works on Python numbers and on tensors (``t`` may be a device tensor: no host sync).
    """
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown beta schedule {kind!r}; choose one of {SCHEDULES}")
    if not float(beta_min) > 0:
        raise ConfigError(f"beta_min must be > 0, got {beta_min}")
    if isinstance(T, (int, float)) and T <= 0:
        raise ConfigError(f"the curriculum length T must be > 0, got {T}")
    tensor = isinstance(t, torch.Tensor) or isinstance(beta, torch.Tensor)
    if kind == "constant":
        value = beta
    elif kind == "cosine":
        cos = torch.cos(math.pi * t / T) if tensor else math.cos(math.pi * t / T)
        value = beta * (1 + cos) / 2
    else:
        value = beta * (1 - t / T)
    if tensor:
        return torch.clamp(torch.as_tensor(value), min=beta_min)
    return max(float(value), float(beta_min))
