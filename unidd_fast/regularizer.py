"""The interface the recover loop calls on a regulariser (CFMLoss, the SRe2L BN matching loss).

A regulariser reads the teacher through forward hooks: ``model(x)`` captures, then
``reg(targets)`` returns the differentiable loss. Everything else has a no-op default
here, so a regulariser without curriculum, class-batch state or CUDA-graph needs only
``__call__`` (and ``remove`` for its hooks).
"""
from __future__ import annotations

from typing import Protocol

import torch


class Regularizer(Protocol):
    """signal: "soft" asks for the teacher's probabilities (n, c) as targets instead of class
    ids (n,). step: the number of loss calls so far, restored on resume (error messages)."""

    signal: str = "class"
    step: int = 0

    def __call__(self, targets: torch.Tensor) -> torch.Tensor:
        """The loss of the batch the hooks captured last, a 0-d tensor."""
        ...

    def set_curriculum(self, t, T) -> None:
        """Step t of T of the curriculum, before a class-batch."""

    def next_batch(self) -> None:
        """After a class-batch: fold its statistics into the run's state."""

    def make_graph_safe(self) -> None:
        """Make ``__call__`` capturable in a CUDA graph, values unchanged."""

    def graph_outputs(self) -> dict:
        """Python-side results of the last call that a replayed graph refreshes in place."""
        return {}

    def set_graph_outputs(self, outputs: dict) -> None:
        """Hand ``graph_outputs()`` of a captured call back after replaying its graph."""

    def factorisation_status(self) -> torch.Tensor | None:
        """Graph-safe mode: a device tensor, all 0 while every factorisation the captured
        calls made succeeded (the caller zeroes it, outside the graph); None when there is none."""
        return None

    def factorisation_failure(self) -> str:
        """What failed, for an error message, once ``factorisation_status()`` is not all 0."""
        return "a factorisation failed"

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The run state a resumed run needs (checkpointed after every class-batch)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()`` output."""

    def remove(self) -> None:
        """Remove the hooks from the model."""
