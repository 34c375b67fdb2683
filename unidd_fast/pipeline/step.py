"""The recover iteration, with no host synchronisation: eager, or captured as a CUDA graph.

- ``recover_step``: one update of a class-batch (augment → teacher forward under autocast →
  CE + regulariser → backward → Adam step → clip to the valid pixel range).
- ``RecoverEngine``: whole class-batches (paper Algorithm 1's inner loop): fresh Adam state
  and a cosine learning rate over ``rc.iterations`` steps. Every per-step quantity lives on
  the device, in one set of buffers per class-batch shape (images, Adam moments and step,
  learning rate, iteration counter, per-step flags: loss finite, images finite, every
  Cholesky factorisation of the regulariser succeeded), so the step reads nothing from
  the host. With CUDA graphs the step is captured once per shape and replayed; without, the
  same function runs eagerly (the CPU path, and how the tests exercise it).

Precision: the teacher runs under autocast (bf16) when asked; the site statistics, the
inverses and the losses stay float32 (``ops.site_stats`` turns autocast off in the hooks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, NonFiniteError, NotPositiveDefiniteError
from ..profiling import annotate
from ..progress import progress
from ..regularizer import Regularizer
from .augment import Augment
from .train import lr_at

PRECISIONS = ("auto", "fp32", "bf16")
GRAPH_MODES = ("auto", "on", "off")
WARMUP_STEPS = 3  # eager steps before a capture (allocator, cuBLAS workspaces, lazy Adam state)
CHECK_EVERY = 50  # GPU, eager: steps between two reads of the finite flags (each read waits for the device)


@dataclass(frozen=True)
class StepOptions:
    """precision: "fp32" or "bf16" (autocast dtype of the teacher); cuda_graphs: capture and
    replay the step; compile: ``torch.compile`` the teacher; channels_last: run teacher and
    images in channels_last (saves the (n·h·w, d) row copies of the site statistics);
    capturable: Adam keeps its step count and learning rate on the device (CUDA only; always
    on with cuda_graphs, which cannot capture the other Adam)."""

    precision: str = "fp32"
    cuda_graphs: bool = False
    compile: bool = False
    channels_last: bool = True
    capturable: bool = False


def resolve_options(rc, device) -> StepOptions:
    """StepOptions of a RecoverConfig on ``device``: precision "auto" is bf16 on CUDA and
    fp32 on the CPU; cuda_graphs "auto" is on for CUDA, with capturable Adam; "on" without
    CUDA is an error; channels_last as ``rc.channels_last``."""
    device = torch.device(device)
    if rc.precision not in PRECISIONS:
        raise ConfigError(f"recover.precision must be one of {PRECISIONS}, got {rc.precision!r}")
    if rc.cuda_graphs not in GRAPH_MODES:
        raise ConfigError(f"recover.cuda_graphs must be one of {GRAPH_MODES}, got {rc.cuda_graphs!r}")
    if rc.cuda_graphs == "on" and device.type != "cuda":
        raise ConfigError(f"--cuda-graphs on needs a CUDA device, the run is on {device}; use --cuda-graphs off")
    precision = rc.precision if rc.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    graphs = device.type == "cuda" and rc.cuda_graphs != "off"
    return StepOptions(precision=precision, cuda_graphs=graphs, compile=bool(rc.compile),
                       channels_last=bool(rc.channels_last), capturable=graphs)


def teacher_autocast(device: torch.device, precision: str):
    """Autocast for the teacher: bf16 when ``precision`` is "bf16", a no-op for "fp32".
    No weight cache: a cache filled during a CUDA-graph capture would go stale."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16",
                          cache_enabled=False)


