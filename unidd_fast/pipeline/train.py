"""What squeeze and evaluate share: devices, optimisers, LR schedules, the epoch loop, top-1."""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError, NonFiniteError
from ..progress import progress
from .datasets import Batches


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {name!r}")
    return torch.device(name)


def setup_device(cfg) -> torch.device:
    """The run's device; also applies ``cfg.threads`` to torch's CPU thread pool."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    return resolve_device(cfg.device)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on ``device`` (augmentation draws on the batch's device)."""
    return torch.Generator(device=device).manual_seed(int(seed))


def kd_teacher(teacher: nn.Module) -> nn.Module:
    """``teacher`` in eval mode and in the contiguous (NCHW) layout that evaluate and relabel
    compute their KD targets in. A recover run in the same process leaves the teacher
    channels_last (``RecoverEngine``), whose CPU convolutions round differently: without this
    an evaluation's result would depend on what ran before it in the process."""
    return teacher.eval().to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with the global RNGs seeded and restored afterwards (for the weight
    initialisation of torchvision models, which draws from the global generator)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def make_optimizer(params, kind: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                   betas=(0.9, 0.999)) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {kind!r}; choose sgd, adam or adamw")


def lr_at(base: float, step: int, total: int, kind: str = "cosine", step_size: int = 0, gamma: float = 0.1) -> float:
    """Learning rate at ``step`` of ``total``: cosine from ``base`` to 0, or ×gamma every
    ``step_size`` steps."""
    if kind == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
    if kind == "step":
        return base * gamma ** (step // max(step_size, 1))
    raise ConfigError(f"unknown scheduler {kind!r}; choose cosine or step")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def fit(model: nn.Module, batches: Batches, epochs: int, optimizer: torch.optim.Optimizer,
        lr_fn: Callable[[int, int], float], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        desc: str, log: Callable[[str], None] | None = None, checkpoint=None) -> float:
    """Train ``model`` for ``epochs`` passes over ``batches``; ``loss_fn(x, y)`` gives the
    loss of a batch, ``lr_fn(step, total)`` the learning rate. Returns the last epoch's mean
    loss (read back once per epoch, so the steps themselves never wait for the device).

    ``checkpoint`` (an EpochCheckpoint): resume from it, and save into it after epochs.
    A non-finite epoch loss raises NonFiniteError (the last checkpoint is kept)."""
    model.train()
    total = epochs * len(batches)
    bare = getattr(model, "module", model)  # DistributedDataParallel's module
    start, step = checkpoint.load(bare, optimizer) if checkpoint is not None else (0, 0)
    mean_loss = float("nan")
    bar = progress(range(start, epochs), desc=desc, log=log, unit="epochs")
    for epoch in bar:
        if hasattr(batches, "set_epoch"):  # batches read per epoch from files (stored relabel targets)
            batches.set_epoch(epoch)
        running = torch.zeros((), device=batches.device)
        count = 0
        for x, y in progress(batches, desc=f"{desc} epoch {epoch + 1}", total=len(batches)):
            set_lr(optimizer, lr_fn(step, total))
            loss = loss_fn(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.detach()
            count += 1
            step += 1
        mean_loss = float(running) / max(count, 1)
        if not math.isfinite(mean_loss):
            raise NonFiniteError(f"{desc}: the training loss is {mean_loss} in epoch {epoch + 1}/{epochs} (NaN/Inf "
                                 "appeared in this epoch); lower the learning rate (--set ...lr=) and rerun")
        bar.set_postfix(loss=f"{mean_loss:.4f}")
        if log is not None and (epoch + 1 == epochs or (epoch + 1) % max(epochs // 5, 1) == 0):
            log(f"{desc}: epoch {epoch + 1}/{epochs} loss {mean_loss:.4f}")
        if checkpoint is not None and epoch + 1 < epochs:
            checkpoint.save(bare, optimizer, epoch + 1, step)
    return mean_loss


@torch.no_grad()
def accuracy(model: nn.Module, batches: Batches, desc: str = "test") -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` in eval mode over ``batches``."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=batches.device)
    seen = 0
    for x, y in progress(batches, desc=desc, total=len(batches)):
        correct += (model(x).argmax(1) == y).sum()
        seen += y.numel()
    model.train(was_training)
    return int(correct) / max(seen, 1)
