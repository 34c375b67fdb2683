"""Stats: exact real statistics of the training set at every hook site of the teacher.

The training set is read in order, in chunks of ``chunk_batches`` batches. After each chunk
the running float64 moments of every site (count, mean, centred second moment, label sums)
are written atomically to ``checkpoints/stats.safetensors``, so a rerun into the same
directory continues after the last chunk written. Under torchrun every rank reads its
shard of each chunk and ``collect_real_stats(distributed=True)`` merges them exactly; every
rank holds the same moments, rank 0 writes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Subset

from .. import distributed
from ..errors import ConfigError
from ..progress import rate_line
from ..real_stats import MomentAccumulator, RealStats, atomic_write, collect_real_stats
from . import preflight
from .checks import check_teacher
from .config import Config
from .datasets import data_loader, dataset_fingerprint, prepare_data, resolve_workers
from .models import load_teacher, weights_sha256
from .rundir import RunDir
from .train import setup_device

CHECKPOINT = "checkpoints/stats.safetensors"
CHECKPOINT_FORMAT = "unidd_fast.stats_checkpoint/2"
CHUNK_BATCHES = 200  # batches between two checkpoints (≈ 51k images at batch size 256)


def save_progress(path: Path, acc: dict[str, MomentAccumulator], shapes: dict, position: int, num_images: int,
                  model_class: str) -> None:
    """Running moments after the first ``position`` training images (atomic)."""
    tensors = {f"{name}/{k}": v.cpu().contiguous() for name, a in acc.items() for k, v in a.state_dict().items()}
    meta = {"format": CHECKPOINT_FORMAT, "position": position, "num_images": num_images, "model_class": model_class,
            "sites": list(acc), "shapes": shapes}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"unidd": json.dumps(meta)}))


def load_progress(path: Path, model_class: str) -> tuple[int, int, dict, dict]:
    """(position, images so far, accumulators, shapes) from ``save_progress``; (0, 0, {}, {}) if none."""
    if not path.is_file():
        return 0, 0, {}, {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})["unidd"])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        if meta.get("format") != CHECKPOINT_FORMAT or meta["model_class"] != model_class:
            raise ValueError(f"not a {CHECKPOINT_FORMAT} file of a {model_class}")
        acc = {name: MomentAccumulator.from_state_dict({k.rpartition("/")[2]: v for k, v in tensors.items()
                                                         if k.rpartition("/")[0] == name})
               for name in meta["sites"]}
    except Exception as exc:
        raise ConfigError(f"cannot resume from {path} ({exc}); rerun with --force to start over") from exc
    shapes = {k: tuple(v) for k, v in meta["shapes"].items()}
    return meta["position"], meta["num_images"], acc, shapes


def run(cfg: Config, out: RunDir, teacher_path, batch_size: int = 256, chunk_batches: int = CHUNK_BATCHES) -> dict:
    """Write ``stats.safetensors`` (RealStats of ``cfg.recover.sites``) for the teacher, the site
    statistics computed by ``cfg.recover.backend`` after its pre-flight check
    (``preflight.check_backends``; results' ``"fallbacks"``)."""
    device = setup_device(cfg)
    data = prepare_data(cfg)
    teacher, spec = load_teacher(teacher_path, device)
    check_teacher(spec, data)
    teacher.to(memory_format=torch.channels_last)  # the site statistics then read (n·h·w, d) rows as views
    if (done := out.start("stats", cfg, {"teacher": teacher_path})) is not None:
        return done
    # the site statistics' backend, checked at the teacher's site shapes (channels_last maps)
    backend, fallbacks = preflight.check_backends(
        teacher, (data.channels, data.image_size, data.image_size), batch_size, device,
        cfg.recover.backend, cfg.recover.sites, cfg.recover.strict, out.log, ops=("site_stats",),
        memory_format=torch.channels_last)
    here = distributed.info()
    model_class = type(teacher).__name__
    progress_file = out.path / CHECKPOINT
    position, num_images, acc, shapes = load_progress(progress_file, model_class)
    if position:
        out.log(f"stats: resuming after {position} of {len(data.train)} training images")
    chunk = batch_size * chunk_batches
    began, first, total = time.monotonic(), position, len(data.train)
    for start in range(position, total, chunk):
        part = Subset(data.train, range(start, min(start + chunk, len(data.train))))
        loader = data_loader(part, resolve_workers(cfg.data.workers), batch_size=batch_size,
                             pin_memory=device.type == "cuda")
        got = collect_real_stats(teacher, loader, data.num_classes, sites=cfg.recover.sites, device=device,
                                 distributed=here.world_size > 1, backend=backend)
        for name in got.sites:
            acc.setdefault(name, MomentAccumulator()).merge(MomentAccumulator.of(got[name], got.num_images))
        shapes.update(got.shapes)
        num_images += got.num_images
        position = start + len(part)
        if here.is_main and position < len(data.train):
            save_progress(progress_file, acc, shapes, position, num_images, model_class)
        out.log(f"stats: {rate_line(position - first, total - first, time.monotonic() - began, 'images')}")
    provenance = {"covariance": "exact",
                  "teacher": {"path": str(Path(teacher_path).resolve()), "sha256": weights_sha256(teacher)},
                  "dataset": dataset_fingerprint(cfg.data)}
    stats = RealStats({n: a.finalize(num_images) for n, a in acc.items()}, shapes, model_class, num_images,
                      data.num_classes, provenance)
    path = out.path / "stats.safetensors"
    if here.is_main:
        stats.save(path)
        progress_file.unlink(missing_ok=True)
    out.log(f"stats: {len(stats)} sites ({cfg.recover.sites}) over {stats.num_images} images -> {path}")
    results = {"sites": stats.sites, "num_images": stats.num_images,
               "artifacts": {"teacher": str(teacher_path), "stats": str(path)}, "fallbacks": fallbacks}
    out.finish(results)
    return results
