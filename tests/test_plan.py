"""`unidd-fast plan`: counts and bytes from the configuration alone (its H100 column:
tests/test_roofline.py), and the progress lines with rate and ETA that long stages write to log.txt."""
import re

import torch

from unidd_fast.cli import main
from unidd_fast.pipeline import config, plan
from unidd_fast.pipeline.models import build_model
from unidd_fast.progress import progress
from unidd_fast.roofline.step import full_step, step_totals
from unidd_fast.sites import site_input_shapes


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
    # the H100 column of recover is the roofline's full step (bf16, CUDA graphs, CFM) of the digits
    # teacher at a class-batch of 10, times the 22 · 1000 steps
    teacher = build_model("convnet", 10, 16, channels=1, width=32, depth=3)
    step = step_totals(full_step(teacher, site_input_shapes(teacher, "bn", (1, 16, 16)), 10, "bf16", 16, channels=1,
                                 num_classes=10), "digits")["cfm_step_us"] * 1e-6
    recover = re.search(r"^recover .*\s(\S+ \S+)$", out, re.M).group(1)
    assert recover == plan._time(22_000 * step), (recover, step)
    assert f"× 1000 iterations; H100 PREDICTION {plan._time(step)} per step" in out


def test_imagenet_shapes_come_from_the_config_without_data():
    cfg = config.defaults("imagenet")
    assert plan.dataset_shape(cfg) == plan.Shape(1000, 1_281_167, 50_000)
    cfg = config.defaults("digits")
    assert plan.dataset_shape(cfg) == plan.Shape(10, 1347, 450)  # sklearn's stratified 25 % split


def test_progress_writes_rate_and_eta_lines_without_a_terminal():
    lines = []
    for _ in progress(range(4), desc="recover", log=lines.append, every=0, unit="rounds"):
        pass
    assert len(lines) == 4 and lines[-1].startswith("recover: 4/4 rounds (")
    assert all(re.search(r"rounds/s, ETA \d\d:\d\d\)$", line) for line in lines)
    quiet = []
    list(progress(range(3), desc="x", log=quiet.append, every=3600))
    assert quiet == [quiet[-1]] and quiet[-1].startswith("x: 3/3 it")  # the last line always comes


def test_plan_of_loss_none_counts_no_recover_steps(capsys):
    """loss "none" keeps the initial images: recover runs 0 iterations, here and on the H100."""
    threads = torch.get_num_threads()
    try:
        assert main(["plan", "--ipc", "1", "--seeds", "0", "--set", "recover.loss=none"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert re.search(r"^recover\s+0\s+10\s.*\s0\.0 ms\s+0\.0 ms$", out, re.M), out
    assert "1 class-batches of 10 images × 0 iterations" in out
