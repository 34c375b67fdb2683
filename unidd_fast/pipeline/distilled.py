"""The distilled set on disk: its 8-bit image files *are* the set.

Layout (SRe2L's, so other methods' tools read it as it is):
``new{c:03d}/class{c:03d}_id{i:03d}.png`` (or ``.jpg``), one uint8 image per class and ipc
index, and ``distilled.json``, written last, the index of a finished set
(``{"format", "count", "shape": [C, H, W], "image_format", "mean", "std", ...}``).
There is no second copy (no float32 tensors): evaluation reads these files, so it trains on
exactly the pixels handed over. Writing is per image and atomic, so memory stays at one
class-batch however large the set; reading goes through a DataLoader (``ImageFiles``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from torchvision.transforms import functional as TF

from ..errors import ConfigError
from ..real_stats import atomic_write
from .datasets import image_loader
from .fingerprint import SET_FOLDERS, SET_INDEX

INDEX_FILE = SET_INDEX
FORMAT = "unidd_fast.distilled/1"


def to_uint8(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised images (k, C, H, W) float -> 8-bit pixels (k, C, H, W) uint8 on the CPU:
    round(255 · clamp(x · std + mean, 0, 1)), the values a PNG of them holds."""
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = (images.detach().float().cpu() * std + mean).clamp_(0, 1)
    return pixels.mul_(255).round_().to(torch.uint8)


def save_image(path: Path, image: torch.Tensor, fmt: str = "png") -> None:
    """One image (C, H, W) uint8 as a PNG (lossless) or JPEG (quality 95), atomically."""
    array = image.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else np.ascontiguousarray(array))
    options = {"format": "PNG"} if fmt == "png" else {"format": "JPEG", "quality": 95}
    atomic_write(path, lambda tmp: picture.save(tmp, **options))


class SetWriter:
    """Writes one distilled set into ``root`` as its class-batches finish; ``finish`` writes
    the index once every image is on disk (nothing is held in memory across class-batches)."""

    def __init__(self, root: Path, mean, std, fmt: str = "png"):
        self.root, self.mean, self.std, self.fmt = Path(root), tuple(mean), tuple(std), fmt
        self.ext = "png" if fmt == "png" else "jpg"

    def image_file(self, c: int, ipc_index: int) -> Path:
        return self.root / f"{SET_FOLDERS}{c:03d}" / f"class{c:03d}_id{ipc_index:03d}.{self.ext}"

    def write(self, cb, images: torch.Tensor) -> None:
        """Class-batch ``cb``'s normalised images (k, C, H, W)."""
        self.write_pixels(cb, to_uint8(images, self.mean, self.std))

    def write_pixels(self, cb, pixels: torch.Tensor) -> None:
        """Class-batch ``cb``'s 8-bit images (k, C, H, W) uint8."""
        for c, image in zip(cb.classes.tolist(), pixels):
            save_image(self.image_file(c, cb.ipc_index), image, self.fmt)

    def finish(self, plan, meta: dict) -> Path:
        """Write ``distilled.json`` after checking that every image of ``plan`` is on disk."""
        missing = [self.image_file(c, cb.ipc_index) for cb in plan for c in cb.classes.tolist()
                   if not self.image_file(c, cb.ipc_index).is_file()]
        if missing:
            raise ConfigError(f"{len(missing)} images of the distilled set are missing (e.g. {missing[0]}); "
                              "rerun the same recover command to write them")
        first = Image.open(self.image_file(int(plan[0].classes[0]), 0))
        shape = [len(first.getbands()), first.height, first.width]
        index = dict({"num_classes": max(int(cb.classes.max()) for cb in plan) + 1}, **meta, format=FORMAT, count=sum(len(cb.classes) for cb in plan), shape=shape,
                     image_format=self.fmt, mean=list(self.mean), std=list(self.std))
        path = self.root / INDEX_FILE
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2) + "\n"))
        return path


def read_index(path) -> dict:
    """The index ``distilled.json`` of a finished set (a file, or the directory holding it)."""
    path = Path(path).expanduser()
    file = path / INDEX_FILE if path.is_dir() else path
    try:
        index = json.loads(file.read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"format {index.get('format')!r}, expected {FORMAT!r}")
        return index
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{file} is not the index of a distilled set ({exc}); rerun `unidd-fast recover`") from None


