"""Run configuration: per-dataset defaults (paper appendix Tables 2-4), overrides, JSON.

A ``Config`` is a tree of dataclasses. Every field can be overridden from the command line
with ``--set section.field=value`` (e.g. ``--set recover.lr=0.1``); the resolved config is
written as ``config.json`` into every run directory, and ``--from DIR`` starts from it.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..filters import LOSS_FILTERS
from ..loss import SIGNALS
from ..real_stats import atomic_write
from .datasets import READERS
from .step import GRAPH_MODES, PRECISIONS

DATASETS = tuple(READERS)
ARCHS = ("resnet18", "resnet50", "resnet101", "convnet")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    dataset: str = "digits"
    data: str = ""              # path of the dataset root (unused for digits and shapes)
    image_size: int = 32        # side of the square images the teacher sees
    channels: int = 3
    mean: tuple = ()            # per-channel normalisation; () = computed from the data (digits, shapes)
    std: tuple = ()
    flip: bool = True           # horizontal flips in every augmentation (off where a mirror changes the label)
    resize_ratio: float = 1.0   # ImageFolder: resize the short side to image_size·ratio, centre crop
    test_size: float = 0.25     # digits: fraction held out (stratified) as the test set
    split_seed: int = 0         # digits: the split's seed; shapes: the generator's
    workers: int = -1           # DataLoader workers for image files; -1: the cores (capped at 16)


@dataclass
class ModelConfig:
    arch: str = "resnet18"      # teacher (and default student) architecture
    width: int = 128            # convnet channels
    depth: int = 3              # convnet blocks


@dataclass
class SqueezeConfig:
    epochs: int = 200
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    scheduler: str = "cosine"   # cosine | step
    step_epochs: int = 30       # step scheduler: ×0.1 every step_epochs
    augment: str = "crop"       # crop: shift + flip; rrc: random resized crop + flip
    crop_min: float = 0.08      # rrc: smallest crop area fraction


@dataclass
class RecoverConfig:
    loss: str = "cfm"           # cfm | sre2l | none (init only: the random-real baseline)
    init: str = ""              # real | noise; "" = real for cfm/none, noise for sre2l
    iterations: int = 1000
    lr: float = 0.25
    betas: tuple = (0.5, 0.9)
    batch_size: int = 10        # classes per class-batch (one image each)
    beta: float = 0.1
    beta_min: float = 1e-6
    beta_per: str = "ipc"       # ipc: t = ipc index (release); batch: t = class-batch index (paper)
    eta: float = 0.1
    signal: str = "class"
    sites: str = "bn"
    filter: str = "cfm"         # cfm | krr | dc (paper Table 1) | lfm (release) | allpass | mtt
    mtt_alpha: float = 0.01     # mtt filter: α of (I − αΨ)^P, also the weight of the signal term (Table 1)
    mtt_steps: int = 10         # mtt filter: P, steps on the real side
    mtt_steps_syn: int = 0      # mtt filter: Q, steps on the synthetic side; 0 = P
    emu: bool = True
    r_bn: float = 0.01          # sre2l: weight of the BN matching term
    first_bn_multiplier: float = 10.0
    crop_min: float = 0.08      # augmentation of the synthetic batch: smallest crop area fraction
    shift: float = 0.0          # ... largest translation, fraction of the image side (zero fill; digits: 0.125)
    jitter: int = 0             # ... then roll the batch by 0..jitter px (wrap-around; the release: 4)
    image_format: str = "png"   # png (lossless) | jpg
    backend: str = "auto"
    precision: str = "auto"     # teacher forward/backward: fp32 | bf16 autocast; auto = bf16 on CUDA, fp32 on CPU
    cuda_graphs: str = "auto"   # capture the step once per class-batch shape, then replay: auto (on for CUDA) | on | off
    compile: bool = False       # torch.compile the teacher's forward
    channels_last: bool = True  # teacher and images in channels_last (the site statistics read rows as views)
    strict: bool = False        # a backend or step feature failing the pre-flight check is an error, not a fallback


@dataclass
class EvalConfig:
    epochs: int = 1000
    optimizer: str = "adamw"    # adamw | sgd
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    temperature: float = 30.0
    kd_t2: bool = False         # multiply the KD loss by T² (Hinton); SRe2L and the release do not
    label_topk: int = 0         # relabel: teacher logits kept per augmented image (0: all classes)
    cutmix: float = 0.0         # probability of CutMix per batch
    augment: str = "crop"
    crop_min: float = 0.08
    arch: str = ""              # student architecture; "" = the teacher's


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    recipe: str = "ours"        # ours | paper | release: presets of the recipe table (README)
    ipc: list = field(default_factory=lambda: [10])
    seeds: list = field(default_factory=lambda: [0])
    device: str = "auto"
    threads: int = 0            # CPU threads of torch; 0 = torch's default. Small models run
                                # fastest on one thread, and far faster when cores are shared.
    checkpoint_every: float = 300.0  # seconds between epoch checkpoints of squeeze/evaluate
                                     # (0: every epoch); recover checkpoints every class-batch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, path) -> None:
        text = json.dumps(self.to_dict(), indent=2)
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text + "\n"))


# Paper appendix: Table 2 (squeeze), Table 3 (recover), Table 4 (validation). Digits and
# shapes are ours: sized so that `unidd-fast distill` runs on two CPU cores in minutes.
_CIFAR_SQUEEZE = dict(epochs=200, lr=0.1, weight_decay=5e-4, batch_size=128, scheduler="cosine", augment="crop")
_CIFAR_RECOVER = dict(beta=0.1, iterations=1000, lr=0.25, batch_size=10)  # RRC (0.08, 1) + flip: Table 3, the release
_TINY = {
    "data": dict(image_size=64, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "squeeze": dict(epochs=50, lr=0.2, weight_decay=1e-4, batch_size=256, scheduler="cosine", augment="rrc"),
    "recover": dict(beta=1.0, iterations=1000, lr=0.1, batch_size=200),
    "evaluate": dict(epochs=100, optimizer="sgd", lr=0.2, momentum=0.9, weight_decay=1e-4, batch_size=64,
                     temperature=20.0, augment="rrc"),
}
_DIGITS = {
    "data": dict(image_size=16, channels=1, flip=False),
    "model": dict(arch="convnet", width=32, depth=3),
    "squeeze": dict(epochs=15, optimizer="sgd", lr=0.05, weight_decay=5e-4, batch_size=64,
                    scheduler="cosine", augment="crop"),
    "recover": dict(beta=0.1, iterations=1000, lr=0.25, batch_size=10, crop_min=0.5, shift=0.125),
    "evaluate": dict(epochs=300, optimizer="adamw", lr=3e-3, weight_decay=5e-4, batch_size=50,
                     temperature=20.0, augment="crop"),
    "ipc": [1, 10],
    "seeds": [0, 1],
    "device": "cpu",
    "threads": 1,
}
DEFAULTS: dict[str, dict] = {
    "digits": _DIGITS,
    # the digits recipe on RGB shapes (flips keep the class), with a longer teacher training
    "shapes": dict(_DIGITS, data=dict(image_size=16, channels=3, flip=True),
                   squeeze=dict(_DIGITS["squeeze"], epochs=60)),
    "cifar10": {
        "data": dict(image_size=32, channels=3, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
        "squeeze": _CIFAR_SQUEEZE,
        "recover": _CIFAR_RECOVER,
        "evaluate": dict(epochs=1000, optimizer="adamw", lr=1e-3, weight_decay=5e-4, batch_size=64,
                         temperature=30.0, augment="crop"),
    },
    "cifar100": {
        "data": dict(image_size=32, channels=3, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
        "squeeze": dict(_CIFAR_SQUEEZE, epochs=100),
        "recover": dict(_CIFAR_RECOVER, batch_size=100),
        "evaluate": dict(epochs=1000, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=64,
                         temperature=30.0, augment="crop"),
    },
    "tiny-imagenet": _TINY,
    "imagenet": {
        "data": dict(image_size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_ratio=256 / 224),
        "squeeze": dict(epochs=90, lr=0.1, weight_decay=1e-4, batch_size=256, scheduler="step", step_epochs=30,
                        augment="rrc"),
        "recover": dict(beta=0.1, iterations=1000, lr=0.1, batch_size=500),
        "evaluate": dict(epochs=300, optimizer="adamw", lr=1e-3, weight_decay=1e-4, batch_size=128,
                         temperature=20.0, augment="rrc"),
    },
    "folder": dict(_TINY, recover=dict(_TINY["recover"], batch_size=100)),  # Tiny-ImageNet's recipe at 64 px
}

CHOICES = {
    "data.dataset": DATASETS,
    "model.arch": ARCHS,
    "squeeze.optimizer": ("sgd", "adamw"),
    "squeeze.scheduler": ("cosine", "step"),
    "squeeze.augment": ("crop", "rrc"),
    "recover.loss": ("cfm", "sre2l", "none"),
    "recover.init": ("", "real", "noise"),
    "recover.beta_per": ("ipc", "batch"),
    "recover.signal": SIGNALS,
    "recover.filter": tuple(LOSS_FILTERS),
    "recipe": ("ours", "paper", "release"),
    "recover.image_format": ("png", "jpg"),
    "recover.precision": PRECISIONS,
    "recover.cuda_graphs": GRAPH_MODES,
    "evaluate.optimizer": ("adamw", "adam", "sgd"),
    "evaluate.augment": ("crop", "rrc"),
    "evaluate.arch": ("",) + ARCHS,
    "device": ("auto", "cpu", "cuda"),
}


def keys(cfg: Config | None = None) -> list[str]:
    """Every overridable key, ``section.field`` or a top-level name."""
    cfg = cfg or Config()
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += [f"{f.name}.{g.name}" for g in dataclasses.fields(value)]
        else:
            out.append(f.name)
    return out


def _coerce(key: str, template, value):
    """Convert ``value`` (a string from the command line, or a JSON value) to the type of
    ``template`` (the field's current value)."""
    try:
        if isinstance(template, bool):
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if isinstance(template, int):
            return int(value)
        if isinstance(template, float):
            return float(value)
        if isinstance(template, (tuple, list)):
            items = value.split(",") if isinstance(value, str) else list(value)
            items = [s for s in items if s != ""]
            kind = float if key.endswith(("mean", "std", "betas")) else int
            out = [kind(s) for s in items]
            return tuple(out) if isinstance(template, tuple) else out
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: expected a value like {template!r}") from None


def set_value(cfg: Config, key: str, value) -> None:
    """Set ``section.field`` (or a top-level field) from a string or JSON value, type-checked."""
    if key not in keys(cfg):
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(keys(cfg))}")
    owner, name = (cfg, key) if "." not in key else (getattr(cfg, key.split(".")[0]), key.split(".")[1])
    new = _coerce(key, getattr(owner, name), value)
    if key in CHOICES and new not in CHOICES[key]:
        raise ConfigError(f"{key}={new!r}: choose one of {CHOICES[key]}")
    setattr(owner, name, new)


