"""Real-statistics pass: images/s of ``collect_real_stats`` against the bare teacher forward
over the same batches (CIFAR ResNet-18, 32×32), NCHW and channels_last.

    python bench/bench_stats_pass.py [--batch 100] [--batches 3] [--device cpu]
"""
from __future__ import annotations

import argparse

import torch

import unidd_fast as uf
from common import median_ms, report
from sites import cifar_resnet18


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for fmt_name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        model = cifar_resnet18(args.classes).to(args.device, memory_format=fmt)
        data = [(torch.randn(args.batch, 3, 32, 32, generator=gen).to(args.device).contiguous(memory_format=fmt),
                 torch.randint(0, args.classes, (args.batch,), generator=gen).to(args.device))
                for _ in range(args.batches)]

        @torch.no_grad()
        def bare():
            for x, _ in data:
                model(x)

        def stats():
            uf.collect_real_stats(model, data, args.classes, show_progress=False)

        t_bare = median_ms(bare, args.device, warmup=1, repeat=args.repeat)["median_ms"]
        t_stats = median_ms(stats, args.device, warmup=1, repeat=args.repeat)["median_ms"]
        images = args.batch * args.batches
        rows.append({"layout": fmt_name, "images": images, "bare_img_s": images / t_bare * 1e3,
                     "stats_img_s": images / t_stats * 1e3, "time_ratio": t_stats / t_bare, "device": args.device})
    report("stats_pass", rows, ["layout", "images", "bare_img_s", "stats_img_s", "time_ratio"])


if __name__ == "__main__":
    main()
