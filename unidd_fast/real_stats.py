"""Exact statistics of the real data at every hook site, and their safe file format.

Streaming and numerically safe: each batch is centred on its own mean in float32, and the
batches are merged in float64 with Chan's formula M = M_a + M_b + (n_a n_b / n) δδᵀ, so data
whose |mean| is 100× its standard deviation keeps its covariance to float32 accuracy
(docs/math.md#real-statistics).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed as dist_helpers
from .errors import ConfigError, NonFiniteError, StatsFileError, StatsMismatchError
from .ops import as_label_matrix, site_stats
from .profiling import annotate
from .progress import progress
from .sites import SiteHooks, unwrap

FORMAT = "unidd_fast.real_stats/2"  # /2: the checksum covers the metadata too
COVARIANCES = ("exact", "batch_mean")


@dataclass
class SiteStats:
    """Statistics of one site. psi (d,d), mu (d,), phi (d,c) class FLC, phi_soft (d,c) FLC
    with the teacher's probabilities; count = number of rows (images·h·w) seen; all float64."""

    psi: torch.Tensor
    mu: torch.Tensor
    phi: torch.Tensor
    phi_soft: torch.Tensor
    count: int

    @property
    def dim(self) -> int:
        return self.psi.shape[0]


class MomentAccumulator:
    """Streaming (count, mean, centred second moment, label sums) of one site, float64."""

    FIELDS = ("mean", "m2", "label_sum", "soft_sum")

    def __init__(self):
        self.count = 0
        self.mean = self.m2 = self.label_sum = self.soft_sum = None

    @classmethod
    def zeros(cls, d: int, c: int, c_soft: int) -> "MomentAccumulator":
        """An empty accumulator (count 0) with zero moments of a (d)-wide site, c and c_soft
        label columns: the same shapes as a filled one, for collectives."""
        acc = cls()
        acc.mean, acc.m2 = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        acc.label_sum, acc.soft_sum = (torch.zeros(d, k, dtype=torch.float64) for k in (c, c_soft))
        return acc

    @classmethod
    def of(cls, s: "SiteStats", num_images: int) -> "MomentAccumulator":
        """The accumulator ``s`` was finalised from (m2 = Ψ·count, label sums = Φ·images,
        each to one float64 rounding)."""
        acc = cls()
        acc.count, acc.mean, acc.m2 = s.count, s.mu.double(), s.psi.double() * s.count
        acc.label_sum, acc.soft_sum = s.phi.double() * num_images, s.phi_soft.double() * num_images
        return acc

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"count": 0-d int64, "mean", "m2", "label_sum", "soft_sum"} (just the count while empty)."""
        state = {"count": torch.tensor(self.count, dtype=torch.int64)}
        if self.mean is not None:
            state.update({f: getattr(self, f) for f in self.FIELDS})
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "MomentAccumulator":
        """The accumulator whose ``state_dict()`` is ``state``."""
        acc = cls()
        acc.count = int(state["count"])
        if "mean" in state:
            for f in cls.FIELDS:
                setattr(acc, f, state[f].double())
        return acc

    def update(self, psi_b, mu_b, pooled, onehot, probs, rows: int) -> None:
        """Fold in one batch: its covariance psi_b and mean mu_b over ``rows`` rows, pooled (n,d)
        features and their one-hot / soft labels (n,c)."""
        batch = MomentAccumulator()
        pooled = pooled.double()
        batch.count, batch.mean, batch.m2 = rows, mu_b.double(), psi_b.double() * rows
        batch.label_sum, batch.soft_sum = pooled.T @ onehot.double(), pooled.T @ probs.double()
        self.merge(batch)

    def merge(self, other: "MomentAccumulator") -> None:
        """Fold another accumulator in (Chan's parallel formula); used to combine shards."""
        if other.count == 0:
            return
        if self.count == 0:
            self.__dict__.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in other.__dict__.items()})
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.m2 += other.m2 + torch.outer(delta, delta) * (self.count * other.count / total)
        self.mean += delta * (other.count / total)
        self.label_sum += other.label_sum
        self.soft_sum += other.soft_sum
        self.count = total

    def finalize(self, num_images: int) -> SiteStats:
        return SiteStats(
            psi=self.m2 / self.count,
            mu=self.mean.clone(),
            phi=self.label_sum / num_images,
            phi_soft=self.soft_sum / num_images,
            count=self.count,
        )


