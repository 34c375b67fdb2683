"""Dataset readers. Nothing is downloaded: each reader takes data the user already has.

Every reader returns a ``Data`` whose ``train`` and ``test`` yield (image, label) with the
image a normalised float32 tensor (C, H, W) of side ``image_size`` and *no* random
augmentation: training augmentation is applied to whole batches on the device
(``augment.py``), so squeeze, recover and evaluate share one GPU-friendly path.

- digits: scikit-learn's handwritten digits (8×8, shipped with scikit-learn), stratified
  train/test split, bilinearly upsampled to ``image_size``.
- shapes: ten classes of coloured, textured shapes on varied backgrounds, generated in
  process from a seed (``shapes.py``).
- cifar10 / cifar100: torchvision's on-disk format (``cifar-10-batches-py/``,
  ``cifar-100-python/``), read with a restricted unpickler that only rebuilds numpy arrays.
- tiny-imagenet: ``tiny-imagenet-200/{train,val}``; val either as released (``val/images`` +
  ``val/val_annotations.txt``) or already sorted into class folders.
- imagenet / folder: torchvision ImageFolder trees ``train/<class>/*`` and ``val/<class>/*``
  (folder also accepts ``test/``).
"""
from __future__ import annotations

import codecs
import ctypes
import functools
import math
import os
import pickle
import signal
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets as tvd
from torchvision import io as tvio
from torchvision.io import ImageReadMode
from torchvision.transforms import functional as TF
from torchvision.transforms import v2 as T

from ..errors import ConfigError
from .fingerprint import fingerprint
from ..progress import progress
from . import shapes

IN_PROCESS = ("digits", "shapes")  # need no --data; normalisation computed from the train split
GRAY, RGB = ImageReadMode.GRAY, ImageReadMode.RGB


@dataclass
class Data:
    """A dataset ready for the pipeline. ``train_labels`` (N,) int64 are the train labels in
    order (used to pick real images per class without reading any image)."""

    name: str
    train: Dataset
    test: Dataset
    train_labels: torch.Tensor
    classes: list
    image_size: int
    channels: int
    mean: tuple
    std: tuple

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_images(self, index: torch.Tensor) -> torch.Tensor:
        """Normalised training images (k, C, H, W) float32 at positions ``index`` (k,)."""
        if isinstance(self.train, TensorImages):
            return self.train.batch(index)[0]
        return torch.stack([self.train[int(i)][0] for i in index])


