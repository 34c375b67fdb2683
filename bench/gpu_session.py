"""One prepared session on a borrowed GPU (issue 11 item 6): versions and API checks, the
doctor at real ResNet-18 / ResNet-50 shapes, the CUDA extension (built in the background
while the doctor runs), then the benchmarks, most valuable first, each under its own time
limit inside one budget, so that a timeout still leaves the earlier results. Run it through
``bash bench/gpu_session.sh`` (which tees the output to $OUT/log.txt); docs/cuda.md, "First
GPU session", says how to call it and where its numbers go.

    python bench/gpu_session.py [--device cuda|cpu] [--out DIR] [--budget S] [--only STEPS]
    python bench/gpu_session.py --probe [--probe-json FILE]   # versions and API checks only

What comes back from the device (at most 8 files, no sub-folders): log.txt (written by the
shell wrapper), session.json (environment, checks, every step's status and seconds), one
doctor_*.json per doctor step that finished, and session.tar.gz (the benchmarks' JSON, the
extension's build log).

``--device cpu`` is the dry run of the same steps at CPU-sized settings (no extension build,
the torch backend only), which tests the plumbing on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FILES = 8  # what the device tool brings back from $OUT
RESERVE_S = 20  # kept at the end of the budget to pack the results
KILL_GRACE_S = 10

# Per device: the whole budget (s), each doctor run (arch: image size, class-batch, a smaller
# class-batch tried when the first leaves no report), the doctor's repeats and backends, and
# whether the CUDA extension is built. The class-batches are those of the step predictions
# in bench/RESULTS.md (ResNet-18 b100, ResNet-50 b500, 224 px).
SETTINGS = {
    "cuda": {"budget": 480, "doctor": {"resnet18": (224, 100, None), "resnet50": (224, 500, 100)},
             "repeats": 5, "backends": "torch,triton", "build": True},
    "cpu": {"budget": 600, "doctor": {"resnet18": (32, 4, None), "resnet50": (32, 2, None)},
            "repeats": 1, "backends": "torch", "build": False},
}


@dataclasses.dataclass
class Step:
    """One command of the session: ``argv`` run in ``cwd`` (default the repository root) with
    ``env`` added, for at most ``cap`` seconds (less when the budget has less left; skipped
    when under ``minimum``). ``report``: the file under $OUT it writes (the doctor's JSON);
    ``needs``: "package" (unidd_fast importable) or "extension" (the built CUDA extension);
    ``fallback``: a Step to run instead when this one leaves no report."""

    name: str
    argv: list
    cap: float
    minimum: float = 15
    cwd: Path = ROOT
    env: dict = dataclasses.field(default_factory=dict)
    report: str | None = None
    needs: str | None = "package"
    fallback: "Step | None" = None


# ---------------------------------------------------------------- versions and API checks


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def dependencies() -> list[str]:
    """The distribution names of pyproject.toml's dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [re.match(r"[A-Za-z0-9_.-]+", dep).group(0) for dep in project["dependencies"]]


def _custom_op():
    import torch
    from torch._library.custom_ops import CustomOpDef

    missing = [name for name in ("register_fake", "register_autograd") if not hasattr(CustomOpDef, name)]
    ok = hasattr(torch.library, "custom_op") and not missing
    return ok, "torch.library.custom_op" + (f" lacks {missing}" if missing else "")


def _graph_generator():
    import torch

    ok = hasattr(torch.cuda.CUDAGraph, "register_generator_state")
    return ok, "torch.cuda.CUDAGraph.register_generator_state " + ("present" if ok else "missing")


def _capturable_adam():
    import torch

    ok = "capturable" in inspect.signature(torch.optim.Adam).parameters
    return ok, "torch.optim.Adam(capturable=...) " + ("accepted" if ok else "missing")


def _hook_guards():
    import torch._dynamo

    ok = hasattr(torch._dynamo.config, "skip_nnmodule_hook_guards")
    return ok, "torch._dynamo.config.skip_nnmodule_hook_guards " + ("present" if ok else "missing")


def _dot_precisions():
    from triton.backends.nvidia.compiler import CUDAOptions

    allowed = tuple(CUDAOptions.allowed_dot_input_precisions)
    missing = [p for p in ("tf32x3", "bf16x3", "ieee") if p not in allowed]
    return not missing, f"tl.dot input_precision on NVIDIA: {allowed}" + (f"; MISSING {missing}" if missing else "")


def _rounded_math():
    import triton.language as tl

    missing = [name for name in ("sqrt_rn", "div_rn") if not hasattr(tl.math, name)]
    return not missing, "tl.math.sqrt_rn / div_rn " + (f"missing {missing}" if missing else "present")


def _compile_report_internals():
    from triton.runtime import jit

    ok = hasattr(jit, "create_function_from_signature") and hasattr(jit.JITFunction, "_pack_args")
    return ok, "triton.runtime.jit.create_function_from_signature, JITFunction._pack_args " + (
        "present" if ok else "missing")


def _nvtx():
    ok = _version("nvtx") is not None
    return ok, "nvtx " + (_version("nvtx") if ok else "not installed: profiling.annotate marks nothing (harmless)")


def _install_tools():
    found = {dist: _version(dist) for dist in ("setuptools", "wheel", "pip")}
    major = int((found["setuptools"] or "0").split(".")[0])
    ok = major >= 68 and found["wheel"] is not None and found["pip"] is not None
    return ok, ", ".join(f"{k} {v}" for k, v in found.items())


def cuda_home() -> str:
    """$CUDA_HOME, else the toolkit of the ``nvcc`` on the PATH, else setup.py's default."""
    nvcc = shutil.which("nvcc")
    return os.environ.get("CUDA_HOME") or (str(Path(nvcc).resolve().parent.parent) if nvcc else "/usr/local/cuda")


def _build_tools():
    import torch

    nvcc = Path(cuda_home()) / "bin" / "nvcc"
    release = None
    if nvcc.is_file():
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
        match = re.search(r"release (\d+)\.(\d+)", out)
        release = match and f"{match.group(1)}.{match.group(2)}"
    ninja = shutil.which("ninja") or _version("ninja")
    same_major = bool(release and torch.version.cuda and release.split(".")[0] == torch.version.cuda.split(".")[0])
    return bool(same_major and ninja), f"nvcc {release or 'missing'} ({nvcc}), torch CUDA {torch.version.cuda}, " \
                                       f"ninja {'found' if ninja else 'missing'}"


# (what, the code that needs it, check() -> (ok, detail)); an import error is a failed check
CHECKS = [
    ("custom ops", "kernels/library.py (every fused op)", _custom_op),
    ("graph RNG", "pipeline/step.py (CUDA-graph capture)", _graph_generator),
    ("capturable Adam", "pipeline/step.py (CUDA graphs, capturable_adam)", _capturable_adam),
    ("dynamo hook guards", "pipeline/step.py (recover --compile)", _hook_guards),
    ("dot precisions", "kernels/triton (3xTF32 Gram and inverse, bf16x3 backward)", _dot_precisions),
    ("IEEE sqrt/div", "kernels/triton/reg_inverse.py (pivots)", _rounded_math),
    ("compile-report internals", "kernels/compile_report.py (unidd-fast kernels; not run here)",
     _compile_report_internals),
    ("nvtx", "unidd_fast/profiling.py (optional)", _nvtx),
    ("offline install", "pip install --no-deps --no-build-isolation -e . (where unidd_fast is not installed)",
     _install_tools),
    ("extension build", "setup.py UNIDD_BUILD_CUDA=1", _build_tools),
]


def run_checks(checks=CHECKS) -> list[dict]:
    rows = []
    for name, needed_by, check in checks:
        try:
            ok, detail = check()
        except Exception as exc:  # a module that is not there, an API that moved: a failed check, said so
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        rows.append({"check": name, "ok": bool(ok), "needed_by": needed_by, "detail": detail})
    return rows


def probe() -> dict:
    """Versions of everything the session depends on, the GPU, and ``run_checks``."""
    import platform

    import torch

    info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "packages": {dist: _version(dist) for dist in dependencies() + ["triton", "pytest"]}, "gpu": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                       "memory_gib": round(p.total_memory / 2**30, 1),
                       "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1), "count": torch.cuda.device_count()}
    for tool, args in (("nvcc", ["--version"]),
                       ("nvidia-smi", ["--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                                       "--format=csv,noheader"])):
        path = shutil.which(tool) or shutil.which(tool, path=str(Path(cuda_home()) / "bin"))
        try:
            info[tool] = subprocess.run([path, *args], capture_output=True, text=True, timeout=30).stdout.strip() \
                if path else None
        except (OSError, subprocess.TimeoutExpired) as exc:
            info[tool] = f"failed: {exc}"
    info["checks"] = run_checks()
    return info


def versions_text(info: dict) -> str:
    packages = info["packages"]
    lines = [f"python {info['python']} ({info['executable']}), {info['platform']}",
             f"torch {info['torch']} (CUDA {info['torch_cuda']}, cuDNN {info['cudnn']}), triton {packages['triton']}, "
             f"torchvision {packages['torchvision']}, numpy {packages['numpy']}",
             f"not installed: {sorted(k for k, v in packages.items() if v is None) or 'none'}",
             f"gpu: {info['gpu']}", f"nvidia-smi: {info['nvidia-smi'] or 'not found'}",
             f"nvcc: {(re.findall(r'release .*', info['nvcc'] or '') or ['not found'])[0]}"]
    return "\n".join(lines)


def check_table(checks: list[dict]) -> str:
    lines = [f"{'check':26} {'ok':4} detail (needed by)"]
    lines += [f"{row['check']:26} {'yes' if row['ok'] else 'NO':4} {row['detail']} ({row['needed_by']})"
              for row in checks]
    return "\n".join(lines)


# ---------------------------------------------------------------- the plan


def doctor_step(python, arch, image, batch, settings, out: Path, backends, suffix, cap) -> Step:
    name = f"doctor_{arch}{suffix}"
    report = f"{name}.json"
    argv = [python, "-m", "unidd_fast", "doctor", "--device", settings["device"], "--arch", arch,
            "--image-size", str(image), "--batch", str(batch), "--repeats", str(settings["repeats"]),
            "--backends", backends, "--json", str(out / report)]
    if backends == "cuda":  # times of one backend alone would make up auto's whole measured order
        return Step(name, argv + ["--no-cache"], cap, report=report, needs="extension")
    return Step(name, argv, cap, report=report)


def plan(device: str, python: str, out: Path, work: Path, budget: float | None = None) -> tuple[dict, list[Step]]:
    """(settings, steps in the order they run). The extension build is the one step that runs
    in the background (``name == "build_extension"``), from the start, while the doctor runs;
    it comes after the install (without which every step that would use it is skipped)."""
    settings = dict(SETTINGS[device], device=device)
    if budget is not None:
        settings["budget"] = budget
    steps = [Step("probe", [python, str(Path(__file__).resolve()), "--probe", "--probe-json", str(work / "probe.json")],
                  90, needs=None)]
    if settings["build"]:
        # the interpreter's bin first on the PATH: ninja comes as a Python package there
        env = {"UNIDD_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0a", "MAX_JOBS": "8", "CUDA_HOME": cuda_home(),
               "PATH": f"{Path(python).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        steps.append(Step("build_extension", [python, "setup.py", "build_ext", "--build-lib", str(work / "ext"),
                                              "--build-temp", str(work / "ext_tmp")], 300, env=env))
    for arch, (image, batch, smaller) in settings["doctor"].items():
        step = doctor_step(python, arch, image, batch, settings, out, settings["backends"], "", cap=180)
        if smaller:
            step.fallback = doctor_step(python, arch, image, smaller, settings, out, settings["backends"],
                                        f"_b{smaller}", cap=120)
        steps.append(step)
    if settings["build"]:
        for arch, (image, batch, smaller) in settings["doctor"].items():
            steps.append(doctor_step(python, arch, image, smaller or batch, settings, out, "cuda", "_cuda", cap=90))
    steps.append(Step("benchmarks", [python, "run_all.py", "--quick", "--no-predictions"], 600, minimum=30,
                      cwd=ROOT / "bench", env={"UNIDD_BENCH_OUT": str(work / "bench_out")}))
    return settings, steps


def returned_files(steps: list[Step]) -> list[str]:
    """Every file the session leaves under $OUT, at most: log.txt, session.json, the doctor
    reports and session.tar.gz."""
    reports = [s.report for s in steps if s.report] + [s.fallback.report for s in steps if s.fallback]
    return ["log.txt", "session.json", *dict.fromkeys(reports), "session.tar.gz"]


# ---------------------------------------------------------------- running it


def say(text: str) -> None:
    print(f"[gpu_session {time.strftime('%H:%M:%S')}] {text}", flush=True)


def _stop(proc: subprocess.Popen) -> None:
    """End ``proc`` and everything it started (it leads its own process group)."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def start(step: Step, log=None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **step.env)
    return subprocess.Popen(step.argv, cwd=step.cwd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None,
                            start_new_session=True)


def finish(proc: subprocess.Popen, limit: float) -> tuple[int, bool]:
    """(return code, timed out): wait at most ``limit`` seconds, then stop it (rc 124)."""
    try:
        return proc.wait(timeout=max(limit, 0)), False
    except subprocess.TimeoutExpired:
        _stop(proc)
        return 124, True


def package_importable(python: str) -> tuple[bool, str]:
    """(whether ``python``, outside the repository root, imports ``unidd_fast`` and
    ``unidd_fast.kernels`` from this checkout; where from, or the import's error)."""
    code = "import unidd_fast, unidd_fast.kernels; print(unidd_fast.__file__)"
    out = subprocess.run([python, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    if out.returncode != 0 or not out.stdout.strip():
        return False, (out.stderr.strip().splitlines() or ["no output"])[-1]
    where = out.stdout.strip().splitlines()[-1]
    return Path(where).resolve().is_relative_to(ROOT), where


def ensure_package(python: str) -> tuple[bool, str]:
    """unidd_fast importable from this checkout: already (an editable install of it), or after
    an offline editable install without dependencies (the GPU machine has torch and the rest,
    and cannot download anything)."""
    ok, where = package_importable(python)
    if ok:
        return True, f"unidd_fast already importable from {where}"
    say(f"unidd_fast is not importable from this checkout ({where})")
    cmd = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(ROOT)]
    say("installing this checkout without dependencies: " + " ".join(cmd[1:]))
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    ok, where = package_importable(python)
    if ok:
        return True, f"installed (editable, no dependencies) from {ROOT}"
    return False, f"still not importable ({where}); pip rc {done.returncode}: {(done.stderr or done.stdout)[-1500:]}"


def install_extension(work: Path) -> str | None:
    """Copy the built ``unidd_fast._cuda`` into the package (never over one this session did
    not build). Returns the installed path, or None."""
    built = sorted((work / "ext" / "unidd_fast").glob("_cuda*.so"))
    if not built:
        return None
    target = ROOT / "unidd_fast" / built[0].name
    if target.exists():
        say(f"{target} exists already (not built by this session): left alone, and used as it is")
        return str(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.copy2(built[0], tmp)
    os.replace(tmp, target)
    return str(target)


def tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def pack(out: Path, work: Path) -> None:
    """session.tar.gz: the benchmarks' JSON and the extension's build log."""
    tmp = out / "session.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for name in ("bench_out", "build_extension.log"):
            if (work / name).exists():
                tar.add(work / name, arcname=name)
    os.replace(tmp, out / "session.tar.gz")


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def summary_table(rows: list[dict]) -> str:
    lines = [f"{'step':26} {'status':10} {'rc':>4} {'seconds':>8}  note"]
    for r in rows:
        rc = "" if r.get("rc") is None else str(r["rc"])
        lines.append(f"{r['step']:26} {r['status']:10} {rc:>4} {r.get('seconds', 0):8.1f}  {r.get('note', '')}")
    return "\n".join(lines)


def run_session(device: str, out: Path, python: str, budget: float | None, only: set | None) -> int:
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gpu_session-"))  # builds and benchmark output, packed at the end
    settings, steps = plan(device, python, out, work, budget)
    deadline = t0 + settings["budget"]
    assert len(returned_files(steps)) <= MAX_FILES, returned_files(steps)
    rows: list[dict] = []
    session = {"device": device, "settings": {k: v for k, v in settings.items()}, "steps": rows}
    say(f"device {device}, budget {settings['budget']:.0f} s, out {out}, work {work}, python {python}")

    def record(step, status, rc=None, seconds=0.0, note=""):
        rows.append({"step": step.name, "status": status, "rc": rc, "seconds": round(seconds, 1), "note": note,
                     "argv": step.argv, "report": step.report})
        write_json(out / "session.json", session)

    def left() -> float:
        return deadline - time.monotonic() - RESERVE_S

    package_ok, build, build_log = None, None, None
    for step in steps:
        if only is not None and step.name not in only:
            continue
        if step.needs in ("package", "extension") and package_ok is None:
            ok, note = ensure_package(python)
            package_ok = ok
            say(note)
            session["install"] = note
        if step.needs in ("package", "extension") and not package_ok:
            record(step, "skipped", note="unidd_fast is not importable (see 'install' in session.json)")
            continue
        if step.needs == "extension":
            if build is not None:
                wait = min(build[1].cap - (time.monotonic() - build[2]), left() - step.minimum)
                say(f"waiting for the extension build (at most {max(wait, 0):.0f} s)")
                rc, timed_out = finish(build[0], wait)
                record(build[1], "timeout" if timed_out else "ok" if rc == 0 else "failed", rc,
                       time.monotonic() - build[2], "log: build_extension.log in session.tar.gz")
                say("extension build log (end):\n" + tail(work / "build_extension.log"))
                build = None
                session["extension"] = install_extension(work) if rc == 0 else None
            if not session.get("extension"):
                record(step, "skipped", note="the CUDA extension was not built")
                continue
        limit = min(step.cap, left())
        if limit < step.minimum:
            record(step, "skipped", note=f"{max(left(), 0):.0f} s of the budget left, needs {step.minimum:.0f}")
            continue
        if step.name == "build_extension":
            build_log = open(work / "build_extension.log", "w")
            say(f"starting in the background: {' '.join(step.argv)} ({step.env})")
            build = (start(step, build_log), step, time.monotonic())
            continue
        while step is not None:
            say(f"{step.name}: {' '.join(step.argv)}  (limit {limit:.0f} s)")
            began = time.monotonic()
            rc, timed_out = finish(start(step), limit)
            seconds = time.monotonic() - began
            wrote = step.report is not None and (out / step.report).is_file()
            status = "timeout" if timed_out else "ok" if rc == 0 else "failed"
            note = "" if not step.report else f"wrote {step.report}" if wrote else "no report"
            if step.report and rc == 1 and wrote:
                note += " (some check failed: see its table)"
            record(step, status, rc, seconds, note)
            say(f"{step.name}: {status} (rc {rc}) after {seconds:.1f} s")
            if step.report and not wrote and step.fallback is not None and left() >= step.fallback.minimum:
                step, limit = step.fallback, min(step.fallback.cap, left())
            else:
                step = None
        if rows and rows[-1]["step"] == "probe" and (work / "probe.json").is_file():
            session["environment"] = json.loads((work / "probe.json").read_text())
            failed = [row["check"] for row in session["environment"]["checks"] if not row["ok"]]
            rows[-1]["note"] = f"checks failed: {', '.join(failed)}" if failed else "every check passed"
            write_json(out / "session.json", session)
    if build is not None:  # nothing needed it (--only): let it finish within its limit and the budget
        rc, timed_out = finish(build[0], min(build[1].cap - (time.monotonic() - build[2]), left()))
        record(build[1], "timeout" if timed_out else "ok" if rc == 0 else "failed", rc, time.monotonic() - build[2])
    if build_log is not None:
        build_log.close()
    pack(out, work)
    shutil.rmtree(work, ignore_errors=True)  # this session's own temporary folder, packed above
    session["seconds"] = round(time.monotonic() - t0, 1)
    write_json(out / "session.json", session)
    say(f"done in {session['seconds']:.0f} s; files under {out}: {sorted(p.name for p in out.iterdir())}")
    print(summary_table(rows), flush=True)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=tuple(SETTINGS), default=os.environ.get("GPU_SESSION_DEVICE", "cuda"))
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="where the results go ($OUT)")
    parser.add_argument("--budget", type=float, help="seconds for the whole session (default: per device)")
    parser.add_argument("--only", help="comma-separated step names (default: every step)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter of every step")
    parser.add_argument("--probe", action="store_true", help="print versions and API checks, run nothing")
    parser.add_argument("--probe-json", type=Path, help="with --probe: also write them to this JSON file")
    args = parser.parse_args(argv)
    if args.probe:
        info = probe()
        if args.probe_json:
            write_json(args.probe_json, info)
        print(versions_text(info))
        print(check_table(info["checks"]))
        return 0
    if args.out is None:
        parser.error("--out (or $OUT) is required")
    args.out.mkdir(parents=True, exist_ok=True)
    only = None if not args.only else {s.strip() for s in args.only.split(",") if s.strip()}
    return run_session(args.device, args.out.resolve(), args.python, args.budget, only)


if __name__ == "__main__":
    sys.exit(main())
