"""The H100 roofline model (unidd_fast/roofline/): one model for `unidd-fast plan` and the
bench tables, for any teacher the pipeline builds. PREDICTIONS: these tests check its
bookkeeping and its monotone properties, not a GPU."""
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torchvision

from unidd_fast.pipeline import config, plan
from unidd_fast.pipeline.models import build_model
from unidd_fast.roofline.step import full_step, stats_pass_seconds, step_totals, train_step_seconds
from unidd_fast.roofline.teacher import teacher_layers
from unidd_fast.sites import site_input_shapes

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _with(cfg, **recover):
    return dataclasses.replace(cfg, recover=dataclasses.replace(cfg.recover, **recover))


@pytest.mark.parametrize("dataset, arch, recover, expect", [
    ("digits", "convnet", {}, ("bf16", True, "bn", "cfm_step_us")),
    ("cifar10", "resnet18", dict(loss="sre2l", precision="fp32", cuda_graphs="off", sites="conv"),
     ("fp32", False, "bn", "sre2l_step_us")),
    ("cifar100", "convnet", dict(sites="conv", cuda_graphs="off", batch_size=300), ("bf16", False, "conv", "cfm_step_us")),
    ("cifar10", "convnet", dict(loss="none"), ("bf16", True, "bn", "bare_step_us")),
])
def test_plan_recover_step_is_the_full_step_total(dataset, arch, recover, expect):
    """plan's per-step recover PREDICTION is full_step's total for the configured loss, with the
    real teacher, its sites (SRe2L: the BatchNorm inputs), the precision and CUDA-graph mode
    recover resolves on CUDA, and a class-batch capped at the class count."""
    cfg = _with(dataclasses.replace(config.defaults(dataset), model=dataclasses.replace(
        config.defaults(dataset).model, arch=arch)), **recover)
    d, classes = cfg.data, {"digits": 10, "cifar10": 10, "cifar100": 100}[dataset]
    teacher = build_model(arch, classes, d.image_size, d.channels, cfg.model.width, cfg.model.depth)
    dtype, graphs, sites, key = expect
    shapes = site_input_shapes(teacher, sites, (d.channels, d.image_size, d.image_size))
    rows = full_step(teacher, shapes, min(cfg.recover.batch_size, classes), dtype, d.image_size, d.channels,
                     classes, graphs)
    assert plan.h100_recover_step(cfg, teacher, classes) == pytest.approx(step_totals(rows, "x")[key] * 1e-6,
                                                                         rel=1e-12)


def test_full_step_orders_the_steps_and_bf16_is_faster_at_imagenet_scale():
    """ResNet-18, 224 px, class-batch 500: bare step > 0, CFM and SRe2L add to it, bf16 beats fp32."""
    r18 = torchvision.models.resnet18()
    sites = site_input_shapes(r18, "bn", (3, 224, 224))
    t = {dt: step_totals(full_step(r18, sites, 500, dt, 224), dt) for dt in ("bf16", "fp32")}
    assert 0 < t["bf16"]["bare_step_us"] < t["bf16"]["sre2l_step_us"] < t["bf16"]["cfm_step_us"]
    assert t["bf16"]["cfm_step_us"] < t["fp32"]["cfm_step_us"] and t["bf16"]["teacher_us"] < t["fp32"]["teacher_us"]
    # the model's per-layer counts: ResNet-50's Bottleneck residual adds and its 4.1 GMACs per image
    layers = teacher_layers(torchvision.models.resnet50(), 224, 1, "bf16")
    assert sum(layer["layer"] == "residual add" for layer in layers) == 16
    assert 7.5e9 < sum(layer["fwd"][0] for layer in layers) < 8.5e9


def test_every_step_grows_with_its_batch_for_a_small_teacher_and_graphs_pick_the_inverse():
    teacher = build_model("convnet", 10, 32, 3, width=64, depth=3)
    sites = list(site_input_shapes(teacher, "bn", (3, 32, 32)).values())
    small, large = (step_totals(full_step(teacher, sites, b, "fp32", 32, num_classes=10), "") for b in (10, 100))
    for key in ("teacher_us", "update_us", "cfm_us", "sre2l_us", "cfm_step_us"):
        assert small[key] < large[key], key
    # graphs off: the batched CUDA inverse instead of float64 cuSOLVER per matrix
    inverses = {g: [r["name"] for r in full_step(teacher, sites, 10, "fp32", 32, graphs=g) if "inverse fwd" in r["name"]]
                for g in (True, False)}
    assert inverses == {True: ["inverse fwd, float64, cuSOLVER (torch), per width, 3 sites"],
                        False: ["inverse fwd, batched (CUDA), 3 sites"]}
    assert stats_pass_seconds(teacher, (), 64, "fp32", 32) < stats_pass_seconds(teacher, sites, 64, "fp32", 32)
    assert stats_pass_seconds(teacher, (), 64, "fp32", 32) < train_step_seconds(teacher, 64, "fp32", 32)


def test_the_bench_step_table_is_the_package_model(tmp_path, monkeypatch):
    """bench/roofline_step.py prints and writes full_step's totals (the same model, no copy)."""
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("common", "roofline_step"):
        sys.modules.pop(name, None)
    import common
    import roofline_step

    monkeypatch.setattr(common, "OUT", tmp_path)
    monkeypatch.setattr(roofline_step, "GEOMETRIES", (("resnet18", 200),))  # one geometry: the test stays short
    roofline_step.main(["--dtype", "fp32"])
    [got] = json.loads((tmp_path / "roofline_step_fp32_totals.json").read_text())["rows"]
    r18 = torchvision.models.resnet18()
    want = step_totals(full_step(r18, site_input_shapes(r18, "bn", (3, 224, 224)), 200, "fp32", 224), "")
    assert got["geometry"] == "resnet18 ImageNet 224 b200"
    assert got["cfm_step_us"] == pytest.approx(want["cfm_step_us"], rel=1e-12)
    assert got["cfm_step_us"] > got["bare_step_us"] > 0
