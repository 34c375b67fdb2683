"""Stored soft labels (FKD-style): the teacher's labels written once, so evaluation runs no teacher.

``unidd-fast relabel`` replays, for every evaluation epoch, the random draws the online
evaluation would make (batch order, augmentation matrices, CutMix boxes: the same
generators seeded the same way) and stores with them the teacher's top-k logits of every
augmented image. ``evaluate --labels DIR`` then rebuilds each batch from those draws and
trains the student on the stored labels: with k = number of classes it is the online
evaluation step for step, without the teacher's forward.

Per distilled set and seed, one directory ``set{i:03d}/`` (the i-th evaluation job) with
one safetensors file per epoch, ``epoch{e:04d}.safetensors``, tensors in batch order:
``index`` (N,) int64 image ids, ``theta`` (N, 2, 3) float32 affine matrices, ``boxes``
(N, 4) float32 CutMix boxes (absent without CutMix), ``values`` (N, k) float32 teacher
logits and ``indices`` (N, k) int32 their classes; metadata: format, epoch, seed,
batch size, k, the augmentation, and a fingerprint of the distilled set.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import ConfigError
from ..progress import progress
from ..real_stats import atomic_write
from .augment import apply_cutmix, cutmix_boxes, make_augment, warp
from .config import EvalConfig
from .datasets import TensorImages
from .train import kd_teacher, make_generator

LABELS_FORMAT = "unidd_fast.relabel/1"


def fingerprint(distilled: TensorImages) -> str:
    """sha256 of a distilled set's pixels and labels: stored labels fit only this set."""
    digest = hashlib.sha256()
    for t in (distilled.images, distilled.labels):
        digest.update(t.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _recipe(ev: EvalConfig, flip: bool, seed: int, n: int, k: int, fprint: str) -> dict:
    """What stored labels depend on (compared on use)."""
    aug = make_augment(ev.augment, ev.crop_min, flip=flip)
    return {"format": LABELS_FORMAT, "seed": seed, "num_images": n, "batch_size": min(ev.batch_size, n),
            "topk": k, "augment": repr(aug), "cutmix": ev.cutmix, "fingerprint": fprint}


def _draws(distilled: TensorImages, ev: EvalConfig, flip: bool, device, seed: int, epochs: int):
    """Per epoch, per batch: (index, theta, boxes or None), drawn in the order and from the
    generators of ``evaluate.train_student`` (shuffle on the CPU, augmentation on ``device``)."""
    aug = make_augment(ev.augment, ev.crop_min, flip=flip)
    generator, shuffle = make_generator(device, seed), make_generator(torch.device("cpu"), seed)
    n = len(distilled)
    size = min(ev.batch_size, n)
    for _ in range(epochs):
        batches = []
        for index in torch.randperm(n, generator=shuffle).split(size):
            # a full batch of draws even for the last, shorter batch, as train_student draws them
            theta = aug.theta(size, generator, device)[:index.numel()]
            boxes = cutmix_boxes(size, ev.cutmix, generator, device)[:index.numel()] if ev.cutmix > 0 else None
            batches.append((index, theta, boxes))
        yield batches


def _augmented(distilled: TensorImages, index, theta, boxes, device) -> torch.Tensor:
    x = warp(distilled.batch(index)[0].to(device), theta)
    return apply_cutmix(x, boxes) if boxes is not None else x


def _read_epoch(path: Path) -> tuple[dict, dict]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("unidd", "{}"))
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable labels file ({exc}); rerun `unidd-fast relabel`") from exc
    if meta.get("format") != LABELS_FORMAT:
        raise ConfigError(f"{path} is not a labels file written by `unidd-fast relabel`")
    return meta, tensors


