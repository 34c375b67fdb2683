"""`unidd-fast plan`: counts and bytes from the configuration alone (its H100 column:
tests/test_roofline.py), and the progress lines with rate and ETA that long stages write to log.txt."""
import re

import torch

from unidd_fast import sites
from unidd_fast.cli import main
from unidd_fast.pipeline import config, plan
from unidd_fast.pipeline.models import build_model
from unidd_fast.progress import progress
from unidd_fast.roofline import teacher as roofline_teacher
from unidd_fast.roofline.step import full_step, step_totals
from unidd_fast.sites import module_calls, site_input_shapes


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


def _plan_rows(capsys, *flags) -> dict:
    """{stage: peak device} of the plan of the digits default with ``flags`` (the peak host
    column starts from this process's measured peak RSS)."""
    threads = torch.get_num_threads()
    try:
        assert main(["plan", "--ipc", "1", "--seeds", "0", *flags]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = re.findall(r"^(squeeze|stats|recover|evaluate)\s+\d+\s+\d+\s+\S+ \S+\s+(\S+ \S+)\s", out, re.M)
    assert len(rows) == 4, out
    return dict(rows)


def test_each_stage_memory_is_at_its_own_precision(capsys):
    """--precision is recover's: its peak device memory follows it (bf16 activations are half
    of fp32's), while squeeze, stats and evaluate, which run in fp32, keep theirs."""
    bf16, fp32 = (_plan_rows(capsys, "--precision", p) for p in ("bf16", "fp32"))
    for stage in ("squeeze", "stats", "evaluate"):
        assert bf16[stage] == fp32[stage], stage
    assert bf16["recover"] != fp32["recover"]


def test_activation_and_optimizer_bytes_of_a_small_network():
    """Per image, by hand: a 1→2 channel 3×3 convolution, a BatchNorm and a ReLU on 1×4×4 images
    write three 2×4×4 outputs for backward, two if the ReLU works in place; a forward without
    autograd holds at most a layer's input and output plus an identity of the largest output."""
    for inplace, kept in ((False, 3 * 32), (True, 2 * 32)):
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2),
                                  torch.nn.ReLU(inplace=inplace))
        calls = module_calls(net, (1, 4, 4))
        assert plan.kept_activations(calls, "fp32") == kept * 4
        assert plan.kept_activations(calls, "bf16") == kept * 2
        assert plan.live_activations(calls, "fp32") == (32 + 32 + 32) * 4
    assert [plan.optimizer_states(k, m) for k, m in (("sgd", 0.9), ("sgd", 0.0), ("adam", 0.9), ("adamw", 0.0))] == \
        [1, 0, 2, 2]


def test_plan_probes_each_network_once(monkeypatch, capsys):
    """Site shapes, roofline layers and memory estimates all come from one module_calls per
    network (teacher and student), however many estimates use them."""
    probed = []

    def counting(model, input_shape):
        probed.append((type(model).__name__, input_shape))
        return module_calls(model, input_shape)

    for module in (sites, roofline_teacher, plan):
        monkeypatch.setattr(module, "module_calls", counting)
    _plan_rows(capsys, "--set", "evaluate.arch=resnet18")
    assert sorted(probed) == [("ConvNet", (1, 16, 16)), ("ResNet", (1, 16, 16))], probed


def test_module_calls_lists_every_call_in_the_order_it_begins():
    """A BasicBlock's shared ReLU appears once per call; a block begins before its layers and
    its output is filled in when it returns; explicit sites that are blocks get their inputs."""
    net = build_model("resnet18", 10, 16, 3)
    training = net.train()
    calls = module_calls(net, (3, 16, 16))
    assert net.training and training is net  # the mode is restored
    names = [c.name for c in calls]
    assert names[:8] == ["", "conv1", "bn1", "relu", "maxpool", "layer1", "layer1.0", "layer1.0.conv1"]
    assert names.count("layer1.0.relu") == 2
    by_name = {c.name: c for c in calls}
    assert by_name[""].input == (3, 16, 16) and by_name[""].output == (10,)
    assert by_name["layer2"].input == (64, 16, 16) and by_name["layer2"].output == (128, 8, 8)
    assert not by_name["layer2"].leaf and by_name["layer2.0.conv1"].leaf
    shapes = site_input_shapes(net, ["layer3", "layer2.1", "layer2.0.bn1"], (3, 16, 16), calls)
    assert list(shapes.items()) == [("layer2.0.bn1", (128, 8, 8)), ("layer2.1", (128, 8, 8)), ("layer3", (128, 8, 8))]
    assert shapes == site_input_shapes(net, ["layer3", "layer2.1", "layer2.0.bn1"], (3, 16, 16))  # probed itself
