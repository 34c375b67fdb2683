"""Recover: synthesise the distilled set class-batch by class-batch (paper Algorithm 1).

Three layers, so that later work can reuse each one:

- ``recover_step`` (in ``step.py``): one iteration on one class-batch (augment → forward
  → CE + regulariser → backward → Adam step → clip to the valid pixel range). No host
  synchronisation, no hidden state: randomness comes from the ``generator`` argument.
- ``recover_class_batch``: fresh Adam (betas (0.5, 0.9)) and a cosine learning rate over
  ``iterations`` steps, starting from the given initial images (``step.RecoverEngine``:
  eager, or a CUDA graph replayed).
- ``recover_set``: the class-batches of one distilled set in order, ipc by ipc; sets β_t
  before each and folds it into the EMU (``next_batch``) after it, across the whole run;
  hands each finished class-batch to ``on_batch`` (which writes it at once).

A regulariser (``unidd_fast.regularizer.Regularizer``: CFMLoss, or BNMatchLoss for the SRe2L
baseline) is called as ``reg(targets)`` after ``model(x)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import distributed
from ..errors import ConfigError, NonFiniteError, NotPositiveDefiniteError
from ..loss import CFMLoss
from ..progress import progress
from ..real_stats import RealStats
from ..regularizer import Regularizer
from . import preflight, stepcheck
from .augment import Augment, make_augment
from .checkpoint import RecoverCheckpoint
from .checks import check_ipc, check_provenance, check_stats, check_teacher
from .config import Config, RecoverConfig
from .datasets import Data, dataset_fingerprint, prepare_data
from .distilled import INDEX_FILE, SetWriter, to_uint8
from .models import load_teacher, weights_sha256
from .rundir import RunDir
from .step import RecoverEngine, recover_step, resolve_options  # noqa: F401 (recover_step: public here too)
from .train import make_generator, setup_device

@dataclass(frozen=True)
class ClassBatch:
    """One class-batch: image number ``ipc_index`` of each class in ``classes`` (k,)."""

    index: int        # position in the run, 0-based (EMU's b − 1)
    ipc_index: int
    classes: torch.Tensor


def plan_class_batches(num_classes: int, ipc: int, batch_size: int) -> list[ClassBatch]:
    """Class-batches in run order: for each ipc index, the classes in chunks of ``batch_size``."""
    if ipc < 1 or batch_size < 1:
        raise ConfigError(f"ipc and recover.batch_size must be >= 1, got {ipc} and {batch_size}")
    chunks = torch.arange(num_classes).split(batch_size)
    return [ClassBatch(i * len(chunks) + k, i, chunk) for i in range(ipc) for k, chunk in enumerate(chunks)]


def curriculum(cb: ClassBatch, num_batches: int, ipc: int, beta_per: str) -> tuple[int, int]:
    """(t, T) of the β schedule: ipc index of ipc (release default) or class-batch of all."""
    return (cb.ipc_index, ipc) if beta_per == "ipc" else (cb.index, num_batches)


def pick_real(train_labels: torch.Tensor, num_classes: int, ipc: int, generator: torch.Generator) -> torch.Tensor:
    """(ipc, num_classes) indices of distinct random training images of each class."""
    picks = []
    for c in range(num_classes):
        members = torch.nonzero(train_labels == c).flatten()
        if members.numel() < ipc:
            raise ConfigError(f"class {c} has {members.numel()} training images, fewer than ipc={ipc}")
        picks.append(members[torch.randperm(members.numel(), generator=generator)[:ipc]])
    return torch.stack(picks, 1)


def make_regularizer(rc: RecoverConfig, model: nn.Module, stats: RealStats | None) -> Regularizer | None:
    """CFMLoss for loss="cfm", BNMatchLoss for "sre2l", None for "none"."""
    if rc.loss == "cfm":
        return CFMLoss(model, stats, beta=rc.beta, eta=rc.eta, signal=rc.signal, emu=rc.emu, sites=rc.sites,
                       filter=rc.filter, beta_min=rc.beta_min, backend=rc.backend, mtt_alpha=rc.mtt_alpha,
                       mtt_steps=rc.mtt_steps, mtt_steps_syn=rc.mtt_steps_syn or None)
    if rc.loss == "sre2l":
        from .sre2l_loss import BNMatchLoss

        return BNMatchLoss(model, rc.r_bn, rc.first_bn_multiplier)
    return None


def pixel_bounds(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi), each (1, C, 1, 1): the normalised values of pixel 0 and pixel 1."""
    mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return -mean / std, (1 - mean) / std


