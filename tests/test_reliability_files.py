"""Hostile and malformed input files: each is refused with one line naming the file and the
fix (exit status 2), before anything reads what the file claims to be."""
import pickle
import subprocess

import numpy as np
import pytest

from _pipeline_data import write_cifar
from _tiny_runs import ROOT, command, env


class _ObjectFieldDtype:
    """Pickles as a structured dtype holding an object field, its flags reset to 0: numpy
    would read the array's raw bytes as object pointers."""

    def __reduce__(self):
        return (np.dtype, ("V8", False, True), (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))


class _PointerArray:
    """An 'array' of one element of that dtype whose bytes are a pointer the file chooses."""

    def __reduce__(self):
        return (np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                (1, (1,), _ObjectFieldDtype(), False, (0x4141414141414141).to_bytes(8, "little")))


def _cli(*argv):
    """The command line in a child process, so that a crash shows as a failure, not pytest's."""
    return subprocess.run(command(*argv), env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_cifar_structured_dtype_with_object_pointers_is_refused(tmp_path):
    root = write_cifar(tmp_path / "data")
    with open(root / "cifar-10-batches-py" / "data_batch_1", "wb") as handle:
        pickle.dump({"data": _PointerArray(), "labels": [0]}, handle, protocol=2)
    done = _cli("squeeze", "--dataset", "cifar10", "--data", str(root), "--out", str(tmp_path / "run"), "--quiet")
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "data_batch_1" in lines[0] and "dtype" in lines[0], done.stderr
    assert not (tmp_path / "run").exists()


def _one_line(capsys, *messages):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unidd-fast "), err
    for message in messages:
        assert message in lines[0], err
    return lines[0]


def _rewrite(path, change):
    with open(path, "rb") as handle:
        entry = pickle.load(handle)
    change(entry)
    with open(path, "wb") as handle:
        pickle.dump(entry, handle, protocol=2)


CIFAR_DAMAGE = {
    "bad shape": ("data_batch_2", lambda e: e.update(data=np.zeros((6, 100), np.uint8)), "(6, 100)"),
    "label count": ("data_batch_3", lambda e: e.update(labels=e["labels"][:-1]), "5 labels for 6 images"),
    "label_names=None": ("batches.meta", lambda e: e.update(label_names=None), "label_names"),
    "label -1": ("test_batch", lambda e: e["labels"].__setitem__(0, -1), "label -1"),
    "float pixels": ("data_batch_1", lambda e: e.update(data=e["data"].astype(np.float64)), "dtype 'f8'"),
}


@pytest.mark.parametrize("case", sorted(CIFAR_DAMAGE))
def test_malformed_cifar_files_are_named_in_one_line(tmp_path, capsys, case):
    from unidd_fast.cli import main

    name, change, message = CIFAR_DAMAGE[case]
    root = write_cifar(tmp_path / "data")
    _rewrite(root / "cifar-10-batches-py" / name, change)
    argv = ["squeeze", "--dataset", "cifar10", "--data", str(root), "--out", str(tmp_path / "run"), "--quiet",
            "--arch", "convnet", "--set", "model.depth=1", "--set", "model.width=8", "--set", "squeeze.epochs=1"]
    assert main(argv) == 2
    _one_line(capsys, name, message, "re-extract")
    assert not (tmp_path / "run").exists()


def _bomb_png(path):
    """A valid PNG header claiming 30000 × 30000 pixels (PIL's decompression-bomb check)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))


def _truncated_jpeg(path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the header is whole, half the scan is gone


FOLDER_DAMAGE = {
    "not an image": (lambda p: p.write_text("hello"), "cannot identify image file"),
    "truncated jpeg": (_truncated_jpeg, "truncated"),
    "decompression bomb": (_bomb_png, "decompression bomb"),
}


@pytest.mark.parametrize("case", sorted(FOLDER_DAMAGE))
def test_damaged_images_are_found_when_the_folder_is_indexed(tmp_path, capsys, case):
    from _pipeline_data import write_image_folders
    from unidd_fast.cli import main

    damage, message = FOLDER_DAMAGE[case]
    root = write_image_folders(tmp_path / "data", per_class=2, size=8)
    bad = root / "val" / "dog" / ("1.jpg" if "jpeg" in case else "1.png")
    (root / "val" / "dog" / "1.png").unlink()
    damage(bad)
    argv = ["squeeze", "--dataset", "folder", "--data", str(root), "--out", str(tmp_path / "run"), "--quiet",
            "--set", "data.image_size=8", "--arch", "convnet", "--set", "model.depth=1", "--set", "squeeze.epochs=1"]
    assert main(argv) == 2
    _one_line(capsys, str(bad), message)
    assert not (tmp_path / "run").exists()  # found before anything ran


@pytest.mark.parametrize("meta", ["{not json", "[1, 2]", '{"format": "unidd_fast.real_stats/2"}',
                                  '{"format": "unidd_fast.real_stats/2", "sites": 5, "sha256": ""}'])
def test_statistics_metadata_that_is_not_the_expected_json_is_named(tmp_path, meta):
    import torch
    from safetensors.torch import save_file

    from unidd_fast import RealStats
    from unidd_fast.errors import StatsFileError

    path = tmp_path / "stats.safetensors"
    save_file({"x/psi": torch.eye(2, dtype=torch.float64)}, str(path), metadata={"unidd": meta})
    with pytest.raises(StatsFileError, match="stats.safetensors has damaged metadata"):
        RealStats.load(path)


@pytest.mark.parametrize("spec", ["{not json", '"convnet"',
                                  '{"arch": "convnet", "num_classes": 10, "image_size": 8, "channels": 1, '
                                  '"width": 1000000000, "depth": 1}',
                                  '{"arch": "convnet", "num_classes": 10}'])
def test_a_teacher_spec_that_is_damaged_or_absurd_is_named(tmp_path, spec):
    import torch
    from safetensors.torch import save_file

    from unidd_fast.errors import ConfigError
    from unidd_fast.pipeline.models import TEACHER_FORMAT, load_teacher
    from unidd_fast.real_stats import checksum

    path, tensors = tmp_path / "teacher.safetensors", {"w": torch.ones(2)}
    meta = {"format": TEACHER_FORMAT, "spec": spec, "extra": "{}"}
    save_file(tensors, str(path), metadata=dict(meta, sha256=checksum(tensors, meta)))  # damaged before the checksum
    with pytest.raises(ConfigError, match="teacher.safetensors has a damaged model spec"):
        load_teacher(path)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_write_honours_the_umask(tmp_path, umask):
    import os
    import stat
    from pathlib import Path

    from unidd_fast.real_stats import atomic_write

    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "out.txt", lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o666 & ~umask


def test_a_flipped_bit_in_a_teacher_file_fails_its_checksum(tmp_path):
    from unidd_fast.errors import ConfigError
    from unidd_fast.pipeline.models import build_model, load_teacher, model_spec, save_teacher

    spec = model_spec("convnet", 3, 8, 1, 4, 1)
    path = tmp_path / "teacher.safetensors"
    save_teacher(path, build_model("convnet", 3, 8, 1, 4, 1), spec)
    load_teacher(path)
    raw = bytearray(path.read_bytes())
    raw[-2] ^= 0x40  # an exponent bit of the last weight
    path.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="teacher.safetensors fails its checksum"):
        load_teacher(path)


def test_statistics_metadata_is_under_the_checksum(tmp_path):
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from unidd_fast import RealStats
    from unidd_fast.errors import StatsFileError
    from unidd_fast.real_stats import SiteStats

    g = torch.Generator().manual_seed(0)
    site = SiteStats(*(torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 2), (2,), (2, 3), (2, 3))),
                     count=40)
    path = tmp_path / "stats.safetensors"
    RealStats({"s": site}, {"s": (2, 4, 5)}, "ConvNet", 10, 3).save(path)
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["unidd"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    meta["counts"]["s"] = 4000
    save_file(tensors, str(path), metadata={"unidd": json.dumps(meta)})
    with pytest.raises(StatsFileError, match="fails its checksum"):
        RealStats.load(path)