def recover_step(images: torch.Tensor, targets: torch.Tensor, model: nn.Module, regularizer: Regularizer | None,
                 optimizer: torch.optim.Optimizer, augment: Augment, generator: torch.Generator | None,
                 lo: torch.Tensor, hi: torch.Tensor, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """One update of ``images`` (k, C, H, W), a leaf the optimizer owns, toward class ids
    ``targets`` (k,). Returns the detached (CE, regulariser) values as device tensors.
    Graph-safe when the regulariser is (BNMatchLoss; CFMLoss after ``make_graph_safe()``)."""
    optimizer.zero_grad(set_to_none=True)
    with annotate("recover/augment"):
        x = augment(images, generator)
    with annotate("recover/forward"), teacher_autocast(images.device, precision):
        logits = model(x)
    with annotate("recover/loss"):
        logits = logits.float()
        ce = F.cross_entropy(logits, targets)
        if regularizer is None:
            reg = torch.zeros((), device=images.device)
        else:
            # signal="soft" matches FLCs built from the teacher's probabilities of this batch
            soft = regularizer.signal == "soft"
            reg = regularizer(torch.softmax(logits.detach(), 1) if soft else targets)
    with annotate("recover/backward"):
        (ce + reg).backward()
    with annotate("recover/optimizer"):
        optimizer.step()
        with torch.no_grad():
            images.clamp_(lo, hi)
    return ce.detach(), reg.detach()


def raise_if_not_finite(finite: torch.Tensor, iterations: int, factorisation_failure=None) -> None:
    """finite (steps, 3): per step, (loss finite, images finite after the update, the
    regulariser's factorisations succeeded). The first failing step is named, with the
    failed factorisation first (it is what makes the loss NaN or wrong): then
    NotPositiveDefiniteError with ``factorisation_failure()``, the regulariser's description."""
    if bool(finite.all()):
        return
    it = int(torch.nonzero(~finite.all(1))[0])
    ok = finite[it].tolist()
    if not ok[2]:
        raise NotPositiveDefiniteError(f"iteration {it + 1}/{iterations}: {factorisation_failure()}")
    what = ("the loss (cross-entropy + regulariser) is NaN/Inf" if not ok[0] else
            "the synthetic images became NaN/Inf in the update")
    raise NonFiniteError(f"iteration {it + 1}/{iterations}: {what}; lower recover.lr (--set recover.lr=...) or "
                         "check the teacher and the statistics")


class _Slot:
    """Device buffers of one class-batch shape (k, C, H, W)."""

    def __init__(self, shape, rc, device, memory_format, capturable: bool):
        iterations = max(rc.iterations, 1)
        self.images = torch.zeros(shape, device=device).contiguous(memory_format=memory_format).requires_grad_(True)
        self.targets = torch.zeros(shape[0], dtype=torch.long, device=device)
        self.schedule = torch.tensor([lr_at(rc.lr, i, rc.iterations) for i in range(iterations)],
                                     dtype=torch.float32, device=device)
        self.lr = self.schedule[0].clone()
        self.it = torch.zeros((), dtype=torch.long, device=device)
        self.finite = torch.ones(iterations, 3, dtype=torch.bool, device=device)
        self.optimizer = torch.optim.Adam([self.images], lr=self.lr, betas=tuple(rc.betas), capturable=capturable)
        self.graph = None
        self.out = None
        self.reg_outputs = None  # what the regulariser's captured call writes on every replay

    def reset(self, init: torch.Tensor, targets: torch.Tensor) -> None:
        """Start a class-batch: images from ``init``, fresh Adam state, iteration 0."""
        with torch.no_grad():
            self.images.copy_(init)
            self.targets.copy_(targets)
            for state in self.optimizer.state.values():
                for value in state.values():
                    value.zero_()
            self.it.zero_()
            self.finite.fill_(True)


class RecoverEngine:
    """Recovers class-batches with ``recover_step`` (see the module docstring).

    model: the teacher (eval mode, parameters frozen); regularizer: CFMLoss, BNMatchLoss or
    None; rc: lr, betas, iterations; lo/hi (1, C, 1, 1): the valid pixel range. With
    ``options.cuda_graphs`` (or ``graph_safe=True``, to run the captured function eagerly on
    the CPU) the regulariser is made graph-safe. The finite flags are read every
    ``check_every`` steps (default: every step on the CPU, CHECK_EVERY on a GPU, once per
    class-batch with graphs) and after the last step.
    """

    def __init__(self, model: nn.Module, regularizer: Regularizer | None, rc, augment: Augment, generator: torch.Generator | None,
                 lo: torch.Tensor, hi: torch.Tensor, options: StepOptions = StepOptions(),
                 check_every: int | None = None, graph_safe: bool | None = None, compile_backend: str = "inductor"):
        self.device = lo.device
        if options.cuda_graphs and self.device.type != "cuda":
            raise ConfigError(f"CUDA graphs need a CUDA device, the teacher is on {self.device}")
        self.rc, self.regularizer, self.augment, self.generator = rc, regularizer, augment, generator
        self.lo, self.hi, self.options = lo, hi, options
        self.graph_safe = options.cuda_graphs if graph_safe is None else graph_safe
        if self.graph_safe and regularizer is not None:
            regularizer.make_graph_safe()
        if check_every is None:
            check_every = rc.iterations if options.cuda_graphs else 1 if self.device.type == "cpu" else CHECK_EVERY
        self.check_every = max(int(check_every), 1)
        self.memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
        model.to(memory_format=self.memory_format)
        if options.compile:
            # the regularisers read the teacher through forward hooks; by default dynamo does not
            # guard on hooks, and an instance with hooks then reuses a graph traced for one
            # without (same class) and its hooks never run (torch 2.14)
            torch._dynamo.config.skip_nnmodule_hook_guards = False
        self.forward = torch.compile(model, backend=compile_backend) if options.compile else model
        self._slots: dict[tuple, _Slot] = {}

    def _iteration(self, slot: _Slot) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured function: learning rate of this iteration, the step, its finite flags."""
        with torch.no_grad():
            slot.lr.copy_(slot.schedule.index_select(0, slot.it.view(1)).view(()))
        ce, reg = recover_step(slot.images, slot.targets, self.forward, self.regularizer, slot.optimizer,
                               self.augment, self.generator, self.lo, self.hi, self.options.precision)
        with torch.no_grad():
            status = self._status()
            factored = (status == 0).all() if status is not None else torch.ones((), dtype=torch.bool, device=ce.device)
            flags = torch.stack([torch.isfinite(ce) & torch.isfinite(reg), torch.isfinite(slot.images).all(), factored])
            slot.finite.index_copy_(0, slot.it.view(1), flags.view(1, 3))
            slot.it += 1
        return ce, reg

    def _status(self) -> torch.Tensor | None:
        return self.regularizer.factorisation_status() if self.regularizer is not None else None

    def _reset(self, slot: _Slot, init: torch.Tensor, targets: torch.Tensor) -> None:
        """Start a class-batch: the slot's buffers and the regulariser's factorisation status."""
        slot.reset(init, targets)
        status = self._status()
        if status is not None:
            status.zero_()

    def _capture(self, slot: _Slot, init: torch.Tensor, targets: torch.Tensor) -> None:
        """Warm up on a side stream, undo the warm-up's effects, capture one iteration."""
        generator = self.generator
        rng = generator.get_state() if generator is not None else torch.cuda.get_rng_state(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), annotate("recover/graph warm-up"):
            for _ in range(min(WARMUP_STEPS, self.rc.iterations)):
                self._iteration(slot)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._reset(slot, init, targets)
        if generator is not None:
            generator.set_state(rng)
        else:
            torch.cuda.set_rng_state(rng, self.device)
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            graph.register_generator_state(generator)
        slot.optimizer.zero_grad(set_to_none=True)
        with annotate("recover/graph capture"), torch.cuda.graph(graph):
            slot.out = self._iteration(slot)
        slot.graph = graph
        if self.regularizer is not None:
            slot.reg_outputs = self.regularizer.graph_outputs()

    def run(self, init: torch.Tensor, targets: torch.Tensor, desc: str = "iterations"):
        """Optimise one class-batch from ``init`` (k, C, H, W) toward ``targets`` (k,).
        Returns (images, last CE, last regulariser), detached copies on the device."""
        T = self.rc.iterations
        if T == 0:
            nan = torch.full((), float("nan"), device=self.device)
            return init.detach().to(self.device).clone(), nan, nan.clone()
        key = tuple(init.shape)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(key, self.rc, self.device, self.memory_format,
                                            self.options.capturable or self.options.cuda_graphs)
        init, targets = init.to(self.device), targets.to(self.device)
        self._reset(slot, init, targets)
        with annotate("recover/class-batch"):
            if self.options.cuda_graphs and slot.graph is None:
                self._capture(slot, init, targets)
            for it in progress(range(T), desc=desc):
                if slot.graph is not None:
                    slot.graph.replay()
                else:
                    try:
                        slot.out = self._iteration(slot)
                    except (NonFiniteError, NotPositiveDefiniteError) as exc:
                        raise type(exc)(f"iteration {it + 1}/{T}: {exc}") from exc
                if (it + 1) % self.check_every == 0 or it + 1 == T:
                    raise_if_not_finite(slot.finite[: it + 1], T, None if self.regularizer is None else
                                        self.regularizer.factorisation_failure)
            if slot.graph is not None and slot.reg_outputs is not None:
                # the replays refreshed the captured statistics; point the regulariser at this
                # shape's (another shape's graph may have been captured or replayed since)
                self.regularizer.set_graph_outputs(slot.reg_outputs)
        ce, reg = slot.out
        return slot.images.detach().clone(), ce.clone(), reg.clone()