# The recipe presets: what `--recipe paper|release` sets on top of the dataset's defaults
# (README, "Recipe: ours, the paper, the release"). Paper: Alg. 1 and Tables 1, 3, 4.
# Release: synthesis_{small,large}.py with its README's flags, generate_soft_label_online.py.
RECIPES: dict[str, dict] = {
    "ours": {},
    "paper": {"recover": dict(beta_per="batch", shift=0.0, jitter=0, crop_min=0.08),
              "evaluate": dict(cutmix=0.0, kd_t2=False)},
    "release": {"recover": dict(sites="conv", signal="mean", emu=False, beta_per="ipc", shift=0.0, jitter=4,
                                crop_min=0.08),
                "evaluate": dict(optimizer="adamw", lr=1e-3, weight_decay=1e-2, temperature=20.0, cutmix=1.0,
                                 kd_t2=False, augment="rrc", crop_min=0.08)},
}
# Per dataset, where the preset depends on it: Table 4's optimiser (paper); the release's
# epochs and crop scale of generate_soft_label_online.py.
RECIPE_DATASETS: dict[tuple, dict] = {
    ("paper", "cifar10"): {"evaluate": dict(optimizer="adam")},
    ("paper", "imagenet"): {"evaluate": dict(optimizer="adam")},
    ("release", "cifar10"): {"evaluate": dict(epochs=1000)},
    ("release", "cifar100"): {"evaluate": dict(epochs=1000)},
    ("release", "tiny-imagenet"): {"evaluate": dict(epochs=300, crop_min=0.5)},
    ("release", "imagenet"): {"evaluate": dict(epochs=300, crop_min=0.5)},
}


