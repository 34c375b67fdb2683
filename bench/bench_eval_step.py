"""Evaluation step with stored soft labels (``evaluate --labels``) against online KD (the
teacher runs in every step): one epoch of ``train_student`` over an in-memory distilled set,
both timed round-robin (bench/common.interleaved_ms). The labels are written once before
timing (``relabel.record``, all classes kept). Geometries: the digits ConvNet (teacher =
student, 16 px, 1 channel) and a CIFAR ResNet-18 teacher with a ResNet-18 student at 32 px.

    python bench/bench_eval_step.py [--images 100] [--batch 50] [--threads 1] [--repeat 5]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import interleaved_ms, report, set_threads
from unidd_fast.pipeline import config
from unidd_fast.pipeline.datasets import TensorImages
from unidd_fast.pipeline.evaluate import train_student
from unidd_fast.pipeline.models import build_model
from unidd_fast.pipeline.labels import record

GEOMETRIES = {  # name: (arch, image side, channels, classes, dataset preset)
    "digits convnet": ("convnet", 16, 1, 10, "digits"),
    "cifar resnet18": ("resnet18", 32, 3, 10, "cifar10"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--geometries", default=",".join(GEOMETRIES))
    args = parser.parse_args(argv)
    set_threads(args.threads)
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in args.geometries.split(","):
        arch, side, channels, classes, preset = GEOMETRIES[name]
        cfg = config.defaults(preset)
        for key, value in {"evaluate.epochs": 1, "evaluate.batch_size": args.batch, "checkpoint_every": 0}.items():
            config.set_value(cfg, key, value)
        images = torch.randint(0, 256, (args.images, channels, side, side), generator=gen, dtype=torch.uint8)
        distilled = TensorImages(images, torch.arange(args.images) % classes, (0.5,) * channels,
                                 (0.25,) * channels, side)
        teacher = build_model(arch, classes, side, channels, 32, 3).eval().requires_grad_(False)
        student = build_model(arch, classes, side, channels, 32, 3)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "set000"
            record(teacher, distilled, cfg.evaluate, cfg.data.flip, device, 0, folder, topk=0)
            times = interleaved_ms({
                "online": lambda: train_student(student, teacher, distilled, cfg, device, 0),
                "stored": lambda: train_student(student, teacher, distilled, cfg, device, 0, labels=folder),
            }, warmup=1, repeat=args.repeat)
        steps = -(-args.images // min(args.batch, args.images))
        online, stored = times["online"]["median_ms"] / steps, times["stored"]["median_ms"] / steps
        rows.append({"geometry": name, "batch": args.batch, "online_ms_step": online, "stored_ms_step": stored,
                     "speedup": online / stored,
                     "speedup_of_minima": times["online"]["min_ms"] / times["stored"]["min_ms"]})
    report("eval_step", rows, ["geometry", "batch", "online_ms_step", "stored_ms_step", "speedup", "speedup_of_minima"])


if __name__ == "__main__":
    main()
