"""Relabel / evaluate: train a fresh student on a distilled set with online knowledge
distillation from the teacher and report its top-1 accuracy on the real test set.

Every step the teacher labels the augmented (optionally CutMixed) batch the student sees:
loss = KL(softmax(t/T) ‖ softmax(s/T)), batch-mean (SRe2L / FKD style, paper Table 4; × T²
with ``evaluate.kd_t2``).
Distilled sets are read from their 8-bit image files through a DataLoader (``distilled.py``):
our recover runs and any ImageFolder tree of images (SRe2L's
``new{c:03d}/class{c:03d}_id{ipc:03d}.png`` or class-named folders) alike, so other methods'
outputs are evaluated the same way, and ours on exactly the pixels handed over.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..errors import ConfigError
from ..profiling import annotate
from ..progress import progress
from ..kernels._utils import acc_dtype
from .augment import cutmix, make_augment
from .checkpoint import EpochCheckpoint
from .checks import check_teacher
from .config import Config
from .datasets import Batches, Data, TensorImages, prepare_data, resolve_workers, verify_images
from .distilled import INDEX_FILE, ImageFiles, find_images
from .models import build_model, load_teacher
from .rundir import RunDir, write_json
from .train import accuracy, fit, kd_teacher, lr_at, make_generator, make_optimizer, seeded, setup_device

IN_MEMORY_BYTES = 2**31  # stored labels need the set in memory (uint8): at most this many bytes

def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            t2: bool = False) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) at temperature T, averaged over the batch, times T² if ``t2``
    (Hinton's scaling; SRe2L and the authors' release leave it out, and Table 4's learning
    rates were tuned without it)."""
    t, dtype = temperature, acc_dtype(student_logits.dtype)
    kl = F.kl_div(F.log_softmax(student_logits.to(dtype) / t, 1), F.log_softmax(teacher_logits.to(dtype) / t, 1),
                  reduction="batchmean", log_target=True)
    return kl * (t * t) if t2 else kl


def load_distilled(path, data: Data, in_memory: bool = False) -> tuple[ImageFiles | TensorImages, int]:
    """(dataset of normalised images and labels read from the image files, number of images)
    of a distilled set: a recover run directory, its ``distilled.json``, or any ImageFolder tree.
    ``in_memory``: the set's uint8 pixels in a ``TensorImages`` instead (stored labels index
    and fingerprint the whole set), refused above IN_MEMORY_BYTES."""
    samples = find_images(path, list(data.classes), data.num_classes)
    verify_images([p for p, _ in samples], desc="verify distilled")
    files = ImageFiles(samples, data.image_size, data.channels, data.mean, data.std)
    if not in_memory:
        return files, len(samples)
    nbytes = len(samples) * data.channels * data.image_size ** 2
    if nbytes > IN_MEMORY_BYTES:
        raise ConfigError(f"stored labels (relabel, evaluate --labels) need the distilled set in memory; {path} "
                          f"holds {nbytes / 2**30:.1f} GiB of pixels, more than {IN_MEMORY_BYTES / 2**30:.0f} GiB: "
                          "evaluate it with online KD (without --labels)")
    pixels = torch.stack([files.pixels(i) for i in progress(range(len(files)), desc="load distilled")])
    return TensorImages(pixels, files.labels, data.mean, data.std, data.image_size), len(samples)


