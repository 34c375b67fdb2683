"""Tiny squeeze and stats runs on digits (8 px, a one-block ConvNet of width 8) that the
reliability, resume and torchrun tests start from; and the command they run."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from unidd_fast.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--quiet", "--set", "threads=1", "--set", "model.width=8", "--set", "model.depth=1", "--set",
        "data.image_size=8", "--set", "squeeze.epochs=1"]


def squeeze_and_stats(root: Path) -> tuple[Path, Path]:
    """(squeeze run directory, stats run directory) under ``root``, made in this process."""
    threads = torch.get_num_threads()
    try:
        assert main(["squeeze", "--out", str(root / "sq")] + TINY) == 0
        assert main(["stats", "--from", str(root / "sq"), "--out", str(root / "st"), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "sq", root / "st"


def env() -> dict:
    """Environment of a child process: this checkout first on the path, no torchrun variables."""
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(name, None)
    return out


def command(*argv: str) -> list[str]:
    """``python -m unidd_fast ARGV`` in a child process."""
    return [sys.executable, "-m", "unidd_fast", *argv]


def torchrun_command(*argv: str, nproc: int = 2) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N -m unidd_fast ARGV`` (gloo on the CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "unidd_fast", *argv]


def torchrun(*argv: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*argv, nproc=nproc), env=env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a zombie writes and holds nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition, what: str, timeout: float = 600) -> None:
    """Poll ``condition()`` until it holds; fail naming ``what`` after ``timeout`` seconds (a
    deadline for a hung process, far beyond any loaded machine's delay, not a timing assumption)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.005)
