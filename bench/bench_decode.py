"""JPEG decoding for the real-data passes (stats, squeeze on ImageFolder data): images/s of
PIL (``Image.open(...).convert("RGB")``, what ``datasets.image_loader`` does) against
``torchvision.io.decode_jpeg`` on the file's bytes, alone and followed by the ImageNet eval
transform (resize the short side to 256, centre crop 224, float, normalise), per process
(one DataLoader worker), on synthetic ImageNet-sized JPEGs (500×375 smooth random content,
quality 90). The two are timed round-robin.

    python bench/bench_decode.py [--images 64] [--repeat 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import io as tvio
from torchvision.transforms import v2 as T

from common import interleaved_ms, report, set_threads
from unidd_fast.pipeline.config import IMAGENET_MEAN, IMAGENET_STD
from unidd_fast.pipeline.datasets import image_loader


def write_jpegs(folder: Path, count: int, gen: torch.Generator) -> list[Path]:
    """``count`` 500×375 JPEGs of smooth random colour fields plus fine noise (compresses like a photo)."""
    paths = []
    for i in range(count):
        coarse = torch.rand(1, 3, 12, 16, generator=gen)
        image = F.interpolate(coarse, size=(375, 500), mode="bicubic", align_corners=False)[0]
        image = (image + 0.05 * torch.randn(image.shape, generator=gen)).clamp(0, 1)
        array = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=90)
        paths.append(folder / f"img{i:04d}.jpg")
        paths[-1].write_bytes(buffer.getvalue())
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    transform = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224), T.ToImage(),
                           T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    load_pil = image_loader(3)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images, gen)
        same = all(torch.equal(T.functional.pil_to_tensor(load_pil(str(p))), tvio.decode_jpeg(tvio.read_file(str(p))))
                   for p in paths[:4])
        fns = {
            "PIL decode": lambda: [load_pil(str(p)) for p in paths],
            "decode_jpeg": lambda: [tvio.decode_jpeg(tvio.read_file(str(p))) for p in paths],
            "PIL + eval transform": lambda: [transform(load_pil(str(p))) for p in paths],
            "decode_jpeg + eval transform": lambda: [transform(tvio.decode_jpeg(tvio.read_file(str(p))))
                                                     for p in paths],
        }
        times = interleaved_ms(fns, warmup=1, repeat=args.repeat)
    base = {"decode": times["PIL decode"]["median_ms"], "transform": times["PIL + eval transform"]["median_ms"]}
    rows = []
    for name, t in times.items():
        ref = base["transform" if "transform" in name else "decode"]
        rows.append({"path": name, "img_per_s": args.images / t["median_ms"] * 1e3, "vs_PIL": ref / t["median_ms"],
                     "ms_per_image": t["median_ms"] / args.images, "min_ms": t["min_ms"], "max_ms": t["max_ms"]})
    report("decode", rows, ["path", "img_per_s", "vs_PIL", "ms_per_image"], {"same_pixels": same})
    print(f"PIL and decode_jpeg give the same pixels: {same}")


if __name__ == "__main__":
    main()