@annotate("evaluate")
def train_student(student: nn.Module, teacher: nn.Module, distilled, cfg: Config, device, seed: int,
                  desc: str = "evaluate", log=None, checkpoint_path=None, labels=None) -> float:
    """Online KD of ``student`` from ``teacher`` on ``distilled`` (cfg.evaluate settings),
    resumable from and checkpointed into ``checkpoint_path`` (every cfg.checkpoint_every s).

    Under torchrun: DistributedDataParallel. Every rank draws the same global batch order and
    the augmentation of the whole global batch (one generator state on all ranks, so one
    checkpoint serves all), but reads and trains on its rows ``rank::world`` only; the averaged
    gradients are those of the global batch. BatchNorm sees the rank's rows (SyncBatchNorm on
    GPUs; it has no CPU implementation).

    ``labels``: a folder written by ``unidd-fast relabel`` for this set and seed: the batches,
    augmentation and teacher top-k logits are read from it and the teacher does not run
    (``distilled`` is then the in-memory ``TensorImages`` of ``load_distilled(in_memory=True)``)."""
    ev = cfg.evaluate
    here = distributed.info()
    aug = make_augment(ev.augment, ev.crop_min, flip=cfg.data.flip)
    generator = make_generator(device, seed)
    shuffle = make_generator(torch.device("cpu"), seed)
    world, rank = here.world_size, here.rank
    # a last batch smaller than the world would leave a rank without images
    short_tail = 0 < len(distilled) % min(ev.batch_size, len(distilled)) < world
    train = Batches(distilled, ev.batch_size, shuffle=True, generator=shuffle, device=device,
                    workers=resolve_workers(cfg.data.workers), drop_last=short_tail, part=(rank, world))
    optimizer = make_optimizer(student.parameters(), ev.optimizer, ev.lr, ev.momentum, ev.weight_decay)
    model = student
    if world > 1:
        if min(ev.batch_size, len(distilled)) < world:
            raise ConfigError(f"evaluate.batch_size={ev.batch_size} (or the set's {len(distilled)} images) is smaller "
                              f"than the {world} torchrun processes: raise evaluate.batch_size or use fewer processes")
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        ids = [torch.cuda.current_device()] if device.type == "cuda" else None  # init() set this rank's GPU
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    kd_teacher(teacher)
    if labels is not None:
        from .labels import StoredLabelBatches, kd_topk_loss

        train = StoredLabelBatches(labels, distilled, ev, cfg.data.flip, device, seed, world, rank)

        def loss_fn(x, stored):
            return kd_topk_loss(model(x), *stored, ev.temperature, ev.kd_t2)
    else:
        def loss_fn(x, _labels):
            # this rank's rows of the global batch; the draws are made for a full global batch
            rows = torch.arange(rank, rank + world * x.shape[0], world, device=x.device)
            x = cutmix(aug(x, generator, draws=train.batch_size, rows=rows), ev.cutmix, generator,
                       draws=train.batch_size, rows=rows)
            with torch.no_grad():
                target = teacher(x)
            return kd_loss(model(x), target, ev.temperature, ev.kd_t2)

    checkpoint = None
    if checkpoint_path is not None:
        checkpoint = EpochCheckpoint(checkpoint_path, {"augment": generator, "shuffle": shuffle}, cfg.checkpoint_every,
                                     write=here.is_main, log=log)
    return fit(model, train, ev.epochs, optimizer, lambda step, total: lr_at(ev.lr, step, total), loss_fn, desc, log,
               checkpoint)


def evaluate_set(cfg: Config, data: Data, teacher: nn.Module, spec: dict, path, seed: int, device,
                 log=None, label: str = "", checkpoint_path=None, labels=None) -> tuple[float, int]:
    """(test top-1 of a student trained on the distilled set at ``path``, its image count)."""
    distilled, count = load_distilled(path, data, in_memory=labels is not None)
    arch = cfg.evaluate.arch or spec["arch"]
    with seeded(seed):
        student = build_model(arch, data.num_classes, data.image_size, data.channels, spec["width"],
                              spec["depth"]).to(device)
    train_student(student, teacher, distilled, cfg, device, seed, desc=f"evaluate {label}".strip(), log=log,
                  checkpoint_path=checkpoint_path, labels=labels)
    return accuracy(student, Batches(data.test, 256, device=device, workers=resolve_workers(cfg.data.workers))), count


def _describe(entry: dict | str, data: Data, seeds: list) -> list[dict]:
    """Evaluation jobs of one distilled set: ours carry method/ipc/seed; a foreign folder is
    evaluated once per seed of the config."""
    if isinstance(entry, dict):
        return [entry]
    name = Path(entry).expanduser().resolve().name
    return [{"method": name, "ipc": None, "seed": s, "path": str(entry)} for s in seeds]


def describe_jobs(distilled: list, data: Data, seeds: list) -> list[dict]:
    """The evaluation jobs of ``distilled`` in order (``relabel`` writes job i into set{i:03d}/)."""
    return [job for entry in distilled for job in _describe(entry, data, seeds)]


def prepare_jobs(cfg: Config, teacher_path, distilled: list):
    """(device, data, frozen teacher, its spec, the jobs, the stage's input files) of an
    evaluate or relabel run over ``distilled``."""
    device = setup_device(cfg)
    data = prepare_data(cfg)
    teacher, spec = load_teacher(teacher_path, device)
    check_teacher(spec, data)
    teacher.requires_grad_(False)
    jobs = describe_jobs(distilled, data, cfg.seeds)
    inputs = {"teacher": teacher_path, "distilled": list(dict.fromkeys(_input_file(j["path"]) for j in jobs))}
    return device, data, teacher, spec, jobs, inputs


def _input_file(path) -> str:
    """The file that holds a distilled set, where there is one (for the run's fingerprint)."""
    path = Path(path).expanduser()
    return str(path / INDEX_FILE) if (path / INDEX_FILE).is_file() else str(path)


