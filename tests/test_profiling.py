"""NVTX ranges, with and without the ``nvtx`` package (the GPU machine of bench/gpu_session.sh
has torch but not nvtx, and nothing can be installed there)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_package_runs_without_nvtx():
    # a fresh interpreter in which ``import nvtx`` fails, as where the package is not installed
    code = textwrap.dedent("""
        import sys
        sys.modules["nvtx"] = None
        import unidd_fast.pipeline.step, unidd_fast.real_stats, unidd_fast.pipeline.evaluate
        from unidd_fast import profiling
        assert not profiling.NVTX

        calls = []

        @profiling.annotate("decorated")
        def f(x):
            calls.append(x)
            return 2 * x

        with profiling.annotate("block", color="red"):
            assert f(3) == 6
        try:
            with profiling.annotate("raising"):
                raise KeyError("passes through")
        except KeyError:
            calls.append("raised")
        assert calls == [3, "raised"], calls
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_annotate_uses_nvtx_when_installed():
    from unidd_fast import profiling

    if not profiling.NVTX:  # the dependency is installed in this project's environment
        raise AssertionError("nvtx is a dependency of unidd_fast (pyproject.toml) but does not import here")

    @profiling.annotate("decorated")
    def f(x):
        return x + 1

    with profiling.annotate("block"):
        assert f(1) == 2
    assert type(profiling.annotate("x")).__module__.startswith("nvtx")