def step_case(model: nn.Module, stats: RealStats | None, rc: RecoverConfig, flip: bool, mean, std,
              image_shape: tuple, classes: int, device, seed: int = 0) -> stepcheck.Case:
    """The ``stepcheck.Case`` of a run: its teacher and regulariser (``make_regularizer``), a
    class-batch of ``classes`` random images (C, H, W) = ``image_shape`` (standard normal in
    the normalised space) toward classes 0..classes-1, the run's augmentation and pixel range."""
    init = torch.randn(classes, *image_shape, generator=make_generator(torch.device("cpu"), seed))
    lo, hi = pixel_bounds(mean, std, device)
    return stepcheck.Case(model, lambda: make_regularizer(rc, model, stats), rc,
                          make_augment("recover", rc.crop_min, rc.shift, flip, rc.jitter), init.to(device),
                          torch.arange(classes, device=device), lo, hi, seed)


def recover_class_batch(init: torch.Tensor, targets: torch.Tensor, model: nn.Module, regularizer,
                        rc: RecoverConfig, augment: Augment, generator: torch.Generator | None,
                        lo: torch.Tensor, hi: torch.Tensor, desc: str = "iterations", check_every: int | None = None):
    """Optimise one class-batch from ``init`` for ``rc.iterations`` steps of Adam with a
    cosine learning rate. Returns (images detached, last CE, last regulariser).

    Every step records on the device whether its loss and the updated images are finite;
    the record is read every ``check_every`` steps (default: every step on the CPU, where a
    read costs nothing, every step.CHECK_EVERY steps on a GPU, so steps never wait for the
    host; once per class-batch with CUDA graphs)
    and after the last. NonFiniteError names the first iteration that went wrong."""
    engine = RecoverEngine(model, regularizer, rc, augment, generator, lo, hi, resolve_options(rc, lo.device),
                           check_every=check_every)
    return engine.run(init, targets, desc)


def batch_seed(seed: int, index: int, stream: str = "augment") -> int:
    """Seed of class-batch ``index``'s own random stream: every class-batch draws from a
    stream of its own, so a resumed run, or one whose class-batches are dealt across ranks,
    replays the draws of an uninterrupted single-process run."""
    digest = hashlib.sha256(f"unidd-recover/{seed}/{index}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def recover_set(model: nn.Module, regularizer, plan: list[ClassBatch], init: Callable[[ClassBatch], torch.Tensor],
                rc: RecoverConfig, ipc: int, augment: Augment, generator: torch.Generator | None,
                lo: torch.Tensor, hi: torch.Tensor, on_batch: Callable, desc: str = "recover",
                seed: int | None = None, rounds: list | None = None, fold: Callable | None = None,
                log: Callable[[str], None] | None = None) -> None:
    """Recover class-batches of ``plan``; ``on_batch(cb, images, ce, reg)`` after each round.

    seed: reseed ``generator`` with ``batch_seed(seed, cb.index)`` before each class-batch.
    rounds: the class-batches this process runs, one per round, None for a round it sits out
      (torchrun: ``distributed.shard_rounds``); default every batch of ``plan`` in order.
    fold: called at the end of every round in place of ``regularizer.next_batch()``
      (torchrun: ``distributed.merge_emu``, a collective); on_batch then gets cb None for a
      round without a batch.
    log: progress lines with rate and ETA (progress.LOG_EVERY apart).
    NaN/Inf and non-positive-definite errors are re-raised naming the class-batch."""
    active = regularizer if rc.iterations > 0 else None
    if fold is None and active is not None:
        fold = active.next_batch
    device = lo.device
    engine = RecoverEngine(model, active, rc, augment, generator, lo, hi, resolve_options(rc, device))
    for cb in progress(plan if rounds is None else rounds, desc=desc, log=log, unit="rounds"):
        images = ce = reg = None
        if cb is not None:
            if seed is not None and generator is not None:
                generator.manual_seed(batch_seed(seed, cb.index))
            if active is not None:
                active.set_curriculum(*curriculum(cb, len(plan), ipc, rc.beta_per))
            targets = cb.classes.to(device)
            try:
                images, ce, reg = engine.run(init(cb).to(device), targets,
                                             desc=f"{desc} batch {cb.index + 1}/{len(plan)}")
            except (NonFiniteError, NotPositiveDefiniteError) as exc:
                classes = cb.classes.tolist()
                raise type(exc)(f"recover, class-batch {cb.index + 1}/{len(plan)} (ipc index {cb.ipc_index}, "
                                f"classes {classes[0]}..{classes[-1]}), {exc}") from exc
        if fold is not None:
            fold()
        on_batch(cb, images, ce, reg)


