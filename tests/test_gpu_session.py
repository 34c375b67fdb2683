"""bench/gpu_session.py, the prepared GPU session: its plan (steps, arguments, order, what
comes back within the device tool's limits), the API checks, and the runner's plumbing
(time limits that stop a whole process group, a fallback when a step leaves no report,
steps skipped for want of the extension or of time) on tiny stand-in commands; and the
real script's first step, the probe, through bench/gpu_session.sh."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"[A-Za-z0-9._-]+")


@pytest.fixture(scope="module")
def gs():
    spec = importlib.util.spec_from_file_location("gpu_session", ROOT / "bench" / "gpu_session.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _arg(argv, flag):
    return argv[argv.index(flag) + 1]


def test_cuda_plan_order_arguments_and_returned_files(gs, tmp_path):
    settings, steps = gs.plan("cuda", "/py", tmp_path / "out", tmp_path / "work")
    names = [s.name for s in steps]
    assert names == ["probe", "build_extension", "doctor_resnet18", "doctor_resnet50", "doctor_resnet18_cuda",
                     "doctor_resnet50_cuda", "benchmarks"]
    by = {s.name: s for s in steps}
    for name, image, batch, backends in (("doctor_resnet18", "224", "100", "torch,triton"),
                                         ("doctor_resnet50", "224", "500", "torch,triton"),
                                         ("doctor_resnet50_cuda", "224", "100", "cuda")):
        argv = by[name].argv
        assert argv[:4] == ["/py", "-m", "unidd_fast", "doctor"]
        assert (_arg(argv, "--device"), _arg(argv, "--image-size"), _arg(argv, "--batch"),
                _arg(argv, "--backends")) == ("cuda", image, batch, backends)
        assert _arg(argv, "--json") == str(tmp_path / "out" / by[name].report)
    fallback = by["doctor_resnet50"].fallback
    assert fallback.name == "doctor_resnet50_b100" and _arg(fallback.argv, "--batch") == "100"
    assert by["doctor_resnet18_cuda"].needs == "extension" and by["doctor_resnet18"].needs == "package"
    assert "--no-cache" in by["doctor_resnet18_cuda"].argv and "--no-cache" not in by["doctor_resnet18"].argv
    build = by["build_extension"]
    assert build.env["UNIDD_BUILD_CUDA"] == "1" and _arg(build.argv, "--build-lib") == str(tmp_path / "work" / "ext")
    assert build.env["PATH"].startswith("/" + os.pathsep) and Path(build.env["CUDA_HOME"]).is_absolute()
    bench = by["benchmarks"]
    assert bench.argv[1:] == ["run_all.py", "--quick", "--no-predictions"] and bench.cwd == ROOT / "bench"
    assert bench.env["UNIDD_BENCH_OUT"] == str(tmp_path / "work" / "bench_out")
    files = gs.returned_files(steps)
    assert len(files) <= gs.MAX_FILES and len(set(files)) == len(files)
    assert all(NAME.fullmatch(f) for f in files) and "log.txt" in files
    assert settings["budget"] + gs.KILL_GRACE_S + 30 <= 540  # ends inside timeout_s 540 (the command's 600 s limit)


def test_cpu_plan_is_the_dry_run(gs, tmp_path):
    settings, steps = gs.plan("cpu", "/py", tmp_path, tmp_path, budget=123)
    assert settings["budget"] == 123 and not settings["build"]
    assert [s.name for s in steps] == ["probe", "doctor_resnet18", "doctor_resnet50", "benchmarks"]
    for step in steps[1:3]:
        assert _arg(step.argv, "--device") == "cpu" and _arg(step.argv, "--backends") == "torch"
        assert int(_arg(step.argv, "--image-size")) <= 32 and int(_arg(step.argv, "--batch")) <= 4


def test_dependencies_are_read_from_pyproject(gs):
    deps = gs.dependencies()
    assert "torch" in deps and "nvtx" in deps and "scikit-learn" in deps
    assert all(NAME.fullmatch(d) for d in deps)


def test_api_checks_pass_here_and_name_what_is_missing(gs, monkeypatch):
    rows = {r["check"]: r for r in gs.run_checks()}
    assert set(rows) == {name for name, _, _ in gs.CHECKS}
    for name in ("custom ops", "graph RNG", "capturable Adam", "dynamo hook guards", "dot precisions",
                 "IEEE sqrt/div", "compile-report internals"):
        assert rows[name]["ok"], rows[name]
    from triton.backends.nvidia.compiler import CUDAOptions

    monkeypatch.setattr(CUDAOptions, "allowed_dot_input_precisions", ("tf32", "tf32x3", "ieee"))
    row = {r["check"]: r for r in gs.run_checks()}["dot precisions"]
    assert not row["ok"] and "MISSING ['bf16x3']" in row["detail"]

    def broken():
        raise ImportError("no module named 'triton.backends.nvidia'")

    [row] = gs.run_checks([("broken", "somewhere", broken)])
    assert not row["ok"] and row["detail"].startswith("ImportError: no module named")


def _python_step(gs, name, code, cap=60, report=None, fallback=None, needs=None):
    return gs.Step(name, [sys.executable, "-c", code], cap, minimum=1, report=report, needs=needs, fallback=fallback)


def test_runner_fallback_skips_and_records(gs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    write = f"import pathlib; pathlib.Path({str(out / 'doctor_small.json')!r}).write_text('{{}}')"
    steps = [
        _python_step(gs, "doctor_big", "raise SystemExit(3)", report="doctor_big.json",
                     fallback=_python_step(gs, "doctor_small", write, report="doctor_small.json")),
        _python_step(gs, "doctor_cuda", "print('never runs')", needs="extension"),
        _python_step(gs, "plain", "print('ran')"),
    ]
    monkeypatch.setattr(gs, "plan", lambda *a, **k: ({"budget": 300, "build": False}, steps))
    monkeypatch.setattr(gs, "ensure_package", lambda python: (True, "importable (stand-in)"))
    rc = gs.run_session("cpu", out, sys.executable, None, None)
    session = json.loads((out / "session.json").read_text())
    got = [(r["step"], r["status"], r["rc"], r["note"]) for r in session["steps"]]
    assert got == [("doctor_big", "failed", 3, "no report"), ("doctor_small", "ok", 0, "wrote doctor_small.json"),
                   ("doctor_cuda", "skipped", None, "the CUDA extension was not built"), ("plain", "ok", 0, "")]
    assert rc == 1  # not every step ran cleanly
    assert (out / "session.tar.gz").is_file()


def test_runner_skips_a_step_the_budget_cannot_hold(gs, tmp_path, monkeypatch):
    steps = [_python_step(gs, "late", "print('never runs')")]
    monkeypatch.setattr(gs, "plan", lambda *a, **k: ({"budget": gs.RESERVE_S, "build": False}, steps))
    gs.run_session("cpu", tmp_path, sys.executable, None, None)
    [row] = json.loads((tmp_path / "session.json").read_text())["steps"]
    assert row["status"] == "skipped" and "of the budget left" in row["note"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_a_step_past_its_limit_is_stopped_with_its_children(gs, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    # the step starts a grandchild that would outlive it, then both wait forever
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(3600)")
    proc = gs.start(_python_step(gs, "hangs", code))
    while not pid_file.is_file() or not pid_file.read_text():
        assert proc.poll() is None
        time.sleep(0.05)
    rc, timed_out = gs.finish(proc, 0.5)
    assert (rc, timed_out) == (124, True) and proc.poll() is not None
    grandchild = int(pid_file.read_text())
    for _ in range(200):  # the group was signalled; wait for the grandchild's exit to show
        if not _alive(grandchild):
            break
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_shell_wrapper_dry_run_of_the_probe(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_SESSION_DEVICE="cpu")
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "--only", "probe"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "session.json", "session.tar.gz"]
    session = json.loads((out / "session.json").read_text())
    [row] = session["steps"]
    assert row["step"] == "probe" and row["status"] == "ok"
    env_info = session["environment"]
    assert env_info["torch"] and env_info["packages"]["triton"] and env_info["gpu"] is None
    log = (out / "log.txt").read_text()
    assert "dot precisions" in log and "probe: ok" in log


def test_background_build_then_the_steps_that_need_it(gs, tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / "unidd_fast").mkdir(parents=True)
    monkeypatch.setattr(gs, "ROOT", root)
    monkeypatch.setattr(gs, "ensure_package", lambda python: (True, "importable (stand-in)"))
    out = tmp_path / "out"
    out.mkdir()

    def steps(device, python, out_dir, work, budget=None):
        so = work / "ext" / "unidd_fast" / "_cuda.test.so"
        build = _python_step(gs, "build_extension",
                             f"import pathlib; p = pathlib.Path({str(so)!r}); p.parent.mkdir(parents=True); "
                             "p.write_text('built')")
        installed = root / "unidd_fast" / "_cuda.test.so"
        check = f"import pathlib; assert pathlib.Path({str(installed)!r}).read_text() == 'built'"
        return {"budget": 300, "build": True}, [build, _python_step(gs, "doctor_cuda", check, needs="extension")]

    monkeypatch.setattr(gs, "plan", steps)
    assert gs.run_session("cuda", out, sys.executable, None, None) == 0
    session = json.loads((out / "session.json").read_text())
    assert [(r["step"], r["status"]) for r in session["steps"]] == [("build_extension", "ok"), ("doctor_cuda", "ok")]
    assert session["extension"] == str(root / "unidd_fast" / "_cuda.test.so")

    # an extension this session did not build is never overwritten
    (root / "unidd_fast" / "_cuda.test.so").write_text("someone else's")
    assert gs.run_session("cuda", out, sys.executable, None, None) == 1  # doctor_cuda's assertion fails
    assert (root / "unidd_fast" / "_cuda.test.so").read_text() == "someone else's"


def test_cuda_home_follows_the_nvcc_on_the_path(gs, tmp_path, monkeypatch):
    nvcc = tmp_path / "toolkit" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(nvcc.parent))
    assert gs.cuda_home() == str((tmp_path / "toolkit").resolve())
    monkeypatch.setenv("CUDA_HOME", "/opt/cuda-x")
    assert gs.cuda_home() == "/opt/cuda-x"
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gs.cuda_home() == "/usr/local/cuda"  # setup.py's default


def test_the_session_benchmarks_are_the_gpu_ones_without_predictions(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # run_all imports bench/common.py
    spec = importlib.util.spec_from_file_location("run_all_for_test", ROOT / "bench" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    jobs = run_all.plan(cuda=True, threads=0, quick=True, predictions=False)
    scripts = [script for script, _ in jobs]
    assert not set(scripts) & set(run_all.PREDICTIONS)
    for script in ("bench_kernels_site_stats.py", "bench_kernels_reg_inverse.py", "bench_cuda_ops.py"):
        assert script in scripts
    assert ("bench_ops.py", ["--geometry", "imagenet", "--device", "cuda"]) in jobs
    assert all("--device" not in args or args[args.index("--device") + 1] == "cuda" for _, args in jobs)
    assert {s for s, _ in run_all.plan(cuda=False, threads=0, quick=True)} >= set(run_all.PREDICTIONS)