@torch.no_grad()
def record(teacher, distilled: TensorImages, ev: EvalConfig, flip: bool, device, seed: int, folder: Path,
           topk: int, desc: str = "relabel") -> int:
    """Write ``folder/epoch{e:04d}.safetensors`` for every evaluation epoch; epochs already
    written for the same set and settings are kept (resume). Returns the number written."""
    kd_teacher(teacher)
    num_classes = teacher(distilled.batch(torch.arange(1))[0].to(device)).shape[1]
    k = num_classes if topk <= 0 else min(topk, num_classes)
    recipe = _recipe(ev, flip, seed, len(distilled), k, fingerprint(distilled))
    written = 0
    for epoch, batches in enumerate(progress(_draws(distilled, ev, flip, device, seed, ev.epochs), desc=desc,
                                             total=ev.epochs)):
        path = folder / f"epoch{epoch:04d}.safetensors"
        if path.is_file():
            try:
                meta, _ = _read_epoch(path)
                if {key: meta.get(key) for key in recipe} == recipe:
                    continue
            except ConfigError:
                pass  # a torn or foreign file of ours: write it again
        parts = {"index": [], "theta": [], "boxes": [], "values": [], "indices": []}
        for index, theta, boxes in batches:
            logits = teacher(_augmented(distilled, index, theta, boxes, device)).float()
            values, indices = logits.topk(k, dim=1)
            parts["index"].append(index)
            parts["theta"].append(theta.float().cpu())
            if boxes is not None:
                parts["boxes"].append(boxes.cpu())
            parts["values"].append(values.cpu())
            parts["indices"].append(indices.int().cpu())
        tensors = {name: torch.cat(p).contiguous() for name, p in parts.items() if p}
        meta = {"unidd": json.dumps(dict(recipe, epoch=epoch))}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        written += 1
    return written


class StoredLabelBatches:
    """Evaluation batches rebuilt from a ``relabel`` folder: yields (augmented images on
    ``device``, (top-k logits (n, k), their classes (n, k))) in the stored order. Under
    torchrun each rank keeps its slice ``[rank::world]`` of every global batch."""

    def __init__(self, folder, distilled: TensorImages, ev: EvalConfig, flip: bool, device, seed: int,
                 world: int = 1, rank: int = 0):
        self.folder, self.distilled, self.device = Path(folder).expanduser(), distilled, torch.device(device)
        self.world, self.rank = world, rank
        first = self.folder / "epoch0000.safetensors"
        if not first.is_file():
            raise ConfigError(f"--labels: no {first}; write the labels with `unidd-fast relabel` for the same "
                              "distilled sets and seeds")
        meta, _ = _read_epoch(first)
        want = _recipe(ev, flip, seed, len(distilled), meta.get("topk"), fingerprint(distilled))
        differ = [key for key in want if meta.get(key) != want[key]]
        if differ:
            raise ConfigError(f"the labels in {self.folder} were made for other {differ} (labels: "
                              f"{[meta.get(k) for k in differ]}, this run: {[want[k] for k in differ]}); rerun "
                              "`unidd-fast relabel` with this configuration and distilled set")
        missing = [e for e in range(ev.epochs) if not (self.folder / f"epoch{e:04d}.safetensors").is_file()]
        if missing:
            raise ConfigError(f"{self.folder} lacks the labels of epoch(s) {missing[:5]} of {ev.epochs}: rerun "
                              "`unidd-fast relabel` into the same --out to finish it")
        self.batch_size = want["batch_size"]
        self._epoch = None

    def set_epoch(self, epoch: int) -> None:
        meta, self._epoch = _read_epoch(self.folder / f"epoch{epoch:04d}.safetensors")
        if meta.get("epoch") != epoch or self._epoch["index"].shape[0] != len(self.distilled):
            raise ConfigError(f"{self.folder}: the file of epoch {epoch} is not that epoch's; rerun relabel")

    def __len__(self) -> int:
        n = len(self.distilled)
        full, tail = divmod(n, self.batch_size)
        return full + (1 if tail >= self.world else 0)  # a tail smaller than the world is skipped

    def __iter__(self):
        t = self._epoch
        for start in range(0, len(self.distilled), self.batch_size):
            part = slice(start, start + self.batch_size)
            index = t["index"][part]
            if index.numel() < self.world:
                break
            boxes = t["boxes"][part] if "boxes" in t else None
            x = _augmented(self.distilled, index, t["theta"][part].to(self.device), boxes, self.device)
            mine = slice(self.rank, None, self.world)
            yield x[mine], (t["values"][part][mine].to(self.device), t["indices"][part][mine].long().to(self.device))


def kd_topk_loss(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, temperature: float,
                 t2: bool = False) -> torch.Tensor:
    """KL(p ‖ q) averaged over the batch, p = softmax(values / T) over the teacher's top-k
    classes ``indices`` (0 elsewhere), q = softmax(student / T); × T² if ``t2``. With k = all
    classes it equals ``evaluate.kd_loss``."""
    t = temperature
    log_p = F.log_softmax(values.double() / t, 1)
    log_q = F.log_softmax(student_logits.double() / t, 1).gather(1, indices)
    kl = (log_p.exp() * (log_p - log_q)).sum() / student_logits.shape[0]
    return (kl * (t * t) if t2 else kl).to(student_logits.dtype)
