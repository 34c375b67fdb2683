"""The AOT report: every Triton kernel configuration the launchers pick compiles for sm_90
(no GPU needed), spills nothing, and uses tensor cores where it has a tl.dot; every launch
is set against the SM count; the ImageNet matrix comes from the torchvision models."""
import json
import os
import subprocess
import sys

import pytest
import torch
from triton.runtime.jit import KernelInterface

from unidd_fast.kernels import compile_report as aot
from unidd_fast.kernels.triton import reg_inverse, site_stats


def jit_kernels(*modules):
    return {name for m in modules for name, obj in vars(m).items()
            if name.endswith("_kernel") and isinstance(obj, KernelInterface)}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "unidd_fast.kernels.compile_report", "--target", "sm_90", "--json", str(out),
                           "--skip-cuda", "--sms", "132"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_kernel_compiles_for_sm90_without_spills(report):
    records = report[0]["compiled"]
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


def test_graph_safe_beta_pointer_single_chunk_finalize_and_backward_operands(report):
    variants = {(r["kernel"], r["variant"]) for r in report[0]["compiled"]}
    # fp32 matrices with the 0-d float64 β tensor of CFMLoss.make_graph_safe
    assert any(k == "_chol_kernel" and "a_ptr=*fp32" in v and "beta_ptr=*fp64" in v and "BETA_PTR=True" in v
               for k, v in variants)
    # Triton specialises an integer argument equal to 1: the single-chunk finalize is its own kernel
    assert any(k == "_site_stats_finalize_kernel" and "chunks=1" in v for k, v in variants)
    assert {v.split("GRAD_PRECISION=")[1].split(",")[0] for k, v in variants if k == "_site_stats_bwd_kernel"} == \
        {"ieee", "bf16x3"}
    # the forward Gram: bf16 maps in four bf16 passes, fp32/fp16 in 3xTF32, fp64 exact
    assert {v.split("DOT_PRECISION=")[1].split(",")[0] for k, v in variants if k == "_site_stats_fwd_kernel"} == \
        {"ieee", "tf32x3", "bf16x4"}


def test_every_launch_is_set_against_the_sm_count(report):
    data, stdout = report
    launches, compiled = data["launches"], data["compiled"]
    assert launches and {r["kernel"] for r in launches} <= {r["kernel"] for r in compiled}
    for r in launches:
        programs = 1
        for g in r["grid"]:
            programs *= g
        assert r["programs"] == programs
        assert r["sm_fraction"] == min(programs, 132) / 132
        assert r["low_occupancy"] == (r["sm_fraction"] < aot.LOW_SM_FRACTION)
        assert r["blocks_per_sm"] >= 1 and r["waves"] == pytest.approx(programs / (132 * r["blocks_per_sm"]))
    # the default report holds what ResNet-18 launches at class-batch 100 (bf16, channels_last):
    # one program per matrix in the Cholesky kernel, 5 of 132 SMs, is flagged
    chol = [r for r in launches if r["kernel"] == "_chol_kernel"]
    assert chol and all(r["programs"] == 5 and r["low_occupancy"] for r in chol)
    assert {r["example"].split()[0] for r in launches} == {"resnet18"}
    summary = data["summary"]
    assert summary["failed"] == 0 and summary["specialisations"] == len(compiled)
    assert summary["low_occupancy_launches"] == sum(r["low_occupancy"] for r in launches)
    assert f"{summary['specialisations']} specialisations" in stdout and "LOW" in stdout


def test_imagenet_sites_come_from_the_torchvision_models():
    shapes18, widths18 = aot.imagenet_sites("resnet18")
    assert widths18 == {64: 5, 128: 5, 256: 5, 512: 5}
    assert {(64, 112, 112), (512, 7, 7)} <= set(shapes18)
    shapes50, widths50 = aot.imagenet_sites("resnet50")
    assert sorted(widths50) == [64, 128, 256, 512, 1024, 2048] and widths50[2048] == 4 and sum(widths50.values()) == 53
    assert (2048, 7, 7) in shapes50 and (1024, 14, 14) in shapes50


def test_imagenet_matrix_covers_batches_dtypes_layouts_and_float64_inverses():
    cases = list(aot.imagenet_cases(("resnet18",)))
    stats = [args for _, kind, args in cases if kind == "stats"]
    assert {a[0] for a in stats} == set(aot.IMAGENET_BATCHES)
    assert {a[4] for a in stats} == {torch.bfloat16, torch.float32}
    assert {a[5] for a in stats} == {torch.channels_last, torch.contiguous_format}
    assert len(stats) == 4 * 2 * 2 * len(aot.imagenet_sites("resnet18")[0])
    inverses = [args for _, kind, args in cases if kind == "inverse"]
    assert {(a[0], a[1], a[2]) for a in inverses} == {(5, d, t) for d in (64, 128, 256, 512)
                                                      for t in (torch.float32, torch.float64)}


def test_blocks_per_sm_follow_the_occupancy_rules():
    assert aot.blocks_per_sm(128, 0, 8, 90) == 2  # registers: 65536 / (128·32·8)
    assert aot.blocks_per_sm(32, 0, 4, 90) == 16  # warps: 64 / 4
    assert aot.blocks_per_sm(40, 99328, 4, 90) == 2  # shared memory: 228 KiB / (97 + 1) KiB
    assert aot.blocks_per_sm(40, 99328, 4, 80) == 1  # an A100 holds less
    assert aot.blocks_per_sm(None, None, 4, 90) is None


def test_the_target_reaches_the_cuda_part(monkeypatch):
    from unidd_fast.kernels.cuda import nvcc

    seen = []
    monkeypatch.setattr(nvcc, "compile_report", lambda arches: seen.append(arches) or [])
    aot.cuda_compiled("sm_80")
    assert seen == [("sm_80",)]


@pytest.mark.parametrize("argv,message", [(["--sms", "0"], "--sms must be a positive SM count"),
                                          (["--target", "hopper"], "--target must look like sm_90")])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        aot.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
