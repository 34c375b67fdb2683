"""Import the statistics files shipped with the authors' CFM release.

The release stores one folder per hook site, ``<statistic>/<dataset>/input/ConvFeatureHook/
<Model>.pth=<site>/running.npz``, at the input of every Conv2d whose name has no
``downsample`` (our ``sites="conv"``). Each ``running.npz`` holds float32 arrays:

- ``running_cov`` (d, d): Σ_b (n_b / N) Ψ_b, the average of per-batch population covariances
  over an unshuffled loader (our ``covariance="batch_mean"``);
- ``running_mean`` (d,): μ;
- ``running_class_mean`` (d, c): (1/N) X'ᵀY with one-hot Y, our Φ;
- ``running_mix_mean`` (d, c): the same with the teacher's probabilities, our Φ_soft;
- ``running_corr`` (d, d): an uncentred second moment the release does not use (not imported).

The files are read with ``numpy.load(allow_pickle=False)``: no code in them can run.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import StatsFileError, StatsMismatchError
from ..real_stats import RealStats, SiteStats
from ..sites import resolve_sites, site_input_shapes, unwrap

FIELDS = {"psi": "running_cov", "mu": "running_mean", "phi": "running_class_mean", "phi_soft": "running_mix_mean"}


def release_site_files(path) -> dict[str, dict[str, Path]]:
    """{checkpoint name: {site: running.npz}} under ``path``: a ``ConvFeatureHook`` folder, or
    one ``<Model>.pth=<site>/running.npz`` inside it (then only that checkpoint's sites)."""
    path = Path(path).expanduser()
    only = None
    if path.is_file():
        if path.name != "running.npz" or "=" not in path.parent.name:
            raise StatsFileError(f"{path} is not a release statistics file (<Model>.pth=<site>/running.npz)")
        only, path = path.parent.name.split("=", 1)[0], path.parent.parent
    if not path.is_dir():
        raise StatsFileError(f"{path} does not exist; give the release's statistic/<dataset>/input/ConvFeatureHook "
                             "folder")
    groups: dict[str, dict[str, Path]] = {}
    for folder in sorted(path.iterdir()):
        if "=" in folder.name and (folder / "running.npz").is_file():
            ckpt, site = folder.name.split("=", 1)
            if only is None or ckpt == only:
                groups.setdefault(ckpt, {})[site] = folder / "running.npz"
    if not groups:
        raise StatsFileError(f"no <Model>.pth=<site>/running.npz folders in {path}")
    return groups


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in FIELDS.values() if key not in npz.files]
            if missing:
                raise StatsFileError(f"{path} lacks {missing}: not a statistics file of the CFM release")
            return {key: npz[key] for key in FIELDS.values()}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise StatsFileError(f"{path} is not a readable .npz file ({exc}); fetch it again") from exc


def import_release_stats(path, model: nn.Module, num_classes: int | None = None,
                         input_shape: tuple | None = None) -> RealStats:
    """RealStats (``sites="conv"``) of ``model`` from the release's ``running.npz`` files.

    The site names of the files must be exactly the teacher's conv sites (names are checked,
    widths d and the class count c too). ``input_shape`` (c, h, w): record each site's
    feature shape from one forward (otherwise (d,)). Counts are unknown: ``num_images`` is 0.
    Provenance: ``{"source": "release_npz", "covariance": "batch_mean", "checkpoint": name}``.
    """
    inner = unwrap(model)
    wanted = resolve_sites(inner, "conv")
    names = [name for name, _ in wanted]
    groups = release_site_files(path)
    matching = [ckpt for ckpt, files in groups.items() if set(files) == set(names)]
    if not matching:
        report = "; ".join(f"{ckpt}: missing {sorted(set(names) - set(files))[:4]}, extra "
                           f"{sorted(set(files) - set(names))[:4]}" for ckpt, files in groups.items())
        raise StatsMismatchError(f"no checkpoint in {path} has exactly the teacher's {len(names)} conv sites "
                                 f"({names[:3]}...): {report}")
    if len(matching) > 1:
        raise StatsMismatchError(f"several checkpoints in {path} fit the teacher's sites ({matching}): give one "
                                 "of their running.npz files instead of the folder")
    ckpt = matching[0]
    if num_classes is None:
        linears = [m for m in inner.modules() if isinstance(m, nn.Linear)]
        num_classes = linears[-1].out_features if linears else None
    sites = {}
    for name, module in wanted:
        file = groups[ckpt][name]
        arrays = _read_npz(file)
        d = module.in_channels
        c = num_classes if num_classes is not None else arrays["running_class_mean"].shape[-1]
        want = {"running_cov": (d, d), "running_mean": (d,), "running_class_mean": (d, c), "running_mix_mean": (d, c)}
        for key, shape in want.items():
            if arrays[key].shape != shape:
                raise StatsMismatchError(f"{file}: {key} has shape {arrays[key].shape}, the teacher's site {name!r} "
                                         f"needs {shape} ({d} channels, {c} classes): the file belongs to another "
                                         "model or dataset")
            if arrays[key].dtype.kind != "f" or not np.isfinite(arrays[key]).all():
                raise StatsFileError(f"{file}: {key} is not a finite floating-point array")
        tensors = {ours: torch.from_numpy(arrays[theirs].astype(np.float64)) for ours, theirs in FIELDS.items()}
        sites[name] = SiteStats(**tensors, count=0)
        num_classes = c
    shapes = (site_input_shapes(inner, names, input_shape) if input_shape is not None
              else {n: (sites[n].dim,) for n in names})
    return RealStats(sites, shapes, type(inner).__name__, 0, num_classes,
                     {"source": "release_npz", "covariance": "batch_mean", "checkpoint": ckpt})
