"""Scale: peak memory and disk of recover and evaluate against the set size, on this machine.

A synthetic 1000-class ImageFolder of tiny RGB images (``--side`` px, 2 training and 1
validation image per class), a ConvNet teacher (width 8, one block) squeezed for one
epoch, statistics, then for every IPC of ``--ipcs``: recover (CFM, noise init, class-batches
of 500 classes, 1 iteration) and evaluate (1 epoch), each in its own process. Reported per
IPC: peak RSS of the recover process (to its end: the set's index is written there) and
of the evaluate process (``os.wait4``; data.workers=0, so the reading happens in that
process too), wall seconds, the images' bytes (sum of the PNG files) and the recover run
directory's bytes (every file in it, apparent size).

    python bench/bench_scale.py [--ipcs 2,20,200] [--side 8] [--timeout 3600]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from common import report

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--quiet", "--set", "threads=1", "--set", "data.workers=0"]


def write_folder(root: Path, classes: int, side: int, per_class: dict[str, int], gen: torch.Generator) -> None:
    for split, count in per_class.items():
        for c in range(classes):
            folder = root / split / f"class{c:04d}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (side, side, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")


def stage(argv: list[str], timeout: float) -> dict:
    """Run ``python -m unidd_fast ARGV``; its wall seconds and peak RSS (MB)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "unidd_fast", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            raise TimeoutError(f"{argv[0]} ran past {timeout} s")
        time.sleep(0.05)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.read().decode()[-2000:]}")
    result = {"seconds": time.perf_counter() - start, "rss_mb": usage.ru_maxrss / 1024}
    print(f"{argv[0]} {argv[argv.index('--out') + 1]}: {result['seconds']:.1f} s, peak RSS {result['rss_mb']:.0f} MB",
          flush=True)
    return result


def tree_bytes(root: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in root.glob(pattern) if p.is_file())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipcs", default="2,20,200")
    parser.add_argument("--side", type=int, default=8)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--work", help="directory for the data and runs (default: a temporary one)")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        write_folder(tmp / "data", args.classes, args.side, {"train": 2, "val": 1}, gen)
        print(f"data: {time.perf_counter() - start:.1f} s", flush=True)
        data = ["--dataset", "folder", "--data", str(tmp / "data"), "--arch", "convnet", "--set", "model.width=8",
                "--set", "model.depth=1", "--set", f"data.image_size={args.side}", "--set", "squeeze.epochs=1"]
        stage(["squeeze", "--out", str(tmp / "sq"), *data, *COMMON], args.timeout)
        stage(["stats", "--from", str(tmp / "sq"), "--out", str(tmp / "st"), *COMMON], args.timeout)
        rows = []
        for ipc in (int(v) for v in args.ipcs.split(",")):
            rc, ev = tmp / f"rc{ipc}", tmp / f"ev{ipc}"
            recover = stage(["recover", "--from", str(tmp / "st"), "--out", str(rc), "--ipc", str(ipc), "--seeds", "0",
                             "--iterations", "1", "--set", "recover.batch_size=500", "--set", "recover.init=noise",
                             *COMMON], args.timeout)
            evaluate = stage(["evaluate", "--from", str(rc), "--out", str(ev), "--set", "evaluate.epochs=1", *COMMON],
                             args.timeout)
            images, run_dir = tree_bytes(rc, "new*/*.png"), tree_bytes(rc)
            raw = ipc * args.classes * 3 * args.side * args.side
            rows.append({"ipc": ipc, "images": ipc * args.classes, "recover_rss_mb": recover["rss_mb"],
                         "evaluate_rss_mb": evaluate["rss_mb"], "recover_s": recover["seconds"],
                         "evaluate_s": evaluate["seconds"], "images_mb": images / 1e6, "raw_uint8_mb": raw / 1e6,
                         "run_dir_mb": run_dir / 1e6, "run_dir_vs_images": run_dir / images})
            for row in rows:
                row["recover_rss_vs_first"] = row["recover_rss_mb"] / rows[0]["recover_rss_mb"]
                row["evaluate_rss_vs_first"] = row["evaluate_rss_mb"] / rows[0]["evaluate_rss_mb"]
            print(rows[-1], flush=True)
    report("scale", rows, ["ipc", "images", "recover_rss_mb", "recover_rss_vs_first", "evaluate_rss_mb",
                           "evaluate_rss_vs_first", "recover_s", "evaluate_s", "images_mb", "run_dir_mb",
                           "run_dir_vs_images"], {"side": args.side, "classes": args.classes})


if __name__ == "__main__":
    main()