def init_kind(rc: RecoverConfig) -> str:
    """Where the images start: rc.init, or by default noise for sre2l and real images otherwise."""
    return rc.init or ("noise" if rc.loss == "sre2l" else "real")


def method_name(rc: RecoverConfig) -> str:
    init = init_kind(rc)
    if rc.loss == "none":
        return "random-real" if init == "real" else "noise"
    return rc.loss


def recover_one(cfg: Config, data: Data, model: nn.Module, stats: RealStats | None, root: Path, ipc: int,
                seed: int, device, log=None) -> dict:
    """Recover one distilled set (``ipc`` images per class, ``seed``) into ``root``.

    Resumable: ``checkpoints/`` holds the progress (RecoverCheckpoint), so a rerun skips the
    finished class-batches and continues with the EMU state they left; every class-batch
    draws from its own random stream (``batch_seed``), so the result is bit for bit that of
    an uninterrupted run on the CPU. Under torchrun the class-batches are dealt round-robin
    across ranks and the EMU is merged after every round (``distributed.merge_emu``)."""
    rc = cfg.recover
    if rc.loss == "none":  # the baseline is the initial images themselves
        rc = dataclasses.replace(rc, iterations=0)
    method = method_name(rc)
    record = {"method": method, "ipc": ipc, "seed": seed, "path": str(Path(root) / INDEX_FILE)}
    say = log or (lambda message: None)
    name = f"recover {method} ipc={ipc} seed={seed}"
    here = distributed.info()
    checkpoint = RecoverCheckpoint(Path(root) / "checkpoints", here.rank, here.world_size)
    if (Path(root) / INDEX_FILE).is_file():
        checkpoint.remove()  # left by a kill between writing the set and removing it
        say(f"{name}: already finished")
        return record
    plan = plan_class_batches(data.num_classes, ipc, rc.batch_size)
    if init_kind(rc) == "real":
        picks = pick_real(data.train_labels, data.num_classes, ipc, make_generator(torch.device("cpu"), seed))

        def init(cb):
            return data.train_images(picks[cb.ipc_index, cb.classes])
    else:
        def init(cb):
            noise = make_generator(torch.device("cpu"), batch_seed(seed, cb.index, "init"))
            return torch.randn(len(cb.classes), data.channels, data.image_size, data.image_size, generator=noise)

    writer = SetWriter(root, data.mean, data.std, rc.image_format)
    regularizer = make_regularizer(rc, model, stats)
    try:
        done, state, step = _resume(checkpoint, regularizer, writer, plan, device, name, say)
        remaining = plan[done:]
        rounds = [None if i is None else remaining[i]
                  for i in distributed.shard_rounds(len(remaining), here.rank, here.world_size)]
        finished = [done]

        def on_batch(cb, images, ce, reg):
            finished[0] = min(finished[0] + here.world_size, len(plan))
            pixels = None if cb is None else to_uint8(images, data.mean, data.std)
            checkpoint.save(finished[0], _state(regularizer), _step(regularizer),
                            None if cb is None else cb.index, pixels)
            if cb is not None:
                writer.write_pixels(cb, pixels)
                say(f"{name}: class-batch {cb.index + 1}/{len(plan)}" +
                    (f" ce {float(ce):.4f} reg {float(reg):.4f}" if rc.iterations > 0 else "") +
                    (f" (rank 0; class-batches ..{finished[0]} are finished)" if here.world_size > 1 else ""))

        merge = here.world_size > 1 and isinstance(regularizer, CFMLoss)
        fold = (lambda: distributed.merge_emu(regularizer)) if merge else None
        lo, hi = pixel_bounds(data.mean, data.std, device)
        augment = make_augment("recover", rc.crop_min, rc.shift, cfg.data.flip, rc.jitter)
        recover_set(model, regularizer, plan, init, rc, ipc, augment, make_generator(device, seed), lo, hi,
                    on_batch, desc=name, seed=seed, rounds=rounds, fold=fold, log=log)
    finally:
        if regularizer is not None:
            regularizer.remove()
    distributed.barrier()  # every rank's class-batches are on disk
    if here.is_main:
        writer.finish(plan, {"method": method, "ipc": ipc, "seed": seed, "num_classes": data.num_classes})
        checkpoint.remove()
    distributed.barrier()
    return record


