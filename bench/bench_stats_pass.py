"""Real-statistics pass: images/s of ``collect_real_stats`` against the bare teacher forward
over the same batches (CIFAR ResNet-18, 32×32), NCHW and channels_last (what the stats stage
runs). The two are timed round-robin (bench/common.interleaved_ms).

    python bench/bench_stats_pass.py [--batch 100] [--batches 3] [--device cpu] [--threads N]
"""
from __future__ import annotations

import argparse

import torch

import unidd_fast as uf
from common import interleaved_ms, report, set_threads
from sites import cifar_resnet18


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--layouts", default="channels_last,NCHW")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    formats = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
    for fmt_name in args.layouts.split(","):
        fmt = formats[fmt_name]
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

        times = interleaved_ms({"bare": bare, "stats": stats}, args.device, warmup=1, repeat=args.repeat)
        t_bare, t_stats = times["bare"]["median_ms"], times["stats"]["median_ms"]
        images = args.batch * args.batches
        rows.append({"layout": fmt_name, "images": images, "bare_img_s": images / t_bare * 1e3,
                     "stats_img_s": images / t_stats * 1e3, "time_ratio": t_stats / t_bare,
                     "time_ratio_of_minima": times["stats"]["min_ms"] / times["bare"]["min_ms"], "device": args.device})
    report("stats_pass", rows, ["layout", "images", "bare_img_s", "stats_img_s", "time_ratio", "time_ratio_of_minima"])


if __name__ == "__main__":
    main()
