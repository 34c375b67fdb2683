"""Teacher and student networks, and their files.

- ``resnet18/50/101``: torchvision ResNets; for inputs of 64 px or less the stem is a 3×3
  stride-1 convolution without max pool (SRe2L's small-image squeeze).
- ``convnet``: depth × [conv3×3 → BatchNorm → ReLU → avg-pool 2] and a linear classifier
  (the ConvNet of DC/DM with BatchNorm, so every block has a BN site).

A trained teacher is stored as safetensors with its architecture in the metadata
(``save_teacher`` / ``load_teacher``). ``load_checkpoint`` reads a state dict from any
``torch.save`` file with ``weights_only=True`` (e.g. torchvision ImageNet weights).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torchvision import models as tvm

from ..errors import ConfigError
from ..real_stats import atomic_write, checksum
from .config import ARCHS

TEACHER_FORMAT = "unidd_fast.teacher/1"


class ConvNet(nn.Module):
    """(n, channels, s, s) float -> (n, num_classes) logits; s must be divisible by 2**depth."""

    def __init__(self, num_classes: int, channels: int = 3, width: int = 128, depth: int = 3, image_size: int = 32):
        super().__init__()
        if image_size % (2**depth) or image_size < 2**depth:
            raise ConfigError(f"convnet with depth {depth} needs an image side divisible by {2**depth}, got {image_size}")
        layers, c_in = [], channels
        for _ in range(depth):
            layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c_in = width
        self.features = nn.Sequential(*layers)
        side = image_size // 2**depth
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def build_model(arch: str, num_classes: int, image_size: int, channels: int = 3, width: int = 128,
                depth: int = 3) -> nn.Module:
    """A freshly initialised network (see module docstring)."""
    if arch == "convnet":
        return ConvNet(num_classes, channels, width, depth, image_size)
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {ARCHS}")
    model = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    if image_size <= 64:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def model_spec(arch: str, num_classes: int, image_size: int, channels: int, width: int, depth: int) -> dict:
    return dict(arch=arch, num_classes=int(num_classes), image_size=int(image_size), channels=int(channels),
                width=int(width), depth=int(depth))


def build_from_spec(spec: dict) -> nn.Module:
    return build_model(spec["arch"], spec["num_classes"], spec["image_size"], spec["channels"],
                       spec["width"], spec["depth"])


def save_teacher(path, model: nn.Module, spec: dict, extra: dict | None = None) -> None:
    """Write the weights (safetensors) with ``spec`` (from ``model_spec``) in the metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": TEACHER_FORMAT, "spec": json.dumps(spec), "extra": json.dumps(extra or {})}
    meta["sha256"] = checksum(tensors, meta)
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def weights_sha256(model: nn.Module) -> str:
    """sha256 of the model's state dict (names and bytes of every tensor, in name order)."""
    return checksum({k: v.detach() for k, v in model.state_dict().items()})


# Sane ranges of a teacher file's model spec (a damaged file must not allocate terabytes).
SPEC_RANGES = {"num_classes": (1, 100_000), "image_size": (1, 1024), "channels": (1, 3), "width": (1, 4096),
               "depth": (1, 16)}


def _parse_spec(path, raw) -> dict:
    """The model spec of a teacher file, checked against ARCHS and SPEC_RANGES."""
    try:
        spec = json.loads(raw)
        if not isinstance(spec, dict) or spec.get("arch") not in ARCHS:
            raise ValueError(f"expected an object with an arch in {ARCHS}")
        for key, (lo, hi) in SPEC_RANGES.items():
            if type(spec.get(key)) is not int or not lo <= spec[key] <= hi:
                raise ValueError(f"{key}={spec.get(key)!r} is not an integer in [{lo}, {hi}]")
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} has a damaged model spec ({exc}); rerun `unidd-fast squeeze`") from None
    return spec


def load_teacher(path, device="cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, spec) from a file written by ``save_teacher``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"teacher file {path} does not exist; train one with `unidd-fast squeeze`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path} is not a readable teacher file ({exc}); rerun `unidd-fast squeeze`") from exc
    if meta.get("format") != TEACHER_FORMAT:
        raise ConfigError(f"{path} is not a unidd_fast teacher (format {meta.get('format')!r}); to start from "
                          "a plain state dict use `unidd-fast squeeze --teacher-checkpoint FILE`")
    if checksum(state, {k: v for k, v in meta.items() if k != "sha256"}) != meta.get("sha256"):
        raise ConfigError(f"{path} fails its checksum (corrupted, or written by an older unidd-fast without one); "
                          "rerun `unidd-fast squeeze`")
    spec = _parse_spec(path, meta.get("spec"))
    model = build_from_spec(spec)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"{path}: its weights do not fit its model spec {spec} ({str(exc).splitlines()[0]}); "
                          "rerun `unidd-fast squeeze`") from None
    return model.to(device).eval(), spec


def load_checkpoint(model: nn.Module, path) -> None:
    """Load a state dict saved with ``torch.save`` (``weights_only=True``: no code runs).
    Accepts a bare state dict or one under "state_dict"/"model"; strips "module." prefixes."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--teacher-checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read {path} as a weights-only torch checkpoint ({exc}); save a state dict "
                          "with torch.save(model.state_dict(), path)") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"{path} does not hold a state dict (got {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"{path} does not fit a {type(model).__name__} with this configuration: {exc}. "
                          "Check --arch, the number of classes and data.image_size") from None
