"""CFM as a drop-in for SRe2L-style recover scripts (SRe2L's and CDA's ``recover``).

Those scripts register one ``BNFeatureHook`` per BatchNorm layer and, after the teacher's
forward, add ``sum(mod.r_feature for mod in hooks)`` to their loss. ``cfm_hooks`` returns a
list of hook objects with the same ``.r_feature`` / ``.close()`` surface, backed by one
shared :class:`~unidd_fast.CFMLoss`: the first ``.r_feature`` read after a forward computes
every site's η (L_filter + L_signal) in one batched pass, and each hook returns its own
site's term, so the sum over the hooks is ``CFMLoss(...)(targets)``.

EMU state lives outside the hooks, in a :class:`CFMState` (by default one per RealStats
object, or per statistics file), because those scripts rebuild teacher and hooks for every
ipc id. Under ``nn.DataParallel`` every replica sees one slice of the batch: slices are kept
per device and merged exactly (pooled covariance, concatenated pooled means) before the
loss, so replicas never overwrite each other.

``bn_buffer_stats`` turns a torchvision-style checkpoint's BatchNorm buffers into a
RealStats (mean and diagonal covariance per BN site), which is all the SRe2L baseline
matches: it needs no pass over the data. See docs/sre2l.md for the patch to SRe2L's script.
"""
from __future__ import annotations

import pickle
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..emu import load_state, save_state
from ..errors import ConfigError, StatsFileError, StatsMismatchError
from ..loss import CFMLoss
from ..ops import site_stats
from ..real_stats import RealStats, SiteStats
from ..sites import resolve_sites, unwrap

__all__ = ["CFMFeatureHook", "CFMHooks", "CFMState", "bn_buffer_stats", "cfm_hooks", "emu_state",
           "merge_slices"]

def merge_slices(slices, device=None):
    """Exact (psi, mu, pooled) of a batch from the statistics of its slices, in batch order.

    slices: [(psi (d,d), mu (d,), pooled (n_i,d), rows_i)] with rows_i = n_i·h·w. Pooled
    covariance: Ψ = Σ w_i (Ψ_i + (μ_i − μ)(μ_i − μ)ᵀ), μ = Σ w_i μ_i, w_i = rows_i / Σ rows;
    differentiable in every slice. Tensors are moved to ``device`` (default: the first's).
    """
    if len(slices) == 1:
        psi, mu, pooled, _ = slices[0]
        return (psi, mu, pooled) if device is None else (psi.to(device), mu.to(device), pooled.to(device))
    device = slices[0][0].device if device is None else device
    slices = [(p.to(device), m.to(device), x.to(device), r) for p, m, x, r in slices]
    total = sum(r for *_, r in slices)
    mu = sum(m * (r / total) for _, m, _, r in slices)
    psi = sum((p + torch.outer(m - mu, m - mu)) * (r / total) for p, m, _, r in slices)
    return psi, mu, torch.cat([x for _, _, x, _ in slices])


def _slice_key(feat: torch.Tensor):
    """Which replica a captured feature map came from: DataParallel puts one per device."""
    return feat.device