def _folder_classes(names: list[str], data_classes: list[str]) -> dict[str, int]:
    """Class index of each class folder: ``new{c:03d}`` -> c; dataset class names -> their
    index; otherwise sorted order."""
    if all(re.fullmatch(r"new\d+", n) for n in names):
        return {n: int(n[3:]) for n in names}
    if set(names) <= set(data_classes):
        return {n: data_classes.index(n) for n in names}
    return {n: i for i, n in enumerate(sorted(names))}


def find_images(path, classes: list, num_classes: int) -> list[tuple[str, int]]:
    """(file, label) of every image of a distilled set: a directory (ours, with or without
    ``distilled.json``, or any ImageFolder tree) or our ``distilled.json``. Sorted by class
    folder, then file name. A finished set of ours must hold as many images as its index says."""
    path = Path(path).expanduser()
    index = None
    if path.is_file() and path.name == INDEX_FILE:
        index, path = read_index(path), path.parent
    elif path.is_dir() and (path / INDEX_FILE).is_file():
        index = read_index(path)
    if not path.is_dir():
        raise ConfigError(f"distilled set {path} does not exist; expected a recover run directory, its {INDEX_FILE} "
                          "or an ImageFolder tree (new000/class000_id000.png, ...)")
    names = sorted(e.name for e in path.iterdir() if e.is_dir() and e.name not in ("checkpoints", "show"))
    if not names:
        raise ConfigError(f"{path} has no class folders; expected new{{c:03d}}/class{{c:03d}}_id{{i:03d}}.png")
    class_to_idx = _folder_classes(names, list(classes))
    bad = [n for n, c in class_to_idx.items() if c >= num_classes]
    if bad:
        raise ConfigError(f"{path}: class folders {bad[:3]} exceed the dataset's {num_classes} classes")
    samples = make_dataset(str(path), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise ConfigError(f"{path}: no images in its class folders")
    if index is not None and len(samples) != index["count"]:
        raise ConfigError(f"{path}: {INDEX_FILE} lists {index['count']} images but the class folders hold "
                          f"{len(samples)}; rerun `unidd-fast recover --force` into this directory")
    return samples


class ImageFiles(Dataset):
    """Image files read on demand (in DataLoader workers): item i is (image (C, size, size)
    float32 normalised with ``mean``/``std``, label). Pixels are uint8 in the file and turned
    to float as ``TensorImages`` does; images of another side are resized (short side) and
    centre-cropped to ``size``."""

    def __init__(self, samples: list[tuple[str, int]], size: int, channels: int, mean, std):
        self.samples, self.size = samples, int(size)
        self.labels = torch.tensor([c for _, c in samples], dtype=torch.long)
        self.loader = image_loader(channels)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, i: int) -> torch.Tensor:
        """Image i as stored, resized to ``size`` if need be: (C, size, size) uint8."""
        try:
            x = TF.pil_to_tensor(self.loader(self.samples[i][0]))
        except OSError as exc:
            raise ConfigError(f"{self.samples[i][0]} is not a readable image ({exc})") from None
        if x.shape[-2:] != (self.size, self.size):
            x = TF.center_crop(TF.resize(x, self.size, antialias=True), [self.size, self.size])
        return x

    def __getitem__(self, i: int):
        x = self.pixels(i).float().div_(255)
        return (x - self.mean) / self.std, int(self.labels[i])


def read_set(path, max_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, C, H, W) uint8 as stored, labels (N,)) of a finished set of ours (its
    directory or ``distilled.json``), the first ``max_classes`` classes only if given, in
    memory: for pictures and tests of small sets, never for training."""
    index = read_index(path)
    files = ImageFiles(find_images(path, [], index["num_classes"]), index["shape"][1], index["shape"][0],
                       index["mean"], index["std"])
    labels = files.labels.tolist()
    classes = set(sorted(set(labels))[:max_classes])
    keep = [i for i, c in enumerate(labels) if c in classes]
    return torch.stack([files.pixels(i) for i in keep]), files.labels[keep]
