"""Plan: what a configuration will cost, before any work is done.

For the resolved configuration (the same flags as distill/recover/evaluate): per stage
the optimiser steps, images, the bytes of every output, peak host and device memory, and
the time, twice:

- **measured here**: a few real steps (recover with its regulariser, stats forward, a
  training step) of a randomly initialised network of the configured architecture, at a
  probe batch no larger than the real one, scaled linearly to the real batch and count
  (on the CPU the process's CPU time, which a shared machine does not inflate);
- **H100 PREDICTION**: the roofline model of ``unidd_fast/roofline/`` for the real teacher
  and student (per-layer FLOPs and bytes against peak compute and bandwidth): recover is
  ``roofline.step.full_step`` (teacher forward + input backward at the run's precision,
  augmentation, Adam, the configured loss as the CUDA backends run it, launch gaps), the
  stats pass a forward with the Triton site statistics, squeeze and evaluate fp32 training
  steps; never measured.

Nothing reads the dataset: its shape comes from the config (class count, split sizes of
the known datasets), so ImageNet-1K can be planned on a laptop. Memory figures are
estimates from tensor sizes (weights, optimiser states, activations kept for backward,
statistics, the data loader's prefetched batches), each stage's at the dtype it runs in
(squeeze, stats, evaluate fp32; recover its precision), not measurements. Every layer shape
comes from one probe per network (``sites.module_calls``), shared by all the estimates.
"""
from __future__ import annotations

import dataclasses
import math
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import datasets as tvd

from ..errors import ConfigError
from ..real_stats import collect_real_stats
from ..roofline.hardware import ELEM
from ..roofline.step import STEP_OF_LOSS, full_step, stats_pass_seconds, step_totals, train_step_seconds
from ..sites import Call, module_calls, site_input_shapes
from .augment import make_augment
from .config import Config
from .datasets import resolve_workers
from .models import build_model
from .recover import make_regularizer, method_name, pixel_bounds
from .step import RecoverEngine, resolve_options
from .train import setup_device

# (classes, training images, test images) of the datasets whose size is fixed
KNOWN_SIZES = {"cifar10": (10, 50_000, 10_000), "cifar100": (100, 50_000, 10_000),
               "tiny-imagenet": (200, 100_000, 10_000), "imagenet": (1000, 1_281_167, 50_000)}
DIGITS = 1797
PROBE_PIXELS = 2 * 224 * 224  # probe batches hold at most this many pixels per channel (≥ 1 image)
STATS_BATCH = 256  # stats.run's batch size
PREFETCH = 2  # DataLoader batches in flight per worker


@dataclass(frozen=True)
class Shape:
    num_classes: int
    train: int
    test: int


def dataset_shape(cfg: Config) -> Shape:
    """Classes and split sizes: computed for digits, known for CIFAR/Tiny/ImageNet, counted
    for a folder dataset (which needs --data)."""
    name = cfg.data.dataset
    if name == "digits":
        test = math.ceil(cfg.data.test_size * DIGITS)
        return Shape(10, DIGITS - test, test)
    if name in KNOWN_SIZES:
        return Shape(*KNOWN_SIZES[name])
    root = Path(cfg.data.data).expanduser()
    if not (root / "train").is_dir():
        raise ConfigError(f"plan for --dataset {name} counts the images: give --data (a directory with train/ and "
                          "val/ or test/)")
    train = tvd.ImageFolder(str(root / "train"), loader=lambda p: p)
    split = root / ("val" if (root / "val").is_dir() else "test")
    test = len(tvd.ImageFolder(str(split), loader=lambda p: p)) if split.is_dir() else 0
    return Shape(len(train.classes), len(train), test)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _time(seconds: float) -> str:
    if 0 < seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _clock(device: torch.device):
    """The probe's clock: this process's CPU time on the CPU (steady on a shared machine;
    core-seconds, so several threads add up), wall time after a synchronise on CUDA."""
    if device.type == "cuda":
        def now():
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return now
    return time.process_time