def _apply(cfg: Config, preset: dict) -> None:
    for section, values in preset.items():
        if isinstance(values, dict):
            for name, value in values.items():
                set_value(cfg, f"{section}.{name}", value)
        else:
            set_value(cfg, section, values)


def defaults(dataset: str, recipe: str = "ours") -> Config:
    """The configuration of ``dataset`` under ``recipe`` (RECIPES) before any override."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {tuple(RECIPES)}")
    cfg = Config()
    cfg.data.dataset = dataset
    _apply(cfg, DEFAULTS[dataset])
    _apply(cfg, RECIPES[recipe])
    _apply(cfg, RECIPE_DATASETS.get((recipe, dataset), {}))
    cfg.recipe = recipe
    return cfg


def from_dict(raw: dict) -> Config:
    """Rebuild a Config from ``to_dict()`` output (a config.json), starting from the
    dataset's defaults so that keys added since the file was written get their default."""
    cfg = defaults(raw.get("data", {}).get("dataset", "digits"))
    for key in keys(cfg):
        section, _, name = key.partition(".")
        source = raw.get(section, {}) if name else raw
        field_name = name or section
        if isinstance(source, dict) and field_name in source:
            set_value(cfg, key, source[field_name])
    return cfg


def load(path) -> Config:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: --from expects a run directory written by unidd-fast") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); rerun the stage that wrote it") from None
    return from_dict(raw)


