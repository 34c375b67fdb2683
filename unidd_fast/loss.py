"""CFMLoss: the curriculum frequency matching regulariser over every hook site of a teacher.

Data flow per step: teacher forward -> pre-hooks compute (Ψ_b, μ_b, pooled) per site ->
``cfm(targets)`` stacks sites of equal width, blends in the EMU means (``emu.EMU``), filters
and returns η (L_filter + L_signal). The real side f(Ψ), f(Ψ)Φ is formed from a cached
float64 eigendecomposition and cached per β, so it costs nothing while β is constant.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .emu import EMU, Batch
from .errors import ConfigError, NonFiniteError, StatsMismatchError
from .filters import LOSS_FILTERS, RENAMED_FILTERS
from .kernels._utils import collect_cholesky_failures
from .ops import flc, site_stats
from .real_stats import RealStats
from .regularizer import Regularizer
from .schedule import beta_schedule
from .site_loss import filtered_norms
from .sites import SiteHooks

SIGNALS = ("class", "mean", "soft")
FILTERS = tuple(LOSS_FILTERS)


def site_width(module: nn.Module) -> int | None:
    """Channel count of a site's input, when the module says it."""
    for attr in ("num_features", "in_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    return None


class CFMLoss(Regularizer):
    """η (L_filter + L_signal) (docs/math.md#the-cfm-loss) between a synthetic batch and real statistics.

    Call ``model(x)`` first (the hooks capture every site's input), then ``cfm(targets)``:
    targets are class ids (n,) for signal "class"/"mean", probabilities (n, c) for "soft".
    ``next_batch()`` after each class-batch folds its detached statistics into ``cfm.emu``
    (an ``emu.EMU``: the running means and the class-batch index b, with save/load).
    ``make_graph_safe()`` keeps β_t, b and the EMU means in device tensors (for CUDA graphs).

    Filters (docs/math.md; paper Table 1): "cfm" (λ + β_t)⁻¹ on both terms with the β
    curriculum; "krr" the same at constant β (FRePo); "dc" the paper's DC, f = λ in the filter
    term and an unfiltered signal term ‖Φ − Φ_s‖; "lfm" the release's LFM, Ψ in both terms
    (‖Ψ − Ψ_s‖ + ‖ΨΦ − Ψ_sΦ_s‖); "allpass" DM, only ‖Φ − Φ_s‖ (the filter term is 0);
    "mtt" ‖(I − αΨ)^P − (I − αΨ_s)^Q‖ + α ‖Σ_{p<P}(I − αΨ)^p Φ − Σ_{q<Q}(I − αΨ_s)^q Φ_s‖ with
    P = ``mtt_steps`` (real), Q = ``mtt_steps_syn`` (synthetic; default P), α = ``mtt_alpha``.
    """

    def __init__(self, model: nn.Module, stats: RealStats, beta: float = 0.1, eta: float = 0.1,
                 signal: str = "class", emu: bool = True, sites="bn", filter: str = "cfm",
                 beta_min: float = 1e-6, schedule: str = "cosine", mtt_alpha: float = 0.01,
                 mtt_steps: int = 10, mtt_steps_syn: int | None = None, backend: str | None = "auto",
                 check_finite: bool = True):
        if signal not in SIGNALS:
            raise ConfigError(f"signal must be one of {SIGNALS}, got {signal!r}")
        if filter in RENAMED_FILTERS:
            raise ConfigError(RENAMED_FILTERS[filter])
        if filter not in LOSS_FILTERS:
            raise ConfigError(f"filter must be one of {FILTERS}, got {filter!r}")
        if eta < 0:
            raise ConfigError(f"eta must be >= 0, got {eta}")
        self._choice = LOSS_FILTERS[filter]
        self.beta, self.eta, self.signal, self.use_emu = beta, eta, signal, emu
        self.filter, self.beta_min, self.backend, self.check_finite = filter, beta_min, backend, check_finite
        self.mtt = (float(mtt_alpha), int(mtt_steps), int(mtt_steps if mtt_steps_syn is None else mtt_steps_syn))
        self.signal_weight = self.mtt[0] if self._choice.alpha_on_signal else 1.0  # Table 1: α on MTT's signal term
        self.beta_t = beta
        self._filters(), self._filters(real=True)  # refuse a bad beta / MTT setting now, not at the first call
        self.schedule = schedule if self._choice.curriculum else "constant"
        self.num_classes = stats.num_classes
        self.enabled = True
        self.graph_safe = False
        self.step = 0
        self._current: dict[str, tuple] = {}
        self._batch: Batch = {}  # detached statistics of the last call, folded by next_batch
        self._real_cache: dict = {}
        self.last = {}
        self.hooks = SiteHooks(model, sites, self._capture)
        self.names = self.hooks.names
        try:
            self._bind(model, stats)
        except BaseException:
            self.hooks.remove()  # a refused loss leaves the model as it was
            raise
        self.emu = EMU({d: (U.shape, sig.shape) for d, (U, _, sig) in self._real.items()})

    @property
    def b(self) -> int:
        """Index of the current class-batch, counted over the whole run (1 for the first)."""
        return self.emu.b

    def _bind(self, model, stats) -> None:
        """Check ``stats`` against the hooked sites and precompute the real side per width."""
        stats.validate(model=model, sites=self.names)
        for name, module in self.hooks.sites:
            width = site_width(module)
            if width is not None and width != stats[name].dim:
                raise StatsMismatchError(f"site {name!r} has {width} channels but its statistics have "
                                         f"{stats[name].dim}: the statistics belong to another model")
        self.groups: dict[int, list[str]] = {}
        for name in self.names:
            self.groups.setdefault(stats[name].dim, []).append(name)
        device = self.device = next(model.parameters()).device
        self._real = {}
        for d, group in self.groups.items():
            psi = torch.stack([stats[n].psi for n in group]).to(device, torch.float64)
            sig = torch.stack([self._real_signal(stats[n]) for n in group]).to(device, torch.float64)
            if not bool(torch.isfinite(psi).all() & torch.isfinite(sig).all()):
                raise StatsMismatchError(
                    f"the real statistics of site(s) {group} hold NaN/Inf for signal {self.signal!r}; statistics "
                    "converted from BatchNorm buffers have no feature-label correlation: collect full "
                    "statistics with `unidd-fast stats`, or use signal='mean'")
            lam, U = torch.linalg.eigh(psi)
            self._real[d] = (U, lam, sig)

    def _real_signal(self, s):
        return {"class": s.phi, "soft": s.phi_soft, "mean": s.mu[:, None]}[self.signal]

    def _capture(self, name, feat):
        if self.enabled:
            self._current[name] = site_stats(feat, self.backend)

    def _filters(self, beta=None, real: bool = False):
        """(filter applied to Ψ in the filter term, filter applied before the signal) of the
        synthetic side, or of the real side with ``real=True`` (they differ only for MTT with
        P ≠ Q), at ``beta`` (default β_t; a device tensor in graph-safe mode)."""
        alpha, p, q = self.mtt
        return self._choice.pair(self.beta_t if beta is None else beta, alpha, p if real else q)

    def _real_side(self, d, dtype):
        """(f(Ψ), g(Ψ)Φ) of the real statistics of width ``d`` at the current β_t, cached per β."""
        f_filter, f_signal = self._filters(real=True)
        beta = self.beta_t
        key = (d, repr(f_filter), repr(f_signal), dtype, float(beta) if not torch.is_tensor(beta) else None)
        cached = self._real_cache.get(key)
        if cached is not None:
            return cached
        U, lam, sig = self._real[d]
        F_real = f_filter.from_eigh(U, lam)
        T_real = (F_real if f_signal is f_filter else f_signal.from_eigh(U, lam)) @ sig
        value = (F_real.to(dtype), T_real.to(dtype))
        if key[-1] is not None:
            if len(self._real_cache) > 64:
                self._real_cache.clear()
            self._real_cache[key] = value
        return value

    def set_curriculum(self, t, T) -> None:
        """Set β_t from the schedule (cosine for filter="cfm", constant for "krr")."""
        self.beta_t = beta_schedule(self.beta, t, T, self.schedule, self.beta_min)
        if self.graph_safe:
            self._beta_dev.fill_(float(self.beta_t))
            for (d, dtype), buffers in self._static_real.items():
                for buffer, value in zip(buffers, self._real_side(d, dtype)):
                    buffer.copy_(value)

    def make_graph_safe(self) -> None:
        """Make ``cfm(targets)`` capturable in a CUDA graph, with unchanged values: β_t and the
        class-batch index b live in 0-d float64 device tensors, the real side and the EMU means
        in device buffers, all updated in place by ``set_curriculum`` / ``next_batch`` (outside
        the graph); the EMU blend runs at every b (``EMU.blend``), and the per-step finite
        check (a host sync) is off: the caller checks the loss instead, and the Cholesky
        status of every site, which a captured factorisation records on the device
        (``factorisation_status``). Call before the first ``cfm(targets)`` of the run."""
        if self.graph_safe:
            return
        order = [n for group in self.groups.values() for n in group]
        self._status = torch.zeros(len(order), dtype=torch.int32, device=self.device)
        self._status_names = order
        self._status_views, start = {}, 0
        for group in self.groups.values():
            self._status_views[tuple(group)] = self._status[start:start + len(group)]
            start += len(group)
        self._beta_dev = torch.tensor(float(self.beta_t), dtype=torch.float64, device=self.device)
        self.emu.make_graph_safe(self.device)
        self._filter_pair = self._filters(self._beta_dev)
        self._static_real: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.check_finite = False
        self.graph_safe = True

    def factorisation_status(self) -> torch.Tensor | None:
        """Graph-safe mode: (sites,) int32 on the device, per site 0 or the 1-based column of
        the first failed pivot of (Ψ_s + β_t I)'s Cholesky factorisation under CUDA-graph
        capture since the caller last zeroed it (``zero_()``, outside the graph); None otherwise
        (eager factorisations raise NotPositiveDefiniteError themselves)."""
        return self._status if self.graph_safe else None

    def factorisation_failure(self) -> str:
        """The failed sites of ``factorisation_status()`` as an error message (one host read)."""
        bad = [f"{name} (pivot {int(col)})" for name, col in zip(self._status_names, self._status.tolist()) if col]
        return (f"(Ψ + βI) of the synthetic batch is not positive definite at site(s) {bad} with "
                f"β_t = {float(self.beta_t):g}: β_t is too small for the rounding error of Ψ (or Ψ holds "
                "NaN/Inf); raise beta / beta_min (--set recover.beta=... / recover.beta_min=...)")

    def batch_statistics(self) -> Batch:
        """The detached statistics {width d: (Ψ (k,d,d), signal (k,d,c))} of the last
        ``cfm(targets)`` of this class-batch: what ``next_batch`` folds into the EMU."""
        return dict(self._batch)

    def graph_outputs(self) -> Batch:
        """``batch_statistics()``: a captured call writes them again on every replay, but a
        replay runs no Python, so after replaying a graph hand them back with
        ``set_graph_outputs`` before ``next_batch``."""
        return self.batch_statistics()

    def set_graph_outputs(self, outputs: Batch) -> None:
        self._batch = dict(outputs)

    def _static_real_side(self, d, dtype):
        """Graph-safe: the real side of width d in buffers that ``set_curriculum`` refreshes in place."""
        key = (d, dtype)
        if key not in self._static_real:
            self._static_real[key] = tuple(t.clone() for t in self._real_side(d, dtype))
        return self._static_real[key]

    def _synthetic_signal(self, stats, targets):
        psi_b, mu_b, pooled = stats
        if self.signal == "mean":
            return mu_b[:, None]
        if self.signal == "soft" and (targets.dim() != 2 or not targets.is_floating_point()):
            raise ConfigError("signal='soft' takes teacher probabilities (n, c) as targets")
        return flc(pooled, targets, self.num_classes)

    def __call__(self, targets: torch.Tensor) -> torch.Tensor:
        norms = self.site_norms(targets)
        total_f = sum(fn.sum() for fn, _ in norms.values())
        total_s = sum(sn.sum() for _, sn in norms.values())
        self._record(norms, total_f, total_s)
        return self.eta * (total_f + total_s)

    def _record(self, norms, total_f, total_s) -> None:
        """Fill ``last``: the unweighted totals ("filter", "signal") of the last call and, per
        site, ``last["sites"][name] = (filter norm, signal norm)``, all detached."""
        sites = {name: (fn[i].detach(), sn[i].detach())
                 for d, (fn, sn) in norms.items() for i, name in enumerate(self.groups[d])}
        self.last = {"filter": total_f.detach(), "signal": total_s.detach(), "sites": sites}

    def site_norms(self, targets: torch.Tensor, captured: dict[str, tuple] | None = None
                   ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per site width d: ((k,) filter norms, (k,) signal norms) of the sites ``self.groups[d]``
        for the captured batch, unweighted by η; ``cfm(targets)`` is η times their total.
        ``captured``: per site name (Ψ, μ, pooled) of the batch (default: what the hooks
        captured in the last forward)."""
        captured = self._current if captured is None else captured
        missing = [n for n in self.names if n not in captured]
        if missing:
            raise RuntimeError(f"no features captured at {missing[:3]}...: call model(x) before cfm(targets)")
        batch = {}
        for d, group in self.groups.items():
            psi_b = torch.stack([captured[n][0] for n in group])
            sig_b = torch.stack([self._synthetic_signal(captured[n], targets) for n in group])
            batch[d] = (psi_b, sig_b)
            self._batch[d] = (psi_b.detach(), sig_b.detach())
        if self.check_finite:
            self._raise_if_not_finite(batch)
        f_filter, f_signal = self._filter_pair if self.graph_safe else self._filters()
        norms = {}
        failures = collect_cholesky_failures(self._status_views) if self.graph_safe else contextlib.nullcontext()
        with failures:  # graph-safe: a captured factorisation records its status on the device
            for d, group in self.groups.items():
                psi_b, sig_b = batch[d]
                if self.use_emu:
                    psi_b, sig_b = self.emu.blend(d, psi_b, sig_b)
                real_side = self._static_real_side if self.graph_safe else self._real_side
                F_real, T_real = real_side(d, psi_b.dtype)
                fn, sn = filtered_norms(F_real, T_real, psi_b, sig_b, f_filter, f_signal, group, self.backend)
                norms[d] = (fn, sn * self.signal_weight if self.signal_weight != 1.0 else sn)
        self.step += 1
        return norms

    def _raise_if_not_finite(self, batch) -> None:
        """One host sync for all sites; on failure, name the sites and the step."""
        ok = torch.stack([torch.isfinite(p).all() & torch.isfinite(g).all() for p, g in batch.values()])
        if bool(ok.all()):
            return
        bad = [n for d, group in self.groups.items() for i, n in enumerate(group)
               if not (torch.isfinite(batch[d][0][i]).all() and torch.isfinite(batch[d][1][i]).all())]
        raise NonFiniteError(f"recover step {self.step}: NaN/Inf in the input of site(s) {bad}; the synthetic "
                             "images or the teacher produced non-finite values (lower the learning rate?)")

    def next_batch(self, batches: list[Batch] | None = None) -> None:
        """After a class-batch: fold its detached statistics (``batch_statistics()``) into the
        EMU; under torchrun ``batches`` instead, the statistics of every rank's batch of the
        round in rank order (``distributed.merge_emu``)."""
        if batches is None:
            if not self._batch:
                raise RuntimeError("next_batch() before any cfm(targets) call of this class-batch")
            batches = [self._batch]
        self.emu.fold_all(batches)
        self._batch = {}
        self._current = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMU state as plain tensors (``EMU.state_dict``: checkpoints, cross-rank merges)."""
        return self.emu.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.emu.load_state_dict(state)

    def remove(self) -> None:
        """Remove the forward hooks from the model."""
        self.hooks.remove()
        self._current = {}