def _timed(fn, clock, budget: float = 1.0, repeat: int = 3) -> float:
    """Median seconds of ``fn()`` after one warm-up call; fewer calls (at least one) once
    ``budget`` seconds are spent, so that a plan of a large network stays short."""
    fn()
    times = []
    while len(times) < repeat and (not times or sum(times) < budget):
        start = clock()
        fn()
        times.append(clock() - start)
    return sorted(times)[len(times) // 2]


class Probe:
    """Real steps of the configured networks on random images, on the run's device."""

    def __init__(self, cfg: Config, shape: Shape, device: torch.device):
        self.cfg, self.shape, self.device = cfg, shape, device
        d = cfg.data
        self.side, self.channels = d.image_size, d.channels
        self.batch = max(1, min(cfg.recover.batch_size, PROBE_PIXELS // (self.side * self.side)))
        self.gen = torch.Generator().manual_seed(0)
        self.clock = _clock(device)
        self.teacher = self._model(cfg.model.arch).to(device).eval().requires_grad_(False)
        self.student = self._model(cfg.evaluate.arch or cfg.model.arch).to(device)
        # the shape probe of each network at the run's input: every shape the estimates need
        self.calls = {m: module_calls(m, (self.channels, self.side, self.side)) for m in (self.teacher, self.student)}
        self.mean = tuple(d.mean) or (0.5,) * self.channels
        self.std = tuple(d.std) or (0.25,) * self.channels

    def _model(self, arch: str):
        m = self.cfg.model
        return build_model(arch, self.shape.num_classes, self.side, self.channels, m.width, m.depth)

    def images(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.channels, self.side, self.side, generator=self.gen).to(self.device)

    def labels(self, n: int) -> torch.Tensor:
        return (torch.arange(n) % self.shape.num_classes).to(self.device)

    def site_shapes(self) -> list[tuple]:
        """(d, h, w) of every site of the teacher."""
        shapes = site_input_shapes(self.teacher, self.cfg.recover.sites, (self.channels, self.side, self.side),
                                   self.calls[self.teacher])
        return list(shapes.values())

    def stats_step(self):
        """(seconds per image of the stats pass, the RealStats of a probe batch)."""
        x, y = self.images(self.batch), self.labels(self.batch)
        stats = collect_real_stats(self.teacher, [(x, y)], self.shape.num_classes, sites=self.cfg.recover.sites,
                                   device=self.device, show_progress=False)
        seconds = _timed(lambda: collect_real_stats(self.teacher, [(x, y)], self.shape.num_classes,
                                                    sites=self.cfg.recover.sites, device=self.device,
                                                    show_progress=False), self.clock)
        return seconds / self.batch, stats

    def recover_step(self, stats) -> tuple[float, int]:
        """(seconds per image and iteration of recover, bytes of the regulariser's EMU state)."""
        rc = dataclasses.replace(self.cfg.recover, iterations=2)
        reg = make_regularizer(rc, self.teacher, stats)
        try:
            lo, hi = pixel_bounds(self.mean, self.std, self.device)
            engine = RecoverEngine(self.teacher, reg, rc, make_augment("recover", rc.crop_min, rc.shift),
                                   torch.Generator(device=self.device).manual_seed(0), lo, hi,
                                   resolve_options(rc, self.device))
            x, y = self.images(self.batch), self.labels(self.batch)
            if reg is not None:
                reg.set_curriculum(0, 1)

            def run():
                engine.run(x, y)
                if reg is not None:
                    reg.next_batch()

            seconds = _timed(run, self.clock) / rc.iterations
            state = reg.state_dict() if hasattr(reg, "state_dict") else {}
            return seconds / self.batch, _tensor_bytes(state.values())
        finally:
            if reg is not None:
                reg.remove()

    def train_step(self, teacher_forward: bool) -> float:
        """Seconds per image of one training step of the student (and a teacher forward:
        evaluate's KD labels)."""
        model = self.student.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = self.images(self.batch)

        def step():
            target = self.teacher(x) if teacher_forward else None
            out = model(x)
            loss = out.logsumexp(1).mean() if target is None else (out - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        return _timed(step, self.clock) / self.batch


def _allocating_leaves(calls: list[Call]) -> list[Call]:
    """The leaf calls that write a new tensor: not an in-place layer (a ResNet's or the ConvNet's
    ReLU(inplace=True) overwrites its input; torchvision's residual ``out += identity`` is in
    place too and is no leaf)."""
    return [c for c in calls if c.leaf and not getattr(c.module, "inplace", False)]


def kept_activations(calls: list[Call], dtype: str) -> int:
    """Bytes per image of every tensor a network's layers write, in ``dtype`` ("bf16" | "fp32"):
    what a backward pass keeps. ``calls``: ``module_calls`` of the network."""
    return sum(math.prod(c.output) for c in _allocating_leaves(calls)) * ELEM[dtype]


def live_activations(calls: list[Call], dtype: str) -> int:
    """Bytes per image that a forward without autograd holds at once in ``dtype``: the largest
    input + output of a layer that writes a new tensor, and a residual identity as large as the
    largest output."""
    leaves = _allocating_leaves(calls)
    largest = max(math.prod(c.input) + math.prod(c.output) for c in leaves)
    return (largest + max(math.prod(c.output) for c in leaves)) * ELEM[dtype]


def optimizer_states(kind: str, momentum: float) -> int:
    """fp32 tensors per parameter that ``train.make_optimizer`` keeps: two moments for Adam and
    AdamW, a momentum buffer for SGD with momentum > 0."""
    return 2 if kind in ("adam", "adamw") else int(momentum > 0)


def h100_recover_step(cfg: Config, teacher, num_classes: int, calls: list[Call] | None = None) -> float:
    """PREDICTION: seconds of one recover step of ``teacher`` on an H100 — the total of
    ``roofline.step.full_step`` for the configured loss (``STEP_OF_LOSS``) at a class-batch
    of min(batch_size, classes) images, the precision and CUDA-graph mode ``recover`` resolves
    on CUDA, and the loss's sites (the BatchNorm inputs for SRe2L). ``calls``: the teacher's
    ``module_calls`` at the configured input, probed here when not given."""
    rc, d = cfg.recover, cfg.data
    options = resolve_options(rc, torch.device("cuda"))
    calls = calls if calls is not None else module_calls(teacher, (d.channels, d.image_size, d.image_size))
    sites = site_input_shapes(teacher, "bn" if rc.loss == "sre2l" else rc.sites, (d.channels, d.image_size, d.image_size),
                              calls)
    rows = full_step(teacher, sites, min(rc.batch_size, num_classes), options.precision, d.image_size, d.channels,
                     num_classes, options.cuda_graphs, cfg.model.arch, calls)
    return step_totals(rows, cfg.model.arch)[STEP_OF_LOSS[rc.loss]] * 1e-6


def run(cfg: Config, world: int = 1, teacher_checkpoint: bool = False) -> str:
    """The plan as text (see the module docstring); ``world``: torchrun processes (GPUs)
    that recover, stats and evaluate are spread over."""
    shape = dataset_shape(cfg)
    device = setup_device(cfg)  # and the configured CPU threads: the probe runs as the stages would
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.random.fork_rng():
        torch.manual_seed(0)
        probe = Probe(cfg, shape, device)
    d, rc, ev, sq = cfg.data, cfg.recover, cfg.evaluate, cfg.squeeze
    pixels = d.channels * d.image_size * d.image_size
    options = resolve_options(rc, torch.device("cuda"))  # what recover runs on a GPU
    dtype = options.precision
    sites = probe.site_shapes()
    workers = resolve_workers(d.workers)
    t_stats, stats = probe.stats_step()
    t_recover, emu_bytes = probe.recover_step(stats if rc.loss == "cfm" else None)
    t_squeeze = probe.train_step(teacher_forward=False)
    t_eval = probe.train_step(teacher_forward=True)
    with tempfile.TemporaryDirectory() as tmp:
        stats.save(Path(tmp) / "stats.safetensors")
        stats_bytes = (Path(tmp) / "stats.safetensors").stat().st_size
    teacher_bytes = _tensor_bytes(probe.teacher.state_dict().values())  # weights and BatchNorm buffers, fp32
    student_bytes = _tensor_bytes(probe.student.state_dict().values())
    teacher_params = _tensor_bytes(probe.teacher.parameters())
    student_params = _tensor_bytes(probe.student.parameters())
    calls_t, calls_s = probe.calls[probe.teacher], probe.calls[probe.student]
    # squeeze, stats and evaluate run in fp32 without autocast (TF32 tensor cores); recover at its precision
    act_train_teacher = kept_activations(calls_t, "fp32")  # squeeze trains the teacher
    act_train_student = kept_activations(calls_s, "fp32")  # evaluate trains the student
    act_forward_teacher = live_activations(calls_t, "fp32")  # stats' and evaluate's teacher: no autograd
    act_recover = kept_activations(calls_t, dtype)  # recover's input backward

    def train_s(model, batch: int) -> float:
        return train_step_seconds(model, batch, "fp32", d.image_size, d.channels, probe.calls[model])

    def forward_s(batch: int, with_sites: bool = False) -> float:
        return stats_pass_seconds(probe.teacher, sites if with_sites else (), batch, "fp32", d.image_size, d.channels,
                                  calls_t)

    k = min(rc.batch_size, shape.num_classes)
    rows = []
    here = f"CPU time, {torch.get_num_threads()} threads" if device.type == "cpu" else str(device)

    # squeeze
    epochs = 0 if teacher_checkpoint and sq.epochs == 0 else sq.epochs
    steps = epochs * (shape.train // sq.batch_size)
    loader_host = workers * PREFETCH * sq.batch_size * pixels * 4
    rows.append(dict(stage="squeeze", steps=steps, images=epochs * shape.train,
                     outputs={"teacher.safetensors": teacher_bytes, "checkpoints/squeeze.pt": 3 * teacher_bytes},
                     # weights, gradients, optimiser states; per image its activations, the batch and its augmented copy
                     device=teacher_bytes + (1 + optimizer_states(sq.optimizer, sq.momentum)) * teacher_params
                     + sq.batch_size * (act_train_teacher + 2 * pixels * 4),
                     host=base_rss + loader_host,
                     here=epochs * shape.train * t_squeeze,
                     h100=steps * train_s(probe.teacher, sq.batch_size)))
    # stats
    batches = math.ceil(shape.train / STATS_BATCH)
    rows.append(dict(stage="stats", steps=batches, images=shape.train,
                     outputs={"stats.safetensors": stats_bytes, "checkpoints/stats.safetensors": 2 * stats_bytes},
                     # the float64 moments and one batch's (the file's size each), every site's fp32 batch
                     # covariance and pooled features until the forward ends, the forward, the batch
                     device=teacher_bytes + 2 * stats_bytes + sum(4 * w * (w + STATS_BATCH) for w, _, _ in sites)
                     + STATS_BATCH * (act_forward_teacher + pixels * 4),
                     host=base_rss + 2 * stats_bytes + workers * PREFETCH * STATS_BATCH * pixels * 4,
                     here=shape.train * t_stats / world,
                     h100=batches * forward_s(STATS_BATCH, True) / world))
    # recover: one set per (ipc, seed)
    sets = [(ipc, seed) for ipc in cfg.ipc for seed in cfg.seeds]
    per_set = {ipc: math.ceil(shape.num_classes / rc.batch_size) * ipc for ipc in cfg.ipc}
    class_batches = sum(per_set[ipc] for ipc, _ in sets)
    steps_per_batch = 0 if rc.loss == "none" else rc.iterations  # "none" recovers nothing: its images are the init
    iterations = class_batches * steps_per_batch
    t_step = h100_recover_step(cfg, probe.teacher, shape.num_classes, calls_t)
    total_images = sum(ipc * shape.num_classes for ipc, _ in sets)
    set_bytes = {f"{method_name(rc)} ipc={ipc}: images ({rc.image_format}, ≈ raw uint8)": ipc * shape.num_classes
                 * pixels for ipc in cfg.ipc}
    rounds = sum(math.ceil(per_set[ipc] / world) for ipc, _ in sets)
    reg_device = 3 * stats_bytes if rc.loss == "cfm" else 0  # statistics + the cached real side
    rows.append(dict(stage="recover", steps=iterations, images=total_images,
                     outputs=dict(set_bytes, **{"checkpoints/recover_rank*.safetensors (while running)":
                                                world * (emu_bytes + k * pixels)}),
                     # + the bf16 weight copies autocast makes, kept for the input backward
                     device=teacher_bytes + reg_device + emu_bytes + k * (act_recover + 6 * pixels * 4)
                     + (teacher_params // 2 if dtype == "bf16" else 0),
                     host=base_rss + stats_bytes + teacher_bytes + k * pixels * (4 + 1) + emu_bytes,
                     here=rounds * steps_per_batch * k * t_recover,
                     h100=rounds * steps_per_batch * t_step,
                     note=f"{class_batches} class-batches of {k} images × {steps_per_batch} iterations; H100 PREDICTION "
                          f"{_time(t_step)} per step"))
    # evaluate: a student per set
    ev_steps = sum(ev.epochs * math.ceil(ipc * shape.num_classes / ev.batch_size) for ipc, _ in sets)
    ev_images = sum(ev.epochs * ipc * shape.num_classes for ipc, _ in sets)
    local = math.ceil(ev.batch_size / world)
    rows.append(dict(stage="evaluate", steps=ev_steps, images=ev_images,
                     outputs={"checkpoints/evaluate/set*.pt (while running)": 3 * student_params},
                     # student weights, gradients, optimiser states; the KD teacher; per image the student's
                     # activations, the teacher's forward, the batch, its augmented and CutMixed copies
                     device=student_bytes + (1 + optimizer_states(ev.optimizer, ev.momentum)) * student_params
                     + teacher_bytes + local * (act_train_student + act_forward_teacher + 3 * pixels * 4),
                     host=base_rss + workers * PREFETCH * local * pixels * 4,
                     here=ev_images * t_eval / world + len(sets) * shape.test * t_stats,
                     h100=ev_steps * (train_s(probe.student, local) + forward_s(local))))
    lines = [f"plan: {d.dataset} ({shape.num_classes} classes, {shape.train} train / {shape.test} test images, "
             f"{d.channels}×{d.image_size}×{d.image_size}), teacher {cfg.model.arch}, student "
             f"{ev.arch or cfg.model.arch}, ipc {cfg.ipc}, seeds {cfg.seeds}, {world} process(es)",
             f"recover: {rc.loss}, class-batches of {rc.batch_size} classes, {rc.iterations} iterations, "
             f"precision {dtype} on CUDA; data workers {workers} per process",
             f"measured here ({here}): probe batch {probe.batch}, {1e3 * t_recover:.1f} ms per image-iteration of "
             f"recover, {1e3 * t_stats:.1f} ms per image of stats, {1e3 * t_eval:.1f} ms per image-step of evaluate",
             "",
             f"{'stage':<9} {'steps':>10} {'images':>13} {'peak host':>10} {'peak device':>12} {'time here':>10} "
             f"{'H100 PREDICTION':>16}"]
    for r in rows:
        lines.append(f"{r['stage']:<9} {r['steps']:>10} {r['images']:>13} {_bytes(r['host']):>10} "
                     f"{_bytes(r['device']):>12} {_time(r['here']):>10} {_time(r['h100']):>16}")
    lines.append(f"{'total':<9} {'':>10} {'':>13} {'':>10} {'':>12} {_time(sum(r['here'] for r in rows)):>10} "
                 f"{_time(sum(r['h100'] for r in rows)):>16}")
    lines += ["", "outputs:"]
    for r in rows:
        for name, size in r["outputs"].items():
            lines.append(f"  {r['stage']:<9} {name:<58} {_bytes(size):>10}")
        if "note" in r:
            lines.append(f"  {r['stage']:<9} {r['note']}")
    graphs = "CUDA graphs" if options.cuda_graphs else "no CUDA graphs"
    lines += ["", "time here: probe steps scaled linearly in images (CPU time on a CPU). H100: roofline PREDICTION "
              f"(unidd_fast/roofline/: recover = the full step of step.py, {dtype}, {rc.loss} loss, {graphs}; squeeze, "
              "stats, evaluate fp32 on TF32 tensor cores; per-layer max(FLOPs/peak, bytes/bandwidth) + launch gaps), "
              "not measured. Memory: estimates from tensor sizes per process (peak device: tensors on the run's "
              "device, host memory too on a CPU run)."]
    return "\n".join(lines)
