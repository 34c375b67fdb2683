"""Squeeze: train the teacher on the real training set (paper appendix Table 2).
Resumable: an epoch checkpoint in ``checkpoints/squeeze.pt`` while training runs."""
from __future__ import annotations

import torch.nn.functional as F

from ..profiling import annotate
from .augment import make_augment
from .checkpoint import EpochCheckpoint
from .config import Config
from .datasets import Batches, Data, prepare_data, resolve_workers
from .models import build_from_spec, load_checkpoint, model_spec, save_teacher
from .rundir import RunDir
from .train import accuracy, fit, lr_at, make_generator, make_optimizer, setup_device, seeded

CHECKPOINT = "checkpoints/squeeze.pt"


@annotate("squeeze")
def train_teacher(model, data: Data, cfg: Config, device, seed: int, log=None, checkpoint_path=None) -> float:
    """SGD (or AdamW) with a cosine or step schedule and batch augmentation on ``device``;
    resumable from, and checkpointed every ``cfg.checkpoint_every`` seconds into,
    ``checkpoint_path`` (deleted once training ends)."""
    sq = cfg.squeeze
    aug = make_augment(sq.augment, sq.crop_min, flip=cfg.data.flip)
    generator = make_generator(device, seed)
    shuffle = make_generator("cpu", seed)
    train = Batches(data.train, sq.batch_size, shuffle=True, generator=shuffle, device=device,
                    drop_last=True, workers=resolve_workers(cfg.data.workers))
    optimizer = make_optimizer(model.parameters(), sq.optimizer, sq.lr, sq.momentum, sq.weight_decay)
    steps_per_epoch = len(train)

    def lr_fn(step, total):
        return lr_at(sq.lr, step, total, sq.scheduler, sq.step_epochs * steps_per_epoch)

    def loss_fn(x, y):
        return F.cross_entropy(model(aug(x, generator)), y)

    checkpoint = None
    if checkpoint_path is not None:
        checkpoint = EpochCheckpoint(checkpoint_path, {"augment": generator, "shuffle": shuffle}, cfg.checkpoint_every,
                                     log=log)
    loss = fit(model, train, sq.epochs, optimizer, lr_fn, loss_fn, "squeeze", log, checkpoint)
    if checkpoint is not None:
        checkpoint.remove()
    return loss


def initial_teacher(cfg: Config, data: Data, teacher_checkpoint=None):
    """(model, spec): the teacher before training, seeded with ``cfg.seeds[0]``, with the
    weights of ``teacher_checkpoint`` if given (ConfigError if they do not fit)."""
    spec = model_spec(cfg.model.arch, data.num_classes, data.image_size, data.channels, cfg.model.width,
                      cfg.model.depth)
    with seeded(cfg.seeds[0]):
        model = build_from_spec(spec)
    if teacher_checkpoint:
        load_checkpoint(model, teacher_checkpoint)
    return model, spec


def run(cfg: Config, out: RunDir, teacher_checkpoint=None) -> dict:
    """Train (or load, with ``teacher_checkpoint``) the teacher; write ``teacher.safetensors``."""
    device = setup_device(cfg)
    data = prepare_data(cfg)
    model, spec = initial_teacher(cfg, data, teacher_checkpoint)
    inputs = {"teacher_checkpoint": teacher_checkpoint} if teacher_checkpoint else {}
    if (done := out.start("squeeze", cfg, inputs)) is not None:
        return done
    seed = cfg.seeds[0]
    if teacher_checkpoint:
        out.log(f"squeeze: loaded {teacher_checkpoint}")
    model = model.to(device)
    out.log(f"squeeze: {cfg.model.arch} on {data.name} ({len(data.train)} train / {len(data.test)} test images, "
            f"{data.num_classes} classes, {data.image_size}px), {cfg.squeeze.epochs} epochs on {device}")
    if cfg.squeeze.epochs > 0:
        train_teacher(model, data, cfg, device, seed, out.log, out.path / CHECKPOINT)
    test = Batches(data.test, 256, device=device, workers=resolve_workers(cfg.data.workers))
    acc = accuracy(model, test)
    out.log(f"squeeze: teacher top-1 {100 * acc:.2f}% on the test set")
    path = out.path / "teacher.safetensors"
    save_teacher(path, model, spec, {"test_accuracy": acc})
    results = {"teacher_accuracy": acc, "artifacts": {"teacher": str(path)}}
    out.finish(results)
    return results
