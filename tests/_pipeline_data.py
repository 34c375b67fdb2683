"""Tiny datasets written in each real on-disk format the pipeline reads (test helpers).

Images are class-dependent (a per-class mean colour plus noise) so a teacher can learn
them, but no test relies on accuracy beyond being a valid fraction.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def _images(rng: np.random.Generator, labels, size: int) -> np.ndarray:
    """uint8 (n, size, size, 3) images whose colour depends on the label."""
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [40, 200, 200]], dtype=np.float64)
    out = base[np.asarray(labels) % len(base)][:, None, None, :] + rng.normal(0, 30, (len(labels), size, size, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def write_cifar(root: Path, kind: str = "cifar10", classes: int = 3, per_batch: int = 6, seed: int = 0) -> Path:
    """torchvision's layout: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} or
    cifar-100-python/{train,test,meta}; pickled dicts with 'data' (n, 3072) uint8 rows
    (channel-major, like the originals) and 'labels' / 'fine_labels'."""
    rng = np.random.default_rng(seed)
    if kind == "cifar10":
        folder, train_files, test_file, meta_file = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], \
            "test_batch", "batches.meta"
        label_key, meta = "labels", {"label_names": [f"c{i}" for i in range(classes)]}
    else:
        folder, train_files, test_file, meta_file = "cifar-100-python", ["train"], "test", "meta"
        label_key, meta = "fine_labels", {"fine_label_names": [f"c{i}" for i in range(classes)],
                                          "coarse_label_names": ["all"]}
    base = Path(root) / folder
    base.mkdir(parents=True)
    for name in train_files + [test_file]:
        labels = [i % classes for i in range(per_batch)]
        data = _images(rng, labels, 32).transpose(0, 3, 1, 2).reshape(per_batch, -1)
        entry = {"data": data, label_key: labels, "batch_label": name}
        if kind == "cifar100":
            entry["coarse_labels"] = [0] * per_batch
        with open(base / name, "wb") as handle:
            pickle.dump(entry, handle, protocol=2)
    with open(base / meta_file, "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return Path(root)


def _save(path: Path, array: np.ndarray, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def write_image_folders(root: Path, classes=("cat", "dog", "emu"), per_class: int = 4, size: int = 12,
                        splits=("train", "val"), seed: int = 0) -> Path:
    """ImageFolder trees ``<split>/<class>/<i>.png``."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c, name in enumerate(classes):
            for i, image in enumerate(_images(rng, [c] * per_class, size)):
                _save(Path(root) / split / name / f"{i}.png", image, "PNG")
    return Path(root)


def write_tiny_imagenet(root: Path, wnids=("n01", "n02", "n03"), per_class: int = 4, val_per_class: int = 2,
                        size: int = 16, seed: int = 0) -> tuple[Path, list[tuple[str, str]]]:
    """Tiny-ImageNet as released: tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG,
    val/images/*.JPEG, val/val_annotations.txt}. Returns (root, [(val file, wnid)])."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "tiny-imagenet-200"
    (base).mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for c, wnid in enumerate(wnids):
        for i, image in enumerate(_images(rng, [c] * per_class, size)):
            _save(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", image, "JPEG")
    annotations, lines = [], []
    order = [(c, w) for c in range(val_per_class) for w in reversed(wnids)]  # classes interleaved
    for k, (_, wnid) in enumerate(order):
        name = f"val_{k}.JPEG"
        _save(base / "val" / "images" / name, _images(rng, [wnids.index(wnid)], size)[0], "JPEG")
        lines.append(f"{name}\t{wnid}\t0\t0\t{size - 1}\t{size - 1}")
        annotations.append((name, wnid))
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return Path(root), annotations