def _state(regularizer: Regularizer | None) -> dict[str, torch.Tensor]:
    """The regulariser's run state (CFMLoss: the EMU), {} for one without (BN matching, none)."""
    return {} if regularizer is None else regularizer.state_dict()


def _step(regularizer: Regularizer | None) -> int:
    return 0 if regularizer is None else regularizer.step


def _resume(checkpoint: RecoverCheckpoint, regularizer, writer: SetWriter, plan: list[ClassBatch], device,
            name: str, say) -> tuple[int, dict, int]:
    """Restore the regulariser from the checkpoint, write the images of a class-batch the
    kill came before, and return (class-batches done, EMU state, step)."""
    done, state, step, pending = checkpoint.load(device)
    if not done:
        return 0, {}, 0
    if regularizer is not None:
        if state is not None:
            regularizer.load_state_dict(state)
        regularizer.step = step
    if checkpoint.rank == 0:  # the kill may have come before (some of) these images were written
        for index, pixels in pending:
            writer.write_pixels(plan[index], pixels)
    checkpoint.rebase(done, _state(regularizer), step)
    say(f"{name}: resuming after class-batch {done}/{len(plan)} (class-batches 1..{done} are on disk and are "
        "not recomputed)")
    return done, state or {}, step


def run(cfg: Config, out: RunDir, teacher_path, stats_path=None, allow_stats_mismatch: bool = False) -> dict:
    """Recover a distilled set per (ipc, seed) of the config. With one ipc and one seed the
    set is written into ``out`` itself, otherwise into ``out/ipc{ipc}_seed{seed}``.
    Rerun into the same ``out``, it resumes (see ``recover_one``). The statistics must have
    been collected with this teacher and data unless ``allow_stats_mismatch``."""
    device = setup_device(cfg)
    data = prepare_data(cfg)
    if cfg.recover.loss == "cfm" and not stats_path:
        raise ConfigError("recover --loss cfm needs real statistics: --from a stats run or --stats FILE")
    model, spec = load_teacher(teacher_path, device)
    check_teacher(spec, data)
    if init_kind(cfg.recover) == "real":
        check_ipc(data, cfg.ipc)
    model.requires_grad_(False)
    stats = None
    if cfg.recover.loss == "cfm":
        stats = RealStats.load(stats_path, device)
        check_stats(stats, data)
        if not allow_stats_mismatch:
            check_provenance(stats, stats_path, teacher_path, weights_sha256(model), dataset_fingerprint(cfg.data))
    inputs = {"teacher": teacher_path, "stats": stats_path if cfg.recover.loss == "cfm" else None}
    if (done := out.start("recover", cfg, inputs)) is not None:
        return done
    rc, fallbacks = cfg.recover, []
    image_shape, classes = (data.channels, data.image_size, data.image_size), min(rc.batch_size, data.num_classes)
    if rc.loss == "cfm":
        layout = torch.channels_last if rc.channels_last else torch.contiguous_format
        dtypes = preflight.feature_dtypes(resolve_options(rc, device).precision)
        backend, fallbacks = preflight.check_backends(model, image_shape, classes, device, rc.backend, rc.sites,
                                                      rc.strict, out.log, memory_format=layout, dtypes=dtypes)
        rc = dataclasses.replace(rc, backend=backend)
    if rc.loss != "none":
        case = step_case(model, stats, rc, cfg.data.flip, data.mean, data.std, image_shape, classes, device)
        rc, more = preflight.check_step_features(case, rc, rc.strict, out.log)
        fallbacks += more
    cfg = dataclasses.replace(cfg, recover=rc)
    many = len(cfg.ipc) * len(cfg.seeds) > 1
    sets = []
    for ipc in cfg.ipc:
        for seed in cfg.seeds:
            root = out.path / f"ipc{ipc}_seed{seed}" if many else out.path
            sets.append(recover_one(cfg, data, model, stats, root, ipc, seed, device, out.log))
            out.log(f"recover: wrote {sets[-1]['path']}")
    artifacts = {"teacher": str(teacher_path), "distilled": sets}
    if stats_path:
        artifacts["stats"] = str(stats_path)
    results = {"sets": sets, "artifacts": artifacts, "fallbacks": fallbacks}
    out.finish(results)
    return results
