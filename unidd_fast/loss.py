"""CFMLoss: the curriculum frequency matching regulariser over every hook site of a teacher.

Data flow per step: teacher forward -> pre-hooks compute (Ψ_b, μ_b, pooled) per site ->
``cfm(targets)`` stacks sites of equal width, folds EMU, filters and returns
η (L_filter + L_signal). The real side f(Ψ), f(Ψ)Φ is formed from a cached float64
eigendecomposition and cached per β, so it costs nothing while β is constant.
"""
from __future__ import annotations

import torch
from torch import nn

from . import filters as filt
from .errors import ConfigError, NonFiniteError, StatsMismatchError
from .ops import emu_fold, flc, site_stats
from .real_stats import RealStats
from .schedule import beta_schedule
from .site_loss import filtered_norms
from .sites import SiteHooks

SIGNALS = ("class", "mean", "soft")
FILTERS = ("cfm", "krr", "lowpass", "allpass", "mtt")


def site_width(module: nn.Module) -> int | None:
    """Channel count of a site's input, when the module says it."""
    for attr in ("num_features", "in_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    return None


class CFMLoss:
    """η (L_filter + L_signal) of DESIGN.md §1 between a synthetic batch and real statistics.

    Call ``model(x)`` first (the hooks capture every site's input), then ``cfm(targets)``:
    targets are class ids (n,) for signal "class"/"mean", probabilities (n, c) for "soft".
    ``next_batch()`` after each class-batch folds its detached statistics into the EMU mean.
    ``make_graph_safe()`` keeps β_t, b and the EMU means in device tensors (for CUDA graphs).
    """

    def __init__(self, model: nn.Module, stats: RealStats, beta: float = 0.1, eta: float = 0.1,
                 signal: str = "class", emu: bool = True, sites="bn", filter: str = "cfm",
                 beta_min: float = 1e-6, schedule: str = "cosine", mtt_alpha: float = 0.01,
                 mtt_steps: int = 10, backend: str | None = "auto", check_finite: bool = True):
        if signal not in SIGNALS:
            raise ConfigError(f"signal must be one of {SIGNALS}, got {signal!r}")
        if filter not in FILTERS:
            raise ConfigError(f"filter must be one of {FILTERS}, got {filter!r}")
        if filter in ("cfm", "krr") and not beta > 0:
            raise ConfigError(f"beta must be > 0 for the {filter} filter, got {beta}")
        if eta < 0:
            raise ConfigError(f"eta must be >= 0, got {eta}")
        self.beta, self.eta, self.signal, self.emu = beta, eta, signal, emu
        self.filter, self.beta_min, self.backend, self.check_finite = filter, beta_min, backend, check_finite
        self.schedule = schedule if filter == "cfm" else "constant"
        self.mtt = (mtt_alpha, mtt_steps)
        self.beta_t = beta
        self.num_classes = stats.num_classes
        self.enabled = True
        self.graph_safe = False
        self.step = 0
        self.b = 1  # index of the current class-batch, counted over the whole run
        self._current: dict[str, tuple] = {}
        self._last: dict[int, tuple] = {}
        self._bar: dict[int, tuple] = {}
        self._real_cache: dict = {}
        self.last = {}
        self.hooks = SiteHooks(model, sites, self._capture)
        self.names = self.hooks.names
        try:
            self._bind(model, stats)
        except BaseException:
            self.hooks.remove()  # a refused loss leaves the model as it was
            raise

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

    def _filters(self, beta=None):
        """(filter applied to Ψ in the filter term, filter applied before the signal), at
        ``beta`` (default β_t; a device tensor in graph-safe mode)."""
        if self.filter in ("cfm", "krr"):
            f = filt.krr(self.beta_t if beta is None else beta)
            return f, f
        if self.filter == "lowpass":
            f = filt.low_pass()
            return f, f
        if self.filter == "allpass":
            f = filt.all_pass()
            return f, f
        return filt.mtt(*self.mtt), filt.mtt_sum(*self.mtt)

    def _real_side(self, d, f_filter, f_signal, dtype):
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
                for buffer, value in zip(buffers, self._real_side(d, *self._filters(), dtype)):
                    buffer.copy_(value)

    def make_graph_safe(self) -> None:
        """Make ``cfm(targets)`` capturable in a CUDA graph, with unchanged values: β_t and the
        class-batch index b live in 0-d float64 device tensors, the real side and the EMU means
        in device buffers, all updated in place by ``set_curriculum`` / ``next_batch`` (outside
        the graph); the EMU fold runs at every b (at b = 1 it folds zeros: Ψ/1 + 0·0 = Ψ
        exactly), and the per-step finite check (a host sync) is off: the caller checks the
        loss instead. Call before the first ``cfm(targets)`` of the run."""
        if self.graph_safe:
            return
        self._beta_dev = torch.tensor(float(self.beta_t), dtype=torch.float64, device=self.device)
        self._b_dev = torch.tensor(float(self.b), dtype=torch.float64, device=self.device)
        self._filter_pair = self._filters(self._beta_dev)
        self._static_real: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.check_finite = False
        self.graph_safe = True

    def graph_outputs(self) -> dict:
        """The detached statistics of the last ``cfm(targets)``: a captured call writes them
        again on every replay, but a replay runs no Python, so after replaying a graph hand
        them back with ``set_graph_outputs`` before ``next_batch``."""
        return dict(self._last)

    def set_graph_outputs(self, outputs: dict) -> None:
        self._last = dict(outputs)

    def _fold_and_real(self, d, psi_b, sig_b, f_filter, f_signal):
        """EMU-folded synthetic (Ψ_s, signal) and the real side (F, T) of width ``d``."""
        if not self.graph_safe:
            if self.emu and self.b > 1:
                bar_psi, bar_sig = self._bar[d]
                psi_b, sig_b = emu_fold(psi_b, bar_psi, self.b), emu_fold(sig_b, bar_sig, self.b)
            return psi_b, sig_b, self._real_side(d, f_filter, f_signal, psi_b.dtype)
        key = (d, psi_b.dtype)
        if key not in self._static_real:
            self._static_real[key] = tuple(t.clone() for t in self._real_side(d, *self._filters(), psi_b.dtype))
        if self.emu:
            if d not in self._bar:
                self._bar[d] = (torch.zeros_like(psi_b, requires_grad=False), torch.zeros_like(sig_b, requires_grad=False))
            bar_psi, bar_sig = self._bar[d]
            psi_b, sig_b = emu_fold(psi_b, bar_psi, self._b_dev), emu_fold(sig_b, bar_sig, self._b_dev)
        return psi_b, sig_b, self._static_real[key]

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
        self.last = {"filter": total_f.detach(), "signal": total_s.detach()}
        return self.eta * (total_f + total_s)

    def site_norms(self, targets: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per site width d: ((k,) filter norms, (k,) signal norms) of the sites ``self.groups[d]``
        for the captured batch, unweighted by η; ``cfm(targets)`` is η times their total."""
        missing = [n for n in self.names if n not in self._current]
        if missing:
            raise RuntimeError(f"no features captured at {missing[:3]}...: call model(x) before cfm(targets)")
        batch = {}
        for d, group in self.groups.items():
            psi_b = torch.stack([self._current[n][0] for n in group])
            sig_b = torch.stack([self._synthetic_signal(self._current[n], targets) for n in group])
            batch[d] = (psi_b, sig_b)
            self._last[d] = (psi_b.detach(), sig_b.detach())
        if self.check_finite:
            self._raise_if_not_finite(batch)
        f_filter, f_signal = self._filter_pair if self.graph_safe else self._filters()
        norms = {}
        for d, group in self.groups.items():
            psi_b, sig_b, (F_real, T_real) = self._fold_and_real(d, *batch[d], f_filter, f_signal)
            norms[d] = filtered_norms(F_real, T_real, psi_b, sig_b, f_filter, f_signal, group, self.backend)
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

    def next_batch(self) -> None:
        """Fold the last class-batch's detached statistics into the EMU running mean."""
        if not self._last:
            raise RuntimeError("next_batch() before any cfm(targets) call of this class-batch")
        b = self.b
        for d, (psi, sig) in self._last.items():
            if self.graph_safe and d in self._bar:  # the buffers a captured graph reads
                for bar, value in zip(self._bar[d], (psi, sig)):
                    bar.copy_(emu_fold(value, bar, b))
            elif b == 1:
                self._bar[d] = (psi.clone(), sig.clone())
            else:
                bar_psi, bar_sig = self._bar[d]
                self._bar[d] = (emu_fold(psi, bar_psi, b), emu_fold(sig, bar_sig, b))
        self._last = {}
        self._current = {}
        self.b += 1
        if self.graph_safe:
            self._b_dev.fill_(float(self.b))

    def emu_state(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per site: the running means (Ψ̄, signal̄) of the finished class-batches."""
        out = {}
        for d, group in self.groups.items():
            if d in self._bar and self.b > 1:
                for i, name in enumerate(group):
                    out[name] = (self._bar[d][0][i], self._bar[d][1][i])
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """EMU state as plain tensors (for checkpoints and cross-rank merges)."""
        state = {"b": torch.tensor(self.b)}
        for d, (psi, sig) in (self._bar.items() if self.b > 1 else ()):
            state[f"{d}/psi"], state[f"{d}/sig"] = psi, sig
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.b = int(state["b"])
        bar = {d: (state[f"{d}/psi"], state[f"{d}/sig"]) for d in self.groups if f"{d}/psi" in state}
        if not self.graph_safe:
            self._bar = bar
            return
        self._b_dev.fill_(float(self.b))
        for d, buffers in self._bar.items():  # in place: a captured graph reads these
            for i, buffer in enumerate(buffers):
                if d in bar:
                    buffer.copy_(bar[d][i])
                else:
                    buffer.zero_()
        self._bar.update({d: tuple(t.clone() for t in pair) for d, pair in bar.items() if d not in self._bar})

    def remove(self) -> None:
        """Remove the forward hooks from the model."""
        self.hooks.remove()
        self._current = {}