class TensorImages(Dataset):
    """Images held in memory: uint8 (0..255) or float (0..1) tensor (N, C, h, w) and labels
    (N,). Items and batches come out resized to ``size`` and normalised, float32."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, size: int):
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"expected images (N,C,H,W) and labels (N,), got {tuple(images.shape)}, {tuple(labels.shape)}")
        self.images, self.labels, self.size = images, labels.long(), int(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index]
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std, self.labels[index]

    def __getitem__(self, i: int):
        x, y = self.batch(torch.tensor([i]))
        return x[0], int(y[0])


class ImageList(Dataset):
    """(path, label) pairs read with a torchvision transform (Tiny-ImageNet's val split)."""

    def __init__(self, samples: list[tuple[str, int]], transform, loader):
        self.samples, self.transform, self.loader = samples, transform, loader
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(self.loader(path)), label


MAX_WORKERS = 16  # default DataLoader workers per process: the cores it may use, at most this


def resolve_workers(workers: int) -> int:
    """DataLoader worker processes: ``workers`` when >= 0, else (data.workers = -1, the
    default) this process's share of the cores it may use (divided among the torchrun
    processes of the node), capped at MAX_WORKERS."""
    if workers >= 0:
        return workers
    share = len(os.sched_getaffinity(0)) // max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
    return max(1, min(share, MAX_WORKERS))


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` (bound to the pid of the process that makes the loader):
    on Linux, the kernel SIGKILLs this worker the moment that process's creating thread dies,
    so an out-of-memory kill of a run leaves no orphaned workers (torch's own watchdog only
    notices between items, every few seconds). A parent that died before the prctl call has
    already made this worker an orphan (its parent pid changed): then it exits at once."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed in a DataLoader worker")
    if os.getppid() != parent:
        os._exit(1)


def data_loader(dataset: Dataset, workers: int, **kwargs) -> DataLoader:
    """Every DataLoader of the pipeline: ``workers`` worker processes that die with this
    process (``die_with_parent``); ``kwargs`` go to DataLoader."""
    return DataLoader(dataset, num_workers=workers,
                      worker_init_fn=functools.partial(die_with_parent, os.getpid()) if workers else None, **kwargs)


class RankBatches(Sampler[list[int]]):
    """Batch sampler: the global batches of one pass (a permutation drawn from ``generator``
    when ``shuffle``, the same on every rank), of which this rank yields rows
    ``rank, rank + world, ...``; so each rank reads only the images it trains on."""

    def __init__(self, length: int, batch_size: int, shuffle: bool, generator, drop_last: bool, rank: int = 0,
                 world: int = 1):
        self.length, self.batch_size, self.shuffle, self.generator = length, batch_size, shuffle, generator
        self.drop_last, self.rank, self.world = drop_last, rank, world

    def __len__(self) -> int:
        n, b = self.length, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        n = self.length
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for index in order.split(self.batch_size):
            if self.drop_last and index.numel() < self.batch_size:
                break
            yield index[self.rank::self.world].tolist()


class Batches:
    """Re-iterable (images, labels) batches on ``device``; each pass reshuffles with
    ``generator`` when ``shuffle``. ``part`` (rank, world): this rank's rows of every global
    batch (torchrun). In-memory datasets are sliced a whole batch at a time; others stream
    through one DataLoader with ``workers`` processes (kept across passes), pinned memory on CUDA."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = False,
                 generator: torch.Generator | None = None, device="cpu", drop_last: bool = False, workers: int = 0,
                 part: tuple[int, int] = (0, 1)):
        if len(dataset) == 0:
            raise ConfigError("the dataset is empty")
        self.dataset, self.device = dataset, torch.device(device)
        self.batch_size = min(int(batch_size), len(dataset))
        self.sampler = RankBatches(len(dataset), self.batch_size, shuffle, generator, drop_last, *part)
        self.loader = None
        if not isinstance(dataset, TensorImages):
            self.loader = data_loader(dataset, workers, batch_sampler=self.sampler, persistent_workers=workers > 0,
                                      pin_memory=self.device.type == "cuda")

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        device = self.device
        if self.loader is None:
            for index in self.sampler:
                x, y = self.dataset.batch(torch.tensor(index, dtype=torch.long))
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            return
        for x, y in self.loader:
            yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)


# --- digits -----------------------------------------------------------------------------

def load_digits(cfg) -> Data:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    raw = sk_digits()
    x = torch.from_numpy(raw.images).float().div_(16).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    y = torch.from_numpy(raw.target).long()
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=cfg.test_size, stratify=raw.target,
                                           random_state=cfg.split_seed)
    x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    if cfg.channels == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    elif cfg.channels != 1:
        raise ConfigError(f"digits has 1 or 3 channels, got data.channels={cfg.channels}")
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return _in_memory(cfg, x[train_idx], y[train_idx], x[test_idx], y[test_idx], [str(c) for c in range(10)])


def _in_memory(cfg, xtr, ytr, xte, yte, classes) -> Data:
    """Data of in-memory images (N, C, H, W), float in [0, 1] or uint8, normalised with
    cfg.mean/std or, where those are empty, with the train split's per-channel moments."""
    scale = 255.0 if xtr.dtype == torch.uint8 else 1.0
    mean = tuple(cfg.mean) or tuple((xtr.float().mean((0, 2, 3)) / scale).tolist())
    std = tuple(cfg.std) or tuple((xtr.float().std((0, 2, 3)) / scale).tolist())
    size = cfg.image_size
    return Data(cfg.dataset, TensorImages(xtr, ytr, mean, std, size), TensorImages(xte, yte, mean, std, size), ytr,
                list(classes), size, cfg.channels, mean, std)


# --- shapes (generated) -------------------------------------------------------------------

SHAPES_TRAIN_PER_CLASS, SHAPES_TEST_PER_CLASS = 200, 50


@functools.lru_cache(maxsize=2)
def _shapes_images(per_class: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = shapes.generate(per_class, size, seed)
    return torch.from_numpy(images), torch.from_numpy(labels)


def load_shapes(cfg) -> Data:
    """The generated shapes (``shapes.py``): 200 train and 50 test images per class, drawn
    at ``image_size`` from seeds derived from ``split_seed`` (train and test never share a seed)."""
    if cfg.channels != 3:
        raise ConfigError(f"shapes images have 3 channels, got data.channels={cfg.channels}")
    if cfg.image_size < 8:
        raise ConfigError(f"shapes needs data.image_size >= 8, got {cfg.image_size}")
    xtr, ytr = _shapes_images(SHAPES_TRAIN_PER_CLASS, cfg.image_size, 2 * cfg.split_seed)
    xte, yte = _shapes_images(SHAPES_TEST_PER_CLASS, cfg.image_size, 2 * cfg.split_seed + 1)
    return _in_memory(cfg, xtr, ytr, xte, yte, shapes.CLASSES)


# --- CIFAR ------------------------------------------------------------------------------

# Plain numeric dtypes a CIFAR batch may hold (uint8 pixels, integer labels), by pickled code.
CIFAR_DTYPES = frozenset({"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"})


class _Stub:
    """What the CIFAR unpickler builds in place of a numpy object: the pickled arguments and
    state, inert until ``_plain`` has checked them."""

    def __init__(self, kind: str, *args):
        self.kind, self.args, self.state = kind, args, None

    def __setstate__(self, state):
        self.state = state


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR's python batches. numpy's array and dtype constructors are
    replaced by inert stubs, so nothing numpy would do with a hostile array (a structured
    dtype whose object fields read raw bytes as pointers, say) happens while loading; every
    other global is refused, so the file cannot run code either. ``_plain`` then turns the
    stubs into plain arrays of CIFAR_DTYPES, or refuses them."""

    STUBS = {"_reconstruct": "array", "_frombuffer": "frombuffer", "scalar": "scalar", "dtype": "dtype",
             "ndarray": "ndarray"}
    MODULES = {"numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
               "numpy._core.numeric"}

    def find_class(self, module, name):
        if module in self.MODULES and name in self.STUBS:
            return functools.partial(_Stub, self.STUBS[name])
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch file")


def _plain_dtype(stub) -> np.dtype:
    """The numpy dtype a dtype stub describes, if it is one of CIFAR_DTYPES with no fields,
    sub-arrays or flags; ValueError otherwise."""
    if not isinstance(stub, _Stub) or stub.kind != "dtype" or not stub.args or stub.args[0] not in CIFAR_DTYPES:
        code = stub.args[0] if isinstance(stub, _Stub) and stub.args else type(stub).__name__
        raise ValueError(f"an array of dtype {code!r}, expected one of {sorted(CIFAR_DTYPES)}")
    state = stub.state or (3, "|")
    if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
        raise ValueError(f"a dtype with the state {state!r}")
    if any(v not in (None, -1, 0) for v in state[2:]):  # sub-array, field names, fields, size, alignment, flags
        raise ValueError("a structured dtype (fields, sub-arrays or flags), expected a plain numeric dtype")
    return np.dtype(stub.args[0]).newbyteorder("=" if state[1] == "|" else state[1])


def _plain_array(dtype: np.dtype, shape, raw, fortran: bool = False) -> np.ndarray:
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"an array of shape {shape!r}")
    raw = raw.encode("latin1") if isinstance(raw, str) else raw
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != dtype.itemsize * math.prod(shape):
        raise ValueError(f"an array of shape {shape} whose data is not {dtype.itemsize * math.prod(shape)} bytes")
    return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _plain(value):
    """``value`` from _ArrayUnpickler with its stubs turned into plain numeric arrays (numbers
    for scalars); only dicts, lists, tuples, str, bytes, numbers and None pass. ValueError
    names the first thing refused."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if value is None or isinstance(value, (str, bytes, bool, int, float)):
        return value
    if isinstance(value, _Stub) and value.kind == "array":
        if not isinstance(value.state, tuple) or len(value.state) != 5:
            raise ValueError("an array without its data")
        _, shape, dtype, fortran, raw = value.state
        return _plain_array(_plain_dtype(dtype), shape, raw, bool(fortran))
    if isinstance(value, _Stub) and value.kind == "frombuffer" and len(value.args) == 4:
        raw, dtype, shape, order = value.args
        return _plain_array(_plain_dtype(dtype), shape, raw, order == "F")
    if isinstance(value, _Stub) and value.kind == "scalar" and len(value.args) == 2:
        return _plain_array(_plain_dtype(value.args[0]), (), value.args[1]).item()
    raise ValueError(f"an object of type {value.kind if isinstance(value, _Stub) else type(value).__name__}")


def _read_cifar_file(path: Path, key: str = "data") -> dict:
    try:
        with open(path, "rb") as handle:
            entry = _ArrayUnpickler(handle, encoding="latin1").load()
    except Exception as exc:
        raise ConfigError(f"{path} is not a readable CIFAR batch ({exc}); re-extract the CIFAR archive") from exc
    try:
        entry = _plain(entry)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(f"{path} holds {exc}, which no CIFAR batch holds; re-extract the CIFAR archive") from None
    if not isinstance(entry, dict) or key not in entry:
        raise ConfigError(f"{path} is not a CIFAR file (no {key!r} entry); re-extract the CIFAR archive")
    return entry


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (n, 3072) pixel rows, int64 (n,) labels in [0, num_classes)) of one CIFAR
    batch file; ConfigError naming the file and what is wrong with it."""
    entry = _read_cifar_file(path)
    fix = "re-extract the CIFAR archive"
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ConfigError(f"{path}: 'data' must be uint8 rows of 3072 pixels (n, 3072), got {got}; {fix}")
    labels = entry.get("labels", entry.get("fine_labels"))
    if isinstance(labels, list) and all(type(v) is int for v in labels):
        labels = np.array(labels, dtype=np.int64)
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ConfigError(f"{path}: 'labels' / 'fine_labels' must be a list of integers, got {_short(labels)}; {fix}")
    if len(labels) != len(data):
        raise ConfigError(f"{path}: {len(labels)} labels for {len(data)} images; {fix}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ConfigError(f"{path}: label {int(bad[0])} is outside the {num_classes} classes of the meta file; {fix}")
    return data, labels.astype(np.int64)


def load_cifar(cfg) -> Data:
    cls = tvd.CIFAR10 if cfg.dataset == "cifar10" else tvd.CIFAR100
    root = Path(cfg.data).expanduser()
    folder = root if root.name == cls.base_folder else root / cls.base_folder
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ConfigError(
            f"{cfg.dataset}: {folder} lacks {missing}. --data must be the directory holding {cls.base_folder}/ "
            f"with {names} (torchvision's CIFAR layout, the extracted {cls.filename}); nothing is downloaded")

    meta = folder / cls.meta["filename"]
    classes = _read_cifar_file(meta, cls.meta["key"])[cls.meta["key"]]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ConfigError(f"{meta}: {cls.meta['key']} must be a list of class names, got {_short(classes)}; "
                          "re-extract the CIFAR archive")

    def read(split):
        data, labels = [], []
        for name, _ in split:
            images, targets = _cifar_batch(folder / name, len(classes))
            data.append(images)
            labels.append(targets)
        return torch.from_numpy(np.vstack(data).reshape(-1, 3, 32, 32)), torch.from_numpy(np.concatenate(labels))

    (xtr, ytr), (xte, yte) = read(cls.train_list), read(cls.test_list)
    if cfg.channels != 3:
        raise ConfigError(f"{cfg.dataset} images have 3 channels, got data.channels={cfg.channels}")
    size, mean, std = cfg.image_size, tuple(cfg.mean), tuple(cfg.std)
    return Data(cfg.dataset, TensorImages(xtr, ytr, mean, std, size), TensorImages(xte, yte, mean, std, size),
                ytr, classes, size, 3, mean, std)


# --- ImageFolder trees ------------------------------------------------------------------

def _open_image(path: str, mode: str) -> Image.Image:
    with open(path, "rb") as handle:
        return Image.open(handle).convert(mode)


# The last bytes of a complete file of these formats (a truncated file lacks them).
IMAGE_ENDS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
VERIFY_THREADS = 8  # verification is one header and one tail read per file: I/O bound


def verify_image(path: str) -> None:
    """Check that ``path`` is a complete image of a sane size without decoding its pixels:
    its header opens, it is under PIL's decompression-bomb limit and, for PNG and JPEG, its
    end marker is there. ConfigError naming the file otherwise."""
    fix = "remove or replace it"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                fmt = image.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ConfigError(f"{path}: {exc} ({fix})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ConfigError(f"{path} is not a readable image ({exc}); {fix}") from None
    if fmt in IMAGE_ENDS:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - 1024))
            if IMAGE_ENDS[fmt] not in handle.read():
                raise ConfigError(f"{path} is truncated (the {fmt} end marker is missing); {fix}")


def verify_images(paths: list[str], desc: str = "verify images") -> None:
    """``verify_image`` on every path (a few threads), so a damaged file stops the run when
    the dataset is indexed, not in the middle of training."""
    with ThreadPoolExecutor(VERIFY_THREADS) as pool:
        for _ in progress(pool.map(verify_image, paths), total=len(paths), desc=desc):
            pass


def image_loader(channels: int):
    """path -> PIL image in mode L (1 channel) or RGB."""
    return functools.partial(_open_image, mode="L" if channels == 1 else "RGB")


def _decode(path: str, channels: int) -> torch.Tensor:
    try:
        return tvio.decode_image(tvio.read_file(path), mode=GRAY if channels == 1 else RGB)
    except RuntimeError:  # a format torchvision.io does not decode: PIL reads it
        return TF.pil_to_tensor(_open_image(path, "L" if channels == 1 else "RGB"))


def decode_loader(channels: int):
    """path -> (C, H, W) uint8 tensor, decoded by torchvision.io (libjpeg-turbo; 1.4× PIL's
    images/s on ImageNet-sized JPEGs here, bench/bench_decode.py), PIL for other formats."""
    return functools.partial(_decode, channels=channels)


def eval_transform(cfg):
    """uint8 tensor (or PIL image) -> resize the short side to image_size·resize_ratio, centre
    crop, float in [0, 1], normalise."""
    size = cfg.image_size
    return T.Compose([T.Resize(round(size * cfg.resize_ratio), antialias=True), T.CenterCrop(size), T.ToImage(),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(cfg.mean, cfg.std)])


def _image_folder(path: Path, cfg, what: str) -> tvd.ImageFolder:
    if not path.is_dir():
        raise ConfigError(f"{cfg.dataset}: {path} does not exist; expected {what}")
    try:
        folder = tvd.ImageFolder(str(path), transform=eval_transform(cfg), loader=decode_loader(cfg.channels))
    except FileNotFoundError as exc:
        raise ConfigError(f"{cfg.dataset}: {path} has no class folders with images ({exc}); expected {what}") from None
    verify_images([p for p, _ in folder.samples], desc=f"verify {path.name}")
    return folder


def _folder_data(cfg, train: tvd.ImageFolder, test: Dataset) -> Data:
    return Data(cfg.dataset, train, test, torch.tensor(train.targets, dtype=torch.long), list(train.classes),
                cfg.image_size, cfg.channels, tuple(cfg.mean), tuple(cfg.std))


def _check_same_classes(cfg, train: tvd.ImageFolder, test: tvd.ImageFolder) -> None:
    if train.classes != test.classes:
        only = sorted(set(train.classes) ^ set(test.classes))[:5]
        raise ConfigError(f"{cfg.dataset}: train/ and {Path(test.root).name}/ have different class folders "
                          f"(e.g. {only}); both need one folder per class with the same names")


def load_tiny_imagenet(cfg) -> Data:
    root = Path(cfg.data).expanduser()
    if not (root / "train").is_dir() and (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    layout = "tiny-imagenet-200/ with train/<wnid>/images/*.JPEG and val/ (val/images + val/val_annotations.txt)"
    train = _image_folder(root / "train", cfg, layout)
    annotations = root / "val" / "val_annotations.txt"
    if annotations.is_file():
        samples = []
        for lineno, line in enumerate(annotations.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in train.class_to_idx:
                raise ConfigError(f"{annotations}:{lineno}: expected '<file>\\t<wnid>\\t...' with a wnid "
                                  f"of train/, got {line[:80]!r}")
            image = root / "val" / "images" / parts[0]
            if not image.is_file():
                raise ConfigError(f"{annotations}:{lineno} names {image}, which does not exist")
            samples.append((str(image), train.class_to_idx[parts[1]]))
        verify_images([p for p, _ in samples], desc="verify val")
        test = ImageList(samples, eval_transform(cfg), decode_loader(cfg.channels))
    else:
        test = _image_folder(root / "val", cfg, layout)
        _check_same_classes(cfg, train, test)
    return _folder_data(cfg, train, test)


def load_image_folders(cfg) -> Data:
    root = Path(cfg.data).expanduser()
    layout = "a directory with train/<class>/<image> and val/<class>/<image>" + (
        " (or test/)" if cfg.dataset == "folder" else "")
    if not root.is_dir():
        raise ConfigError(f"{cfg.dataset}: --data {root} does not exist; expected {layout}")
    train = _image_folder(root / "train", cfg, layout)
    split = "val" if (root / "val").is_dir() or cfg.dataset != "folder" else "test"
    test = _image_folder(root / split, cfg, layout)
    _check_same_classes(cfg, train, test)
    return _folder_data(cfg, train, test)


# The datasets, by name: the one table that the config's presets and choices and the CLI's
# --dataset read.
READERS = {"digits": load_digits, "shapes": load_shapes, "cifar10": load_cifar, "cifar100": load_cifar,
           "tiny-imagenet": load_tiny_imagenet, "imagenet": load_image_folders, "folder": load_image_folders}


def load_data(cfg) -> Data:
    """Read the dataset named by ``cfg.dataset`` (a DataConfig) from ``cfg.data``."""
    if cfg.dataset not in READERS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; choose one of {tuple(READERS)}")
    generated = cfg.dataset in IN_PROCESS
    if not generated and not cfg.data:
        raise ConfigError(f"--dataset {cfg.dataset} needs --data PATH (the dataset's root directory)")
    if not generated and (len(cfg.mean) != cfg.channels or len(cfg.std) != cfg.channels):
        raise ConfigError(f"data.mean/std need {cfg.channels} values each (one per channel), got "
                          f"{cfg.mean} / {cfg.std}")
    return READERS[cfg.dataset](cfg)


def dataset_fingerprint(cfg) -> dict:
    """What identifies the images a stage reads: the dataset, its root folder (names, sizes
    and modification times of its files) and the settings that shape the images."""
    return {"dataset": cfg.dataset, "data": fingerprint(cfg.data) if cfg.data and cfg.dataset != "digits" else None,
            "image_size": cfg.image_size, "channels": cfg.channels, "mean": list(cfg.mean), "std": list(cfg.std),
            "resize_ratio": cfg.resize_ratio, "test_size": cfg.test_size, "split_seed": cfg.split_seed}


def prepare_data(cfg) -> Data:
    """Load ``cfg.data`` and record the normalisation actually used back into it (digits
    computes its mean/std from the train split), so config.json states it."""
    data = load_data(cfg.data)
    cfg.data.mean, cfg.data.std = tuple(data.mean), tuple(data.std)
    return data