# What every value must satisfy: (test, what to give instead). Checked before any work.
def _positive(v):
    return math.isfinite(v) and v > 0


def _non_negative(v):
    return math.isfinite(v) and v >= 0


def _fraction(v):
    return 0 < v <= 1


def _momentum(v):
    return 0 <= v < 1


RULES: dict[str, tuple] = {
    "ipc": (lambda v: len(v) > 0 and min(v) >= 1 and len(set(v)) == len(v),
            "one or more distinct integers >= 1 (e.g. --ipc 1,10)"),
    "seeds": (lambda v: len(v) > 0 and min(v) >= 0 and max(v) < 2**63 and len(set(v)) == len(v),
              "one or more distinct integers >= 0 and < 2**63 (e.g. --seeds 0,1)"),
    "threads": (_non_negative, "a thread count >= 0 (0: torch's default)"),
    "checkpoint_every": (_non_negative, "seconds >= 0 between checkpoints (0: every epoch)"),
    "data.image_size": (lambda v: 1 <= v <= 1024, "an image side >= 1 and <= 1024 pixels"),
    "data.channels": (lambda v: v in (1, 3), "1 (grey) or 3 (RGB)"),
    "data.mean": (lambda v: all(math.isfinite(m) for m in v), "finite means"),
    "data.std": (lambda v: all(math.isfinite(s) and s > 0 for s in v), "finite standard deviations > 0"),
    "data.resize_ratio": (lambda v: v >= 1, "a ratio >= 1 (resize the short side to image_size·ratio, then crop)"),
    "data.test_size": (lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    "data.split_seed": (lambda v: 0 <= v < 2**32, "a seed in [0, 2**32)"),
    "data.workers": (lambda v: -1 <= v <= 64, "a worker count >= 0 and <= 64, or -1 for the machine's cores"),
    "model.width": (lambda v: 1 <= v <= 4096, "a channel count >= 1 and <= 4096"),
    "model.depth": (lambda v: 1 <= v <= 16, "a block count >= 1 and <= 16"),
    "squeeze.epochs": (_non_negative, "an epoch count >= 0"),
    "squeeze.lr": (_positive, "a learning rate > 0"),
    "squeeze.momentum": (_momentum, "a momentum in [0, 1)"),
    "squeeze.weight_decay": (_non_negative, "a weight decay >= 0"),
    "squeeze.batch_size": (_positive, "a batch size >= 1"),
    "squeeze.step_epochs": (_positive, "an epoch count >= 1"),
    "squeeze.crop_min": (_fraction, "an area fraction in (0, 1]"),
    "recover.iterations": (lambda v: 0 <= v <= 10**7, "an iteration count >= 0 and <= 10000000"),
    "recover.lr": (_positive, "a learning rate > 0"),
    "recover.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two Adam betas in [0, 1), e.g. 0.5,0.9"),
    "recover.batch_size": (_positive, "a class count >= 1 per class-batch"),
    "recover.beta": (_positive, "a regularisation β > 0 (the paper uses 0.1 or 1)"),
    "recover.beta_min": (_positive, "a floor β_min > 0 for the β curriculum"),
    "recover.eta": (_non_negative, "a loss weight η >= 0"),
    "recover.r_bn": (_non_negative, "a BN-matching weight >= 0"),
    "recover.first_bn_multiplier": (_non_negative, "a multiplier >= 0"),
    "recover.crop_min": (_fraction, "an area fraction in (0, 1]"),
    "recover.shift": (lambda v: 0 <= v <= 0.5, "a fraction of the image side in [0, 0.5]"),
    "recover.jitter": (_non_negative, "a roll of >= 0 pixels"),
    "recover.mtt_alpha": (_positive, "an MTT step size α > 0"),
    "recover.mtt_steps": (_positive, "a step count P >= 1"),
    "recover.mtt_steps_syn": (_non_negative, "a step count Q >= 1, or 0 for Q = P"),
    "evaluate.epochs": (_non_negative, "an epoch count >= 0"),
    "evaluate.lr": (_positive, "a learning rate > 0"),
    "evaluate.momentum": (_momentum, "a momentum in [0, 1)"),
    "evaluate.weight_decay": (_non_negative, "a weight decay >= 0"),
    "evaluate.batch_size": (_positive, "a batch size >= 1"),
    "evaluate.temperature": (_positive, "a KD temperature > 0"),
    "evaluate.cutmix": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "evaluate.crop_min": (_fraction, "an area fraction in (0, 1]"),
    "evaluate.label_topk": (_non_negative, "a top-k >= 1, or 0 for all classes"),
}
FLAGS = {"ipc": "--ipc", "seeds": "--seeds", "recover.iterations": "--iterations"}