def checksum(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> str:
    """sha256 of ``meta`` (as sorted JSON) and of the tensors' names and bytes, in name order."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode() if meta else b"")
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash leaves old or new, never torn.
    The file is fsynced before the rename and its directory after it, so this holds for a
    power loss too. The file gets the permissions of any new file (0666 less the umask), not
    mkstemp's 0600. A kill leaves at most ``.NAME.*.tmp``, which the next run removes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _parse_meta(path, raw: str) -> dict:
    """The JSON metadata of a statistics file, its types checked; StatsFileError if damaged."""
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise TypeError(f"a JSON {type(meta).__name__}, not an object")
        if meta.get("format") != FORMAT:
            raise StatsFileError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}; recreate it "
                                 "with `unidd-fast stats`")
        sites, counts, shapes = meta["sites"], meta["counts"], meta["shapes"]
        if not (isinstance(sites, list) and all(isinstance(s, str) for s in sites)):
            raise TypeError("'sites' is not a list of names")
        for name in sites:
            if type(counts[name]) is not int or not all(type(n) is int for n in shapes[name]):
                raise TypeError(f"the count or shape of site {name!r} is not made of integers")
        for key in ("num_images", "num_classes"):
            if type(meta[key]) is not int:
                raise TypeError(f"{key!r} is not an integer")
        if not isinstance(meta["sha256"], str) or not isinstance(meta["model_class"], str):
            raise TypeError("'sha256' or 'model_class' is not a string")
        if not isinstance(meta.get("provenance", {}), dict):
            raise TypeError("'provenance' is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise StatsFileError(f"{path} has damaged metadata ({type(exc).__name__}: {exc}); recreate it with "
                             "`unidd-fast stats`") from None
    return meta


class RealStats:
    """Real-data statistics of every site of one model, with the provenance needed to refuse
    a mismatched use: model class, ordered site names, feature shapes, image and class counts.

    ``provenance``: how the statistics were made, saved in the file's metadata:
    ``{"covariance": "exact"}`` or ``{"covariance": "batch_mean"}`` (the release's average of
    per-batch covariances; ``collect_real_stats``), ``{"source": "bn_buffers"}`` or
    ``{"source": "release_npz"}`` (converted), and from `unidd-fast stats` also
    ``"teacher": {"path", "sha256"}`` and ``"dataset": {...}``, the teacher weights and the
    data they were collected with.
    """

    def __init__(self, sites: dict[str, SiteStats], shapes: dict[str, tuple], model_class: str,
                 num_images: int, num_classes: int, provenance: dict | None = None):
        self._sites = dict(sites)
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.model_class = model_class
        self.num_images = int(num_images)
        self.num_classes = int(num_classes)
        self.provenance = dict(provenance or {})

    @property
    def sites(self) -> list[str]:
        return list(self._sites)

    def __getitem__(self, site: str) -> SiteStats:
        try:
            return self._sites[site]
        except KeyError:
            raise StatsMismatchError(f"no statistics for site {site!r}; the file has {self.sites}") from None

    def __len__(self) -> int:
        return len(self._sites)

    def __repr__(self) -> str:
        return (f"RealStats({self.model_class}, {len(self)} sites, {self.num_images} images, "
                f"{self.num_classes} classes)")

    def validate(self, model: nn.Module | None = None, sites: list[str] | None = None,
                 num_classes: int | None = None) -> None:
        """Raise StatsMismatchError if these statistics do not belong to ``model``/``sites``."""
        if model is not None:
            name = type(unwrap(model)).__name__
            if self.model_class in ("DataParallel", "DistributedDataParallel"):
                raise StatsMismatchError(
                    f"these statistics were collected through an nn.{self.model_class} wrapper (site names "
                    "'module.…'), by a version that did not unwrap it: collect them again, wrapped or not "
                    "(collect_real_stats now records the unwrapped network's names)")
            if name != self.model_class:
                raise StatsMismatchError(
                    f"statistics were collected on a {self.model_class}, not a {name}: run "
                    "`unidd-fast stats` with this teacher")
        if sites is not None and list(sites) != self.sites:
            extra, missing = sorted(set(sites) - set(self.sites)), sorted(set(self.sites) - set(sites))
            raise StatsMismatchError(
                f"site names differ from the statistics file (missing there: {extra[:5]}, only there: "
                f"{missing[:5]}); collect statistics with the same sites= setting")
        if num_classes is not None and num_classes != self.num_classes:
            raise StatsMismatchError(
                f"statistics have {self.num_classes} classes, the run has {num_classes}")

    def save(self, path) -> None:
        """Write a safetensors file (tensors + JSON metadata + sha256 checksum), atomically."""
        tensors = {}
        for name, s in self._sites.items():
            for field in ("psi", "mu", "phi", "phi_soft"):
                tensors[f"{name}/{field}"] = getattr(s, field).detach().cpu().contiguous()
        meta = {
            "format": FORMAT,
            "model_class": self.model_class,
            "sites": self.sites,
            "shapes": self.shapes,
            "counts": {n: s.count for n, s in self._sites.items()},
            "num_images": self.num_images,
            "num_classes": self.num_classes,
            "provenance": self.provenance,
        }
        meta["sha256"] = checksum(tensors, meta)
        atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata={"unidd": json.dumps(meta)}))

    @classmethod
    def load(cls, path, device="cpu") -> "RealStats":
        """Read a file written by ``save``; no pickle is involved. Raises StatsFileError if it
        is missing, truncated, corrupted or not a statistics file."""
        path = Path(path)
        if not path.is_file():
            raise StatsFileError(f"statistics file {path} does not exist; create it with `unidd-fast stats`")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                raw = (handle.metadata() or {}).get("unidd")
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise StatsFileError(f"{path} is not a readable statistics file ({exc}); it may be truncated: "
                                 "recreate it with `unidd-fast stats`") from exc
        if raw is None:
            raise StatsFileError(f"{path} has no unidd_fast metadata; it was not written by RealStats.save")
        meta = _parse_meta(path, raw)
        if checksum(tensors, {k: v for k, v in meta.items() if k != "sha256"}) != meta["sha256"]:
            raise StatsFileError(f"{path} fails its checksum (corrupted); recreate it with `unidd-fast stats`")
        sites = {
            n: SiteStats(*(tensors[f"{n}/{f}"].to(device) for f in ("psi", "mu", "phi", "phi_soft")),
                         count=meta["counts"][n])
            for n in meta["sites"]
        }
        return cls(sites, meta["shapes"], meta["model_class"], meta["num_images"], meta["num_classes"],
                   meta.get("provenance"))


# --- exact merges across torchrun ranks ---------------------------------------------------

def merge_moments(acc: dict[str, MomentAccumulator], shapes: dict[str, tuple], num_images: int,
                  num_classes: int) -> int:
    """Replace every rank's per-site accumulators by the merge of all ranks' (in rank order,
    so every rank holds bit-identical results) and fill ``shapes`` for sites this rank never
    saw (empty shard). Returns the total image count (0: nothing merged). Collective: every
    rank must call it, with the same site names."""
    total = int(sum(t.item() for t in dist_helpers.gather(torch.tensor([num_images], dtype=torch.int64))))
    if total == 0:
        return 0
    names = list(acc)
    meta = torch.zeros(len(names), 4, dtype=torch.int64)
    for i, name in enumerate(names):
        if acc[name].count:
            meta[i] = torch.tensor([*shapes[name], acc[name].soft_sum.shape[1]])
    meta = torch.stack(dist_helpers.gather(meta)).amax(0)  # any rank that saw data knows the shapes
    for i, name in enumerate(names):
        d, h, w, c_soft = (int(v) for v in meta[i])
        shapes.setdefault(name, (d, h, w))
        mine = acc[name] if acc[name].count else MomentAccumulator.zeros(d, num_classes, c_soft)
        merged = MomentAccumulator()
        for state in dist_helpers.gather_state(mine.state_dict()):
            merged.merge(MomentAccumulator.from_state_dict(state))
        acc[name] = merged
    return total


@annotate("stats")
@torch.no_grad()
def collect_real_stats(model: nn.Module, loader, num_classes: int, sites="bn", device=None,
                       show_progress: bool | None = None, distributed: bool = False,
                       covariance: str = "exact", backend: str = "auto") -> RealStats:
    """Exact statistics of the whole ``loader`` (yielding (images, int labels)) at every site.

    The model runs in eval mode; its outputs give the soft-label FLC (teacher probabilities).
    A DataParallel/DDP wrapper is removed first: the sites are named as in the plain network
    (what ``compat.sre2l.cfm_hooks`` and CFMLoss see), and the network runs in this process.
    ``distributed=True`` (under torchrun, process group initialised): each rank reads its
    shard of the DataLoader and the moments are merged exactly, so every rank returns the
    statistics of the whole loader (see unidd_fast/distributed.py).

    covariance: "exact" (default) is the covariance of all rows of the loader;
    "batch_mean" is the authors' release's Ψ = Σ_b (rows_b / rows) Ψ_b, the average of the
    per-batch population covariances, which drops the between-batch term and so depends on
    the batch size and order (the release uses an unshuffled loader); μ and Φ are exact in
    both. The choice is stored in ``provenance["covariance"]``.

    backend: that of the site statistics (``ops.site_stats``).
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if covariance not in COVARIANCES:
        raise ConfigError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    if covariance == "batch_mean" and distributed:
        raise ConfigError("covariance='batch_mean' depends on the order of the batches: collect it in one "
                          "process (distributed=False), or use the exact covariance")
    model = unwrap(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    acc: dict[str, MomentAccumulator] = {}
    shapes: dict[str, tuple] = {}
    pending: dict[str, tuple] = {}

    def on_site(name, feat):
        pending[name] = site_stats(feat, backend)
        shapes[name] = tuple(feat.shape[1:])

    if distributed:
        loader = dist_helpers.shard_loader(loader)
        show_progress = show_progress if dist_helpers.info().is_main else False
    hooks = SiteHooks(model, sites, on_site)
    for name in hooks.names:
        acc[name] = MomentAccumulator()
    batch_psi: dict[str, torch.Tensor] = {}  # covariance="batch_mean": Σ_b rows_b Ψ_b
    num_images = 0
    try:
        for step, (images, labels) in enumerate(progress(loader, desc="stats", enable=show_progress)):
            images, labels = images.to(device), labels.to(device)
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                raise ConfigError(f"labels out of range [0, {num_classes}) in batch {step}: "
                                  "num_classes does not match the dataset")
            pending.clear()
            probs = torch.softmax(model(images).float(), dim=1)
            onehot = as_label_matrix(labels, num_classes, torch.float64)
            for name, (psi_b, mu_b, pooled) in pending.items():
                if not bool(torch.isfinite(psi_b).all() & torch.isfinite(mu_b).all()):
                    raise NonFiniteError(f"stats: NaN/Inf in the input of site {name!r} at batch {step}; "
                                         "check the data and the teacher weights")
                rows = pooled.shape[0] * shapes[name][1] * shapes[name][2]
                acc[name].update(psi_b, mu_b, pooled, onehot, probs, rows)
                if covariance == "batch_mean":
                    batch_psi[name] = batch_psi.get(name, 0) + psi_b.double() * rows
            num_images += images.shape[0]
    finally:
        hooks.remove()
        model.train(was_training)
    if distributed:
        num_images = merge_moments(acc, shapes, num_images, num_classes)
    if num_images == 0:
        raise ConfigError("the loader yielded no images")
    final = {n: a.finalize(num_images) for n, a in acc.items()}
    if covariance == "batch_mean":
        for name, site in final.items():
            site.psi = batch_psi[name] / site.count
    return RealStats(final, shapes, type(model).__name__, num_images, num_classes, {"covariance": covariance})
