"""Fail-fast checks of a stage's inputs, run before any data is read or any step is taken.
Each raises ConfigError saying what to change."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError, StatsMismatchError


def check_writable(path) -> None:
    """``path`` (a directory, maybe not there yet) accepts new files. Leaves nothing behind:
    the stage creates the directory once its own checks have passed."""
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {path}: {existing} is a file, not a directory; choose another --out")
    created = [p for p in [path, *path.parents] if p != existing and existing in p.parents]
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".unidd-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"--out {path} is not writable ({exc.strerror or exc}); choose a directory you can "
                          "write to with --out DIR") from None
    finally:
        for folder in created:  # deepest first
            if folder.is_dir():
                folder.rmdir()


def check_exists(flag: str, path, what: str) -> None:
    """An input file or directory named on the command line exists."""
    if not Path(path).expanduser().exists():
        raise ConfigError(f"{flag} {path} does not exist; {what}")


def check_teacher(spec: dict, data) -> None:
    """The teacher (its ``model_spec``) takes this dataset's images and predicts its classes."""
    if spec["num_classes"] != data.num_classes:
        raise ConfigError(f"the teacher predicts {spec['num_classes']} classes but the dataset {data.name} has "
                          f"{data.num_classes}: use a teacher squeezed on this dataset")
    if spec["channels"] != data.channels:
        raise ConfigError(f"the teacher takes {spec['channels']}-channel images, the data has {data.channels}: "
                          f"--set data.channels={spec['channels']}")
    if spec["image_size"] != data.image_size:
        raise ConfigError(f"the teacher was trained on {spec['image_size']} px images but data.image_size is "
                          f"{data.image_size}: --set data.image_size={spec['image_size']} (or squeeze a teacher at "
                          f"{data.image_size} px)")


def check_stats(stats, data) -> None:
    """Real statistics were collected over this dataset's classes."""
    if stats.num_classes != data.num_classes:
        raise ConfigError(f"the statistics file has {stats.num_classes} classes but the dataset {data.name} has "
                          f"{data.num_classes}: run `unidd-fast stats` with this dataset's teacher")


def check_provenance(stats, stats_path, teacher_path, teacher_sha256: str, dataset: dict) -> None:
    """The statistics were collected with this teacher's weights and on this data, as the
    file records (``RealStats.provenance``, see ``datasets.dataset_fingerprint``)."""
    from .rundir import describe_change

    fix = ("collect statistics with this teacher and data (`unidd-fast stats`), or pass --allow-stats-mismatch "
           "to use them anyway")
    teacher, recorded = stats.provenance.get("teacher"), stats.provenance.get("dataset")
    if teacher is None or recorded is None:
        raise StatsMismatchError(f"{stats_path} does not record the teacher and data it was collected with "
                                 f"(written by another tool or an older unidd-fast): {fix}")
    if teacher.get("sha256") != teacher_sha256:
        raise StatsMismatchError(
            f"{stats_path} was collected with the teacher {teacher.get('path')} (weights sha256 "
            f"{str(teacher.get('sha256'))[:12]}…), not with {Path(teacher_path).resolve()} (weights sha256 "
            f"{teacher_sha256[:12]}…): {fix}")
    changes = [f"data.{key}: " + (describe_change(recorded.get(key), dataset.get(key)) if key == "data" else
                                  f"{recorded.get(key)} -> {dataset.get(key)}")
               for key in sorted(set(recorded) | set(dataset)) if recorded.get(key) != dataset.get(key)]
    if changes:
        raise StatsMismatchError(f"{stats_path} was collected on other data than this run reads "
                                 f"({'; '.join(changes)}): {fix}")


def check_ipc(data, ipc: list[int]) -> None:
    """Every class has at least max(ipc) training images (to initialise from real ones)."""
    counts = torch.bincount(data.train_labels, minlength=data.num_classes)
    c = int(counts.argmin())
    if int(counts[c]) < max(ipc):
        raise ConfigError(f"class {c} ({data.classes[c]}) has {int(counts[c])} training images, fewer than "
                          f"ipc={max(ipc)}: lower --ipc, or initialise from noise with --set recover.init=noise")
