"""Stats: exact real statistics of the training set at every hook site of the teacher."""
from __future__ import annotations

from ..real_stats import collect_real_stats
from .config import Config
from .datasets import Batches, prepare_data
from .models import load_teacher
from .rundir import RunDir
from .train import setup_device


def run(cfg: Config, out: RunDir, teacher_path, batch_size: int = 256) -> dict:
    """Write ``stats.safetensors`` (RealStats of ``cfg.recover.sites``) for the teacher."""
    device = setup_device(cfg)
    data = prepare_data(cfg)
    out.write_config(cfg)
    teacher, _ = load_teacher(teacher_path, device)
    loader = Batches(data.train, batch_size, device=device, workers=cfg.data.workers)
    stats = collect_real_stats(teacher, loader, data.num_classes, sites=cfg.recover.sites, device=device)
    path = out.path / "stats.safetensors"
    stats.save(path)
    out.log(f"stats: {len(stats)} sites ({cfg.recover.sites}) over {stats.num_images} images -> {path}")
    results = {"sites": stats.sites, "num_images": stats.num_images,
               "artifacts": {"teacher": str(teacher_path), "stats": str(path)}}
    out.write_results(results)
    return results
