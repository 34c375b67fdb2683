"""Shared benchmark plumbing: timing with warm-up and medians, machine facts, table + JSON."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

# UNIDD_BENCH_OUT: another folder for the JSON (bench/gpu_session.py keeps a session's apart)
OUT = Path(os.environ.get("UNIDD_BENCH_OUT") or Path(__file__).resolve().parent / "out")


def prediction_args(doc: str, argv=None) -> argparse.Namespace:
    """``--dtype bf16|fp32`` and ``--markdown``, the flags of the roofline PREDICTION scripts."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="feature-map dtype")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables for bench/RESULTS.md")
    return parser.parse_args(argv)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device="cpu", warmup: int = 2, repeat: int = 7) -> dict:
    """Run ``fn`` ``warmup`` times, then time ``repeat`` runs; median and spread in ms."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "repeat": repeat}


def interleaved_times(fns: dict, device="cpu", warmup: int = 1, repeat: int = 5) -> dict:
    """Time several functions round-robin (one run of each per round, ``repeat`` rounds after
    ``warmup``), so that a change of machine load hits all of them alike: on a shared CPU only
    ratios measured this way are comparable. Returns name -> the ``repeat`` times in ms, in
    round order (round i of every function ran back to back)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_ms(fns: dict, device="cpu", warmup: int = 1, repeat: int = 5) -> dict:
    """``interleaved_times`` summarised: name -> median_ms / min_ms / max_ms / repeat."""
    times = interleaved_times(fns, device, warmup, repeat)
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "repeat": repeat}
            for name, t in times.items()}


def set_threads(threads: int) -> None:
    """``threads`` > 0: torch's CPU thread count (1 gives steadier timings when the cores are shared)."""
    if threads > 0:
        torch.set_num_threads(threads)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def report(name: str, rows: list[dict], columns: list[str], extra: dict | None = None) -> Path:
    """Print ``rows`` as a table and write them (with machine facts) to bench/out/<name>.json."""
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows, **(extra or {})}, indent=2))
    print(f"-> {path}")
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)