class CFMState:
    """EMU state of a run that outlives hooks and models: the class-batch counter and the
    running means of the finished batches (``CFMLoss.state_dict``), and the sites/signal
    they were made with (a mismatch raises instead of mixing runs). ``save``/``load`` keep
    it in a file, so a run split by ipc range across jobs continues the same EMU."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.signature = None

    @property
    def batches_done(self) -> int:
        return int(self.tensors["b"]) - 1 if self.tensors else 0

    def reset(self) -> None:
        self.tensors, self.signature = {}, None

    def bind(self, signature) -> None:
        if self.signature is None or not self.tensors:  # nothing folded yet: free to (re)bind
            self.signature = signature
        elif self.signature != signature:
            raise ConfigError(
                f"this EMU state belongs to a run with {self.signature}, not {signature}: pass "
                "state=CFMState() or call sre2l.emu_state(stats).reset() to start a new run")

    def save(self, path) -> None:
        """Write the state (an ``emu`` state file with the sites and signal), atomically."""
        if not self.tensors:
            raise ConfigError("no class-batch has been folded into this EMU state yet: nothing to save")
        save_state(path, self.tensors, {"sites": list(self.signature["sites"]), "signal": self.signature["signal"]})

    @classmethod
    def load(cls, path) -> "CFMState":
        """A state written by ``save``; pass it as ``cfm_hooks(..., state=...)`` to continue the run."""
        tensors, meta = load_state(path)
        if not isinstance(meta.get("sites"), list) or not isinstance(meta.get("signal"), str):
            raise StatsFileError(f"{path} is an EMU state file without the sites and signal of a drop-in run")
        state = cls()
        state.tensors, state.signature = tensors, {"sites": tuple(meta["sites"]), "signal": meta["signal"]}
        return state


_STATES: "weakref.WeakKeyDictionary[RealStats, CFMState]" = weakref.WeakKeyDictionary()
_FILES: dict[tuple, RealStats] = {}


def emu_state(stats: RealStats) -> CFMState:
    """The module-level EMU state kept for ``stats`` (created on first use)."""
    state = _STATES.get(stats)
    if state is None:
        state = _STATES[stats] = CFMState()
    return state


def _as_stats(real_stats) -> RealStats:
    """A RealStats, or one loaded once per file version from a path (``unidd-fast stats`` output)."""
    if isinstance(real_stats, RealStats):
        return real_stats
    if isinstance(real_stats, (str, Path)):
        path = Path(real_stats).resolve()
        if not path.is_file():
            raise StatsFileError(f"statistics file {path} does not exist; create it with `unidd-fast stats`")
        info = path.stat()
        key = (str(path), info.st_mtime_ns, info.st_size)
        if key not in _FILES:
            _FILES[key] = RealStats.load(path)
        return _FILES[key]
    raise ConfigError(f"real_stats must be a RealStats or the path of a statistics file, got {type(real_stats).__name__}")


class _Engine(CFMLoss):
    """CFMLoss whose captures are kept per replica slice and whose per-site terms are computed
    once per forward, on the first ``r_feature`` read."""

    def __init__(self, model, stats, device_ids, **options):
        self._lock = threading.Lock()
        self._slices: dict[str, dict] = {}
        self._losses = None
        self._device_ids = device_ids
        self.targets = None
        super().__init__(model, stats, **options)  # a refused loss removes its own hooks

    def _capture(self, name, feat):
        if not self.enabled:
            return
        psi, mu, pooled = site_stats(feat, self.backend)
        rows = feat.shape[0] * feat.shape[2] * feat.shape[3]
        with self._lock:  # DataParallel replicas capture from their own threads
            if self._losses is not None:  # first capture after a read: a new forward
                self._slices, self._losses = {}, None
            self._slices.setdefault(name, {})[_slice_key(feat)] = (psi, mu, pooled, rows)

    def new_forward(self) -> None:
        with self._lock:
            self._slices, self._losses = {}, None

    def _batch_order(self, device):
        """DataParallel scatters chunk i to device_ids[i]; keep the slices in that order."""
        if self._device_ids and device.type == "cuda" and device.index in self._device_ids:
            return (0, self._device_ids.index(device.index), "")
        return (1, device.index if device.index is not None else -1, str(device))

    def site_loss(self, name: str) -> torch.Tensor:
        if self._losses is None:
            self._losses = self._compute()
        return self._losses[name]

    def _compute(self) -> dict[str, torch.Tensor]:
        if self.targets is None:
            raise ConfigError("call hooks.set_targets(targets) before reading r_feature")
        missing = [n for n in self.names if n not in self._slices]
        if missing:
            raise RuntimeError(f"no features captured at sites {missing[:3]}: run the teacher forward "
                               "before reading r_feature")
        merged = {}
        for name in self.names:
            parts = self._slices[name]
            merged[name] = merge_slices([parts[k] for k in sorted(parts, key=self._batch_order)], self.device)
        norms = self.site_norms(self.targets, merged)
        self._record(norms, sum(fn.sum() for fn, _ in norms.values()), sum(sn.sum() for _, sn in norms.values()))
        return {name: self.eta * (fn[i] + sn[i])
                for d, (fn, sn) in norms.items() for i, name in enumerate(self.groups[d])}

    def next_batch(self, batches=None) -> None:
        super().next_batch(batches)
        self.new_forward()


class CFMFeatureHook:
    """One site's share of the CFM loss, with the surface of SRe2L's ``BNFeatureHook``:
    ``r_feature`` (a differentiable 0-dim tensor, η (L_filter + L_signal) of this site for
    the last forward) and ``close()``."""

    def __init__(self, engine: _Engine, name: str, module: nn.Module, owner: "CFMHooks"):
        self.name, self.module = name, module
        self.closed = False
        self._engine, self._owner = engine, owner

    @property
    def r_feature(self) -> torch.Tensor:
        if self.closed:
            raise RuntimeError(f"the CFM hook of site {self.name!r} is closed")
        return self._engine.site_loss(self.name)

    def close(self) -> None:
        self.closed = True
        self._owner._release()

    def __repr__(self) -> str:
        return f"CFMFeatureHook({self.name!r}{', closed' if self.closed else ''})"


class CFMHooks(list):
    """The hooks of every site (a list: iterate, index, ``len``), plus the run controls.

    ``cfm`` is the underlying CFMLoss (``cfm.beta_t``, ``cfm.last``...); ``state`` the EMU state.
    """

    def __init__(self, engine: _Engine, state: CFMState, root_handle=None, curriculum_total: int | None = None):
        super().__init__(CFMFeatureHook(engine, name, module, self) for name, module in engine.hooks.sites)
        self._own = tuple(self)
        self.cfm, self.state = engine, state
        self.curriculum_total = curriculum_total
        self._root = root_handle

    def set_targets(self, targets: torch.Tensor) -> None:
        """Class ids (n,) of the synthetic batch, or teacher probabilities (n, c) for signal='soft'."""
        if not torch.is_tensor(targets):
            raise ConfigError(f"targets must be a tensor, got {type(targets).__name__}")
        self.cfm.targets = targets.to(self.cfm.device)

    def set_curriculum(self, t, T: int | None = None) -> None:
        """β_t for step t of T: t = the ipc id, T = the number of ipc ids of the *whole* run.

        T defaults to ``cfm_hooks(..., curriculum_total=T)``. A run split into ipc ranges
        (SRe2L's ``--ipc-start/--ipc-end``) keeps the same T in every part: the end of this
        part's range is not T, and a T that differs from ``curriculum_total`` is refused.
        """
        total = self.curriculum_total
        if T is None and total is None:
            raise ConfigError("set_curriculum(t) needs the curriculum length: pass cfm_hooks(..., "
                              "curriculum_total=<ipc ids of the whole run>) or set_curriculum(t, T)")
        if T is not None and total is not None and T != total:
            raise ConfigError(f"set_curriculum(t, T={T}) but curriculum_total={total}: T is the number of ipc "
                              "ids of the whole run, not the end of this process's ipc range; call "
                              "set_curriculum(t)")
        T = total if T is None else T
        if not 0 <= t <= T:
            raise ConfigError(f"curriculum step t={t} is outside [0, {T}]: t is the global ipc id")
        self.cfm.set_curriculum(t, T)

    def next_batch(self, batches=None) -> None:
        """After each class-batch: fold its statistics into the EMU mean (kept in ``state``);
        ``batches``: see ``CFMLoss.next_batch`` (torchrun)."""
        self.cfm.next_batch(batches)
        self.state.tensors = self.cfm.state_dict()

    def close(self) -> None:
        for hook in self._own:
            hook.closed = True
        self._release()

    def _release(self) -> None:
        if all(h.closed for h in self._own):
            self.cfm.remove()
            if self._root is not None:
                self._root.remove()
                self._root = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def cfm_hooks(model: nn.Module, real_stats, beta: float = 0.1, sites="bn", *, eta: float = 0.1,
              signal: str = "class", filter: str = "cfm", emu: bool = True, state: CFMState | None = None,
              curriculum_total: int | None = None, **options) -> CFMHooks:
    """SRe2L-style hooks computing the CFM loss at every site of ``model``.

    model: the teacher, plain or wrapped in DataParallel / DistributedDataParallel.
    real_stats: a RealStats, or the path of a file written by ``unidd-fast stats``
    (``RealStats.save``). ``state``: where EMU persists (default: one state per statistics
    object/file, so rebuilding model and hooks for every ipc id keeps EMU; pass a fresh
    ``CFMState()`` for an independent run). ``curriculum_total``: the number of ipc ids of the
    whole run (T of the β curriculum; ``hooks.set_curriculum(ipc_id)`` then needs no T).
    Other options go to :class:`~unidd_fast.CFMLoss`.

    Per step: ``hooks.set_targets(y)``, ``model(x)``, ``sum(h.r_feature for h in hooks)``;
    ``hooks.next_batch()`` after each class-batch; ``hooks.close()`` at the end.
    """
    stats = _as_stats(real_stats)
    if curriculum_total is not None and not (isinstance(curriculum_total, int) and curriculum_total > 0):
        raise ConfigError(f"curriculum_total must be a positive int (ipc ids of the whole run), got {curriculum_total!r}")
    if stats.provenance.get("source") == "bn_buffers" and signal != "mean":
        raise ConfigError(
            f"statistics from BatchNorm buffers (bn_buffer_stats) hold only μ and diag(σ²), no feature-label "
            f"correlation: signal={signal!r} needs full statistics (`unidd-fast stats`); pass signal='mean' to "
            "use them (CFM's filtered objective on diag(σ²) and μ, not SRe2L's BN loss)")
    device_ids = list(getattr(model, "device_ids", None) or []) if isinstance(model, nn.DataParallel) else []
    engine = _Engine(unwrap(model), stats, device_ids, beta=beta, eta=eta, signal=signal, emu=emu,
                     sites=sites, filter=filter, **options)
    state = emu_state(stats) if state is None else state
    try:
        state.bind({"sites": tuple(engine.names), "signal": signal})
    except ConfigError:
        engine.remove()
        raise
    if state.tensors:
        engine.load_state_dict({k: v.to(engine.device) for k, v in state.tensors.items()})
    root = None
    if isinstance(model, nn.DataParallel):
        root = model.register_forward_pre_hook(lambda module, args: engine.new_forward())
    return CFMHooks(engine, state, root, curriculum_total)


def _read_state_dict(checkpoint) -> dict[str, torch.Tensor]:
    """Tensors of a torchvision-style checkpoint: a state dict, a path to one (loaded with
    weights_only=True), or a dict holding it under "state_dict"/"model"; the prefixes of
    DataParallel ("module.") and torch.compile ("_orig_mod.") are removed."""
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if not path.is_file():
            raise StatsFileError(f"checkpoint {path} does not exist")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise StatsFileError(f"{path} is not a weights-only torch checkpoint ({exc})") from exc
    if not isinstance(checkpoint, Mapping):
        raise ConfigError(f"checkpoint must be a state dict or a path, got {type(checkpoint).__name__}")
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    out = {}
    for key, value in checkpoint.items():
        if torch.is_tensor(value):
            for prefix in ("module.", "_orig_mod."):
                key = key.removeprefix(prefix)
            out[key] = value
    return out


def bn_buffer_stats(model: nn.Module, checkpoint=None, num_classes: int | None = None) -> RealStats:
    """RealStats of every BatchNorm2d site of ``model`` from BN running buffers, no data pass.

    mu = running_mean and psi = diag(running_var) (float64): what the SRe2L baseline
    matches. Buffers come from ``checkpoint`` (see ``_read_state_dict``) or, without one,
    from the model's own modules. There is no class correlation in BN buffers: phi and
    phi_soft are NaN, so CFMLoss refuses these statistics for signal "class"/"soft".
    ``num_images`` is 0 and the recorded feature shapes are (d,) (spatial size unknown).
    Only ``signal="mean"`` can use them, and CFM on them is its own objective,
    ‖(diag σ² + β I)⁻¹ − (Ψ_s + β I)⁻¹‖_F + ‖(diag σ² + β I)⁻¹ μ − (Ψ_s + β I)⁻¹ μ_s‖, not SRe2L's
    ‖σ² − σ_s²‖ + ‖μ − μ_s‖ (that one is ``pipeline.sre2l_loss``).
    """
    inner = unwrap(model)
    buffers = _read_state_dict(checkpoint) if checkpoint is not None else None
    if num_classes is None:
        linears = [m for m in inner.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError("cannot tell the number of classes from the model: pass num_classes=")
        num_classes = linears[-1].out_features
    sites, shapes, missing = {}, {}, []
    for name, module in resolve_sites(inner, "bn"):
        if buffers is None:
            mean, var, tracked = module.running_mean, module.running_var, module.num_batches_tracked
        else:
            mean, var = buffers.get(f"{name}.running_mean"), buffers.get(f"{name}.running_var")
            tracked = buffers.get(f"{name}.num_batches_tracked")
        if mean is None or var is None:
            missing.append(name)
            continue
        if mean.shape != (module.num_features,) or var.shape != (module.num_features,):
            raise StatsMismatchError(f"BN site {name!r} has {module.num_features} channels but the checkpoint's "
                                     f"buffers have shape {tuple(mean.shape)}: it belongs to another model")
        d = module.num_features
        nan = torch.full((d, num_classes), float("nan"), dtype=torch.float64)
        sites[name] = SiteStats(psi=torch.diag(var.detach().double().cpu()), mu=mean.detach().double().cpu(),
                                phi=nan, phi_soft=nan.clone(),
                                count=int(tracked) if tracked is not None else 0)
        shapes[name] = (d,)
    if missing:
        raise StatsMismatchError(f"no running_mean/running_var for BN site(s) {missing[:5]}: the checkpoint does "
                                 "not belong to this model, or its BatchNorm layers do not track running stats")
    return RealStats(sites, shapes, type(inner).__name__, 0, num_classes, {"source": "bn_buffers"})
