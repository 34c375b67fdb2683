"""Run every benchmark that applies to this machine (each in its own process), then print
and write (bench/out/summary.json) the three throughput targets of the recover step:

- full CFM loss fwd+bwd over the 20 ResNet-18 sites vs the obvious reference   (target >= 4×)
- recover step with CFM vs the same step with the SRe2L BN loss                (target <= 1.15×)
- real-statistics pass vs the bare teacher forward                             (target <= 1.2×)

On a CPU: the three target benchmarks, the per-op microbenchmarks and the H100 roofline
PREDICTIONS (about 6-8 minutes on 2 cores). With a CUDA device the GPU benchmarks run too.

    python bench/run_all.py [--threads N] [--quick] [--no-predictions]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import OUT, machine, report

HERE = Path(__file__).resolve().parent


PREDICTIONS = ("roofline.py", "roofline_step.py", "bench_cuda_roofline.py")  # models: they time nothing


def plan(cuda: bool, threads: int, quick: bool, predictions: bool = True) -> list[tuple[str, list[str]]]:
    t = ["--threads", str(threads)] if threads else []
    device = ["--device", "cuda"] if cuda else []
    repeat = ["--repeat", "3"] if quick else []
    jobs = [
        ("bench_cfm_loss.py", t + device + (["--repeat", "5"] if quick else [])),
        ("bench_recover_step.py", t + device + repeat + ["--layouts", "channels_last", "--precisions", "fp32,bf16"]
         + (["--variants", "bare,sre2l,cfm"] if quick else [])),
        ("bench_stats_pass.py", t + device + repeat + ["--layouts", "channels_last,NCHW"]),
        ("bench_ops.py", t + device + (["--repeat", "3"] if quick else ["--repeat", "5"])),
        ("roofline.py", ["--dtype", "bf16"]),
        ("roofline.py", ["--dtype", "fp32"]),
        ("roofline_step.py", ["--dtype", "bf16"]),
        ("roofline_step.py", ["--dtype", "fp32"]),
        ("bench_cuda_roofline.py", ["--dtype", "bf16"]),
    ]
    if cuda:
        jobs += [("bench_ops.py", ["--geometry", "imagenet", "--device", "cuda"]),
                 ("bench_kernels_site_stats.py", ["--geometry", "imagenet"]),
                 ("bench_kernels_reg_inverse.py", []),
                 ("bench_cuda_ops.py", [])]
    return [job for job in jobs if predictions or job[0] not in PREDICTIONS]


def rows_of(name: str) -> list[dict]:
    path = OUT / f"{name}.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def targets() -> list[dict]:
    out = []
    for r in rows_of("cfm_loss"):
        out.append({"target": "CFM loss fwd+bwd, obvious / ours", "setting": r["layout"], "value": r["speedup"],
                    "goal": ">= 4", "met": r["speedup"] >= 4})
    for r in rows_of("recover_step"):
        if r["variant"] == "cfm":
            out.append({"target": "recover step, CFM / SRe2L", "setting": f"{r['layout']} {r['precision']}",
                        "value": r["vs_sre2l"], "goal": "<= 1.15", "met": r["vs_sre2l"] <= 1.15})
            out.append({"target": "recover step, CFM / bare (CE only)", "setting": f"{r['layout']} {r['precision']}",
                        "value": r["vs_bare"], "goal": "(context)", "met": None})
    for r in rows_of("stats_pass"):
        out.append({"target": "stats pass / bare forward", "setting": r["layout"], "value": r["time_ratio"],
                    "goal": "<= 1.2", "met": r["time_ratio"] <= 1.2})
    for r in rows_of("roofline_step_bf16_totals"):
        out.append({"target": "PREDICTION H100 step, CFM / bare", "setting": r["geometry"],
                    "value": r["cfm_overhead_vs_bare"], "goal": "(prediction)", "met": None})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads for every benchmark (0: default)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, not for quoting)")
    parser.add_argument("--no-predictions", action="store_true",
                        help="leave out the roofline PREDICTION scripts (they measure nothing: for a short GPU session)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    start = time.perf_counter()
    ran = []
    for script, extra in plan(cuda, args.threads, args.quick, not args.no_predictions):
        print(f"\n=== {script} {' '.join(extra)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / script), *extra], cwd=HERE)
        ran.append({"script": script, "args": extra, "returncode": rc, "seconds": round(time.perf_counter() - t0, 1)})
        if rc:
            print(f"!!! {script} exited with {rc}", flush=True)
    print()
    summary = targets()
    report("summary", summary, ["target", "setting", "value", "goal", "met"],
           extra={"ran": ran, "total_seconds": round(time.perf_counter() - start, 1), "start_machine": machine()})
    return 1 if any(r["returncode"] for r in ran) else 0


if __name__ == "__main__":
    sys.exit(main())
