"""`unidd-fast plan`: counts and bytes from the configuration alone, the H100 roofline model,
and the progress lines with rate and ETA that long stages write to log.txt."""
import re

import torch

from unidd_fast import roofline
from unidd_fast.cli import main
from unidd_fast.pipeline import config, plan
from unidd_fast.pipeline.models import build_model
from unidd_fast.progress import progress


def test_plan_of_the_digits_default_counts_steps_images_and_bytes(capsys):
    threads = torch.get_num_threads()
    try:  # the plan applies the config's threads=1, as the stages do
        assert main(["plan", "--ipc", "1,10", "--seeds", "0,1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    # ipc 1 and 10, two seeds, 10 classes in class-batches of 10: 2·(1 + 10) class-batches of 1000 iterations
    assert re.search(r"^recover\s+22000\s+220\s", out, re.M), out
    assert "22 class-batches of 10 images × 1000 iterations" in out
    assert re.search(r"cfm ipc=10: images \(png, ≈ raw uint8\)\s+25\.6 KB", out)  # 100 images of 1×16×16 bytes
    assert re.search(r"^evaluate\s+1800\s+66000\s", out, re.M)  # 300 epochs × (1 + 2 + 1 + 2) batches of 50
    assert "H100 PREDICTION" in out and "measured here (CPU time, 1 threads)" in out


def test_imagenet_shapes_come_from_the_config_without_data():
    cfg = config.defaults("imagenet")
    assert plan.dataset_shape(cfg) == plan.Shape(1000, 1_281_167, 50_000)
    cfg = config.defaults("digits")
    assert plan.dataset_shape(cfg) == plan.Shape(10, 1347, 450)  # sklearn's stratified 25 % split


def test_roofline_step_of_resnet50_is_heavier_than_resnet18_and_linear_in_batch():
    r18, r50 = (build_model(a, 1000, 224) for a in ("resnet18", "resnet50"))
    one, two = (roofline.step_seconds(r18, 224, 3, b, "bf16", "recover") for b in (100, 200))
    assert 1.9 < two / one < 2.0  # launch gaps are fixed, everything else scales with the batch
    assert roofline.step_seconds(r50, 224, 3, 100, "bf16", "recover") > 1.5 * one
    layers = roofline.teacher_layers(r50, 224, 1, "bf16")
    assert sum(layer["layer"] == "residual add" for layer in layers) == 16  # Bottlenecks are counted too
    fwd = sum(layer["fwd"][0] for layer in layers)
    assert 7.5e9 < fwd < 8.5e9  # ResNet-50: 4.1 GMACs per 224 px image


def test_progress_writes_rate_and_eta_lines_without_a_terminal():
    lines = []
    for _ in progress(range(4), desc="recover", log=lines.append, every=0, unit="rounds"):
        pass
    assert len(lines) == 4 and lines[-1].startswith("recover: 4/4 rounds (")
    assert all(re.search(r"rounds/s, ETA \d\d:\d\d\)$", line) for line in lines)
    quiet = []
    list(progress(range(3), desc="x", log=quiet.append, every=3600))
    assert quiet == [quiet[-1]] and quiet[-1].startswith("x: 3/3 it")  # the last line always comes
