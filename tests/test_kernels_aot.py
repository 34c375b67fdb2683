"""The AOT report: every Triton kernel configuration the launchers pick compiles for sm_90
(no GPU needed), spills nothing, and uses tensor cores where it has a tl.dot."""
import json
import os
import subprocess
import sys

from triton.runtime.jit import KernelInterface

from unidd_fast.kernels.triton import reg_inverse, site_stats


def jit_kernels(*modules):
    return {name for m in modules for name, obj in vars(m).items()
            if name.endswith("_kernel") and isinstance(obj, KernelInterface)}


def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    out = tmp_path / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "unidd_fast.kernels.compile_report", "--target", "sm_90", "--json", str(out),
                           "--skip-cuda"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert {r["kernel"] for r in records} == jit_kernels(site_stats, reg_inverse)
    for r in records:
        assert set(r) >= {"kernel", "backend", "target", "ok", "registers", "spill_bytes", "shared_bytes", "tensor_cores"}
        assert r["backend"] == "triton" and r["target"] == "sm_90"
        assert r["ok"], r
        assert r["spill_bytes"] == 0, r
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] <= 227 * 1024, r
        if r["tensor_cores_expected"]:
            assert r["tensor_cores"], r
    # every dtype the launchers accept was compiled
    assert {r["variant"].split(",")[0] for r in records if r["kernel"] == "_site_stats_fwd_kernel"} == \
        {"x_ptr=*fp32", "x_ptr=*bf16", "x_ptr=*fp16", "x_ptr=*fp64"}
