"""csrc/*.cu compile with nvcc for Hopper (sm_90a) and Ampere (sm_80) with zero spills.

Compile-only: nothing here runs on a GPU (the build machines have none)."""
from pathlib import Path

import pytest

from unidd_fast.kernels.cuda import nvcc as cuda_build

ARCHES = ("sm_90a", "sm_80")
KERNELS = {"pack_kernel", "factor_kernel", "panel_kernel", "lauum_kernel", "psi_kernel"} | {
    f"{k}<{t}>" for k in ("gram_kernel", "mean_kernel", "pooled_kernel", "backward_kernel")
    for t in ("float", "__half", "__nv_bfloat16")}
FIELDS = {"kernel", "backend", "target", "ok", "registers", "spill_bytes", "shared_bytes", "tensor_cores"}

needs_nvcc = pytest.mark.skipif(
    cuda_build.find_tool("nvcc") is None or cuda_build.find_tool("cuobjdump") is None,
    reason="nvcc / cuobjdump not found (set CUDA_HOME): the CUDA sources cannot be compiled on this machine")


@pytest.fixture(scope="module")
def report():
    return cuda_build.compile_report(ARCHES)


@needs_nvcc
def test_every_kernel_compiles_for_every_target(report):
    assert [r for r in report if not r["ok"]] == []
    for arch in ARCHES:
        assert {r["kernel"] for r in report if r["target"] == arch} == KERNELS
    assert all(FIELDS <= set(r) and r["backend"] == "cuda" for r in report)


@needs_nvcc
def test_no_spills_and_two_blocks_per_sm_fit(report):
    for r in report:
        assert r["spill_bytes"] == 0, r
        # __launch_bounds__(256, 2): <= 128 registers; static shared memory under the 48 KiB limit
        assert 0 < r["registers"] <= 128, r
        assert r["shared_bytes"] <= 48 * 1024, r


@needs_nvcc
def test_tensor_core_column_matches_the_design(report):
    """The kernels accumulate in fp32 FMAs (docs/cuda.md); a tensor-core instruction
    appearing would mean the arithmetic is not what the accuracy claims assume."""
    assert all(r["tensor_cores"] == r["tensor_cores_expected"] for r in report)


@needs_nvcc
def test_a_broken_file_is_reported_not_raised(tmp_path):
    (tmp_path / "broken.cu").write_text("__global__ void k() { undeclared(); }\n")
    (rec,) = cuda_build.compile_report(("sm_80",), csrc=tmp_path)
    assert rec["ok"] is False and rec["kernel"] == "broken.cu" and "undeclared" in rec["error"]


def test_missing_nvcc_gives_a_clear_record(monkeypatch):
    monkeypatch.setattr(cuda_build, "find_tool", lambda name: None)
    recs = cuda_build.compile_report(ARCHES)
    assert recs and all(not r["ok"] and "nvcc" in r["error"] and "CUDA_HOME" in r["error"] for r in recs)


def test_only_the_binding_sees_torch():
    csrc = Path(cuda_build.CSRC)
    with_torch = {p.name for p in csrc.iterdir()
                  if any(h in p.read_text() for h in ("<torch/", "<ATen/", "<c10/"))}
    assert with_torch == {"bindings.cpp"}