def run(cfg: Config, out: RunDir, teacher_path, distilled: list, labels=None) -> dict:
    """Evaluate every distilled set in ``distilled`` (records from recover, or paths).

    Resumable: each finished set's record is kept in ``checkpoints/evaluate/set{i}.json``
    and the set in training has an epoch checkpoint beside it, so a rerun into the same
    directory skips the finished sets and continues the current one."""
    device, data, teacher, spec, jobs, inputs = prepare_jobs(cfg, teacher_path, distilled)
    if labels is not None:
        inputs["labels"] = str(Path(labels).expanduser().resolve())
    if (done := out.start("evaluate", cfg, inputs)) is not None:
        return done
    here = distributed.info()
    progress_dir = out.path / "checkpoints" / "evaluate"
    teacher_file = progress_dir / "teacher.json"
    if teacher_file.is_file():
        teacher_acc = json.loads(teacher_file.read_text())["accuracy"]
    else:
        teacher_acc = accuracy(teacher, Batches(data.test, 256, device=device, workers=resolve_workers(cfg.data.workers)))
        if here.is_main:
            write_json(teacher_file, {"accuracy": teacher_acc})
    out.log(f"evaluate: teacher top-1 {100 * teacher_acc:.2f}%")
    records = []
    for i, job in enumerate(progress(jobs, desc="evaluate sets")):
        record_file = progress_dir / f"set{i:03d}.json"
        if record_file.is_file():
            records.append(json.loads(record_file.read_text()))
            out.log(f"evaluate {job['method']} seed={job['seed']}: finished before, top-1 "
                    f"{100 * records[-1]['accuracy']:.2f}%")
            continue
        label = f"{job['method']} ipc={job['ipc']} seed={job['seed']}"
        acc, count = evaluate_set(cfg, data, teacher, spec, job["path"], job["seed"], device, out.log, label,
                                  checkpoint_path=progress_dir / f"set{i:03d}.pt",
                                  labels=Path(labels).expanduser() / f"set{i:03d}" if labels is not None else None)
        ipc = job["ipc"] if job["ipc"] is not None else round(count / data.num_classes)
        records.append({"method": job["method"], "ipc": ipc, "seed": job["seed"], "accuracy": acc})
        if here.is_main:
            write_json(record_file, records[-1])
            (progress_dir / f"set{i:03d}.pt").unlink(missing_ok=True)
        out.log(f"evaluate {job['method']} ipc={ipc} seed={job['seed']}: top-1 {100 * acc:.2f}%")
    results = {"teacher_accuracy": teacher_acc, "results": records,
               "artifacts": {"teacher": str(teacher_path), "distilled": [str(j["path"]) for j in jobs]}}
    out.finish(results)
    return results


def _spread(values: list[float]) -> str:
    """'mean ± half-range (count)' of ``values``."""
    mean = sum(values) / len(values)
    return f"{mean:.2f} ± {(max(values) - min(values)) / 2:.2f} ({len(values)})"


def summary_table(records: list[dict], teacher_accuracy: float | None = None, starts: dict | None = None) -> str:
    """Mean ± spread of top-1 (%) per method and ipc, as a plain-text table.

    starts: {method: the method whose images it started from} (e.g. {"cfm": "random-real"});
    each such method gets a "vs start" column per ipc: its top-1 minus that of its starting
    images, paired by seed (mean ± half-range over the seeds both have), and a closing line
    names every ipc where recovery made the images worse than where they started."""
    starts = starts or {}
    groups: dict[tuple, list[float]] = {}
    by_seed: dict[tuple, float] = {}
    for r in records:
        groups.setdefault((r["method"], r["ipc"]), []).append(100 * r["accuracy"])
        by_seed[(r["method"], r["ipc"], r["seed"])] = 100 * r["accuracy"]
    ipcs = sorted({ipc for _, ipc in groups})
    methods = list(dict.fromkeys(m for m, _ in groups))

    def gains(m, ipc):
        start = starts.get(m)
        return [by_seed[k] - by_seed[(start, ipc, k[2])] for k in by_seed
                if k[:2] == (m, ipc) and (start, ipc, k[2]) in by_seed]

    compared = any(gains(m, i) for m in methods for i in ipcs)
    width = max([len(m) for m in methods] + [6])
    header = "".join(f"  {'ipc=' + str(i):>16}" + (f"  {'vs start':>16}" if compared else "") for i in ipcs)
    lines = [f"{'method':<{width}}" + header]
    worse = []
    for m in methods:
        cells = []
        for i in ipcs:
            accs = groups.get((m, i))
            cells.append(f"  {_spread(accs) if accs else '-':>16}")
            if compared:
                diff = gains(m, i)
                text = "-"
                if diff:
                    text = f"{'+' if sum(diff) >= 0 else ''}{_spread(diff)}"
                    if sum(diff) < 0:
                        worse.append(f"{m} ipc={i} ({sum(diff) / len(diff):+.2f})")
                cells.append(f"  {text:>16}")
        lines.append(f"{m:<{width}}" + "".join(cells))
    if compared:
        pairs = ", ".join(f"{m} from {s}" for m, s in starts.items() if m in methods)
        lines.append(f"vs start: top-1 minus that of the images the method started from, same ipc and seed ({pairs})")
    if worse:
        lines.append("recovery made the images WORSE than the real ones it started from: " + "; ".join(worse))
    if teacher_accuracy is not None:
        lines.append(f"teacher (full real training set): {100 * teacher_accuracy:.2f}%")
    return "\n".join(lines)