def get_value(cfg: Config, key: str):
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name) if name else getattr(cfg, section)


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first value out of its valid range (RULES), and for
    combinations that cannot work, saying what to change."""
    for key, (ok, wanted) in RULES.items():
        value = get_value(cfg, key)
        if not ok(value):
            shown = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value
            how = f"{FLAGS[key]} or --set {key}=..." if key in FLAGS else f"--set {key}=..."
            raise ConfigError(f"{key}={shown} is invalid: expected {wanted}; change it with {how}")
    data, model = cfg.data, cfg.model
    if data.mean and len(data.mean) != data.channels or data.std and len(data.std) != data.channels:
        raise ConfigError(f"data.mean/data.std need {data.channels} values (one per channel), got {data.mean} / "
                          f"{data.std}: --set data.mean=...,... --set data.std=...,...")
    if cfg.recover.cuda_graphs == "on" and cfg.device == "cpu":
        raise ConfigError("--cuda-graphs on needs a CUDA device, the run is on cpu; use --cuda-graphs off "
                          "(or auto) or --device cuda")
    archs = {model.arch, cfg.evaluate.arch or model.arch}
    if "convnet" in archs and data.image_size % 2**model.depth:
        raise ConfigError(f"convnet with model.depth={model.depth} halves the image {model.depth} times: "
                          f"data.image_size={data.image_size} must be a multiple of {2**model.depth} "
                          "(change data.image_size or model.depth)")


def parse_assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value (e.g. recover.lr=0.1), got {text!r}")
    return key.strip(), value.strip()

