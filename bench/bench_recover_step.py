"""Recover step: images/s of one full iteration (augment → teacher forward → CE + regulariser
→ backward → Adam → clip) through the pipeline's RecoverEngine, with the SRe2L BN-matching loss
and with the CFM loss, on the same teacher and geometry (CIFAR ResNet-18, 100 classes, a
class-batch of 100 images of 32×32), so the overhead of CFM is one ratio. "bare" is the same
step with cross-entropy alone (the teacher's own cost).

Each variant has its own copy of the teacher (hooks of one loss never fire for another) and
the variants are timed round-robin, so a change of load on a shared machine hits all alike.
CFM runs with its EMU active (b = 2) and the real side cached, as in every class-batch after
the first.

    python bench/bench_recover_step.py [--batch 100] [--steps 2] [--repeat 5] [--threads 1]
        [--layouts channels_last,NCHW] [--precisions fp32,bf16] [--device cpu] [--compile]
"""
from __future__ import annotations

import argparse
import copy

import torch

import unidd_fast as uf
from common import interleaved_ms, report, set_threads
from sites import cifar_resnet18, random_real_stats, site_shapes
from unidd_fast.pipeline.augment import make_augment
from unidd_fast.pipeline.config import RecoverConfig
from unidd_fast.pipeline.recover import pixel_bounds
from unidd_fast.pipeline.sre2l_loss import BNMatchLoss
from unidd_fast.pipeline.step import RecoverEngine, StepOptions

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
VARIANTS = ("bare", "sre2l", "cfm", "cfm_graph_safe")


def make_variant(name: str, teacher, stats, rc, options, lo, hi, seed: int):
    """(engine, regulariser) of one variant, on its own copy of the teacher."""
    model = copy.deepcopy(teacher)
    if name == "bare":
        reg = None
    elif name == "sre2l":
        reg = BNMatchLoss(model, rc.r_bn, rc.first_bn_multiplier)
    else:
        reg = uf.CFMLoss(model, stats, beta=rc.beta, eta=rc.eta, backend="torch" if lo.is_cpu else "auto")
        reg.set_curriculum(0, 1)
    device = lo.device
    engine = RecoverEngine(model, reg, rc, make_augment("recover", rc.crop_min, rc.shift),
                           torch.Generator(device=device).manual_seed(seed), lo, hi, options,
                           graph_safe=name == "cfm_graph_safe" or None, check_every=rc.iterations)
    return engine, reg


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=100, help="class-batch size (one image per class)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2, help="iterations per timed run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--layouts", default="channels_last,NCHW")
    parser.add_argument("--precisions", default="fp32")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the teacher (inductor)")
    parser.add_argument("--name", default="recover_step", help="JSON file name under bench/out/")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    teacher = cifar_resnet18(args.classes).requires_grad_(False)
    stats = random_real_stats(site_shapes(teacher, 32), args.classes, type(teacher).__name__, gen)
    teacher = teacher.to(device)
    rc = RecoverConfig(iterations=args.steps, lr=0.25, batch_size=args.batch, crop_min=0.5)
    lo, hi = pixel_bounds(CIFAR_MEAN, CIFAR_STD, device)
    init = torch.randn(args.batch, 3, 32, 32, generator=gen).to(device)
    targets = (torch.arange(args.batch) % args.classes).to(device)
    rows = []
    for layout in args.layouts.split(","):
        for precision in args.precisions.split(","):
            options = StepOptions(precision=precision, channels_last=layout == "channels_last", compile=args.compile)
            runs, regs = {}, []
            for i, name in enumerate(args.variants.split(",")):
                engine, reg = make_variant(name, teacher, stats, rc, options, lo, hi, seed=i)
                engine.run(init, targets)  # warm-up, fills the buffers and the CFM caches
                if reg is not None:
                    reg.next_batch()  # CFM: EMU active from here on (b = 2)
                regs.append(reg)
                runs[name] = lambda engine=engine: engine.run(init, targets)
            times = interleaved_ms(runs, device, warmup=0, repeat=args.repeat)
            for reg in regs:
                if reg is not None:
                    reg.remove()
            base = {k: times[k]["median_ms"] for k in ("bare", "sre2l") if k in times}
            for name, t in times.items():
                ms = t["median_ms"] / args.steps
                rows.append({"layout": layout, "precision": precision, "compile": args.compile, "variant": name,
                             "ms_per_step": ms,
                             "img_per_s": args.batch / ms * 1e3,
                             "vs_sre2l": t["median_ms"] / base["sre2l"] if "sre2l" in base else None,
                             "vs_bare": t["median_ms"] / base["bare"] if "bare" in base else None,
                             "min_ms_per_step": t["min_ms"] / args.steps, "max_ms_per_step": t["max_ms"] / args.steps,
                             "batch": args.batch, "device": str(device)})
    report(args.name, rows, ["layout", "precision", "variant", "ms_per_step", "img_per_s", "vs_sre2l", "vs_bare",
                             "min_ms_per_step", "max_ms_per_step"])


if __name__ == "__main__":
    main()
