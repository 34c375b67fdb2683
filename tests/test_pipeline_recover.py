"""Recover: class-batch plan, curriculum, step, EMU across the run, atomic per-batch output;
the SRe2L BN-matching baseline against its formula."""
import pytest
import torch

from unidd_fast import CFMLoss, collect_real_stats
from unidd_fast.errors import ConfigError
from unidd_fast.pipeline.augment import Augment, make_augment
from unidd_fast.pipeline.config import RecoverConfig
from unidd_fast.pipeline.distilled import INDEX_FILE, SetWriter, read_index, read_set
from unidd_fast.pipeline.models import build_model
from unidd_fast.pipeline.recover import (curriculum, pick_real, pixel_bounds, plan_class_batches,
                                         recover_class_batch, recover_set, recover_step)
from unidd_fast.pipeline.sre2l_loss import BNMatchLoss
from unidd_fast.regularizer import Regularizer

IDENTITY = Augment(scale=(1, 1), ratio=(1, 1), shift=0.0, flip=False)


def _teacher(gen, classes=3, width=6):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = build_model("convnet", classes, 8, channels=2, width=width, depth=2)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(torch.randn(16, 2, 8, 8, generator=gen) * 1.5 + 0.3)
        model.classifier.weight.mul_(20)  # logits that respond to the images, like a trained net
    return model.eval().requires_grad_(False)


def test_plan_orders_ipc_then_class_chunks():
    plan = plan_class_batches(5, ipc=2, batch_size=2)
    assert [(cb.index, cb.ipc_index, cb.classes.tolist()) for cb in plan] == [
        (0, 0, [0, 1]), (1, 0, [2, 3]), (2, 0, [4]), (3, 1, [0, 1]), (4, 1, [2, 3]), (5, 1, [4])]
    assert curriculum(plan[4], len(plan), 2, "ipc") == (1, 2)
    assert curriculum(plan[4], len(plan), 2, "batch") == (4, 6)
    with pytest.raises(ConfigError):
        plan_class_batches(5, ipc=0, batch_size=2)


def test_pick_real_takes_distinct_images_of_each_class(gen):
    labels = torch.randint(0, 4, (60,), generator=gen)
    picks = pick_real(labels, 4, 3, gen)
    assert picks.shape == (3, 4)
    for c in range(4):
        assert (labels[picks[:, c]] == c).all() and picks[:, c].unique().numel() == 3
    with pytest.raises(ConfigError, match="class 1 has 1 training images"):
        pick_real(torch.tensor([0, 0, 1]), 2, 2, gen)


def test_step_clips_to_the_pixel_range_and_lowers_the_loss(gen):
    model = _teacher(gen)
    lo, hi = pixel_bounds((0.4, 0.6), (0.2, 0.3), "cpu")
    images = (torch.randn(3, 2, 8, 8, generator=gen) * 0.1).requires_grad_(True)
    targets = torch.tensor([0, 1, 2])
    optimizer = torch.optim.Adam([images], lr=0.2, betas=(0.5, 0.9))
    first, _ = recover_step(images, targets, model, None, optimizer, IDENTITY, gen, lo, hi)
    for _ in range(50):
        ce, reg = recover_step(images, targets, model, None, optimizer, IDENTITY, gen, lo, hi)
    assert float(ce) < 0.5 * float(first) and float(reg) == 0
    big = torch.optim.Adam([images], lr=1e3)
    recover_step(images, targets, model, None, big, IDENTITY, gen, lo, hi)
    assert (images >= lo).all() and (images <= hi).all()
    assert ((images == lo) | (images == hi)).any()  # the clip was active


class Recorder(Regularizer):
    """A regulariser that records the calls recover_set makes (the rest: Regularizer's defaults)."""

    def __init__(self):
        self.calls = []

    def __call__(self, targets):
        self.calls.append(("loss", tuple(targets.tolist())))
        return torch.zeros(())

    def set_curriculum(self, t, T):
        self.calls.append(("beta", t, T))

    def next_batch(self):
        self.calls.append(("next",))


@pytest.mark.parametrize("beta_per", ["ipc", "batch"])
def test_recover_set_schedules_beta_and_folds_each_batch(gen, beta_per):
    model, rec = _teacher(gen), Recorder()
    rc = RecoverConfig(iterations=2, lr=0.1, beta_per=beta_per)
    plan = plan_class_batches(3, ipc=2, batch_size=2)
    lo, hi = pixel_bounds((0.5, 0.5), (0.25, 0.25), "cpu")
    seen = []
    recover_set(model, rec, plan, lambda cb: torch.zeros(len(cb.classes), 2, 8, 8), rc, 2, IDENTITY, gen, lo, hi,
                lambda cb, images, ce, reg: seen.append((cb.index, images.shape[0])))
    assert seen == [(0, 2), (1, 1), (2, 2), (3, 1)]
    betas = [c[1:] for c in rec.calls if c[0] == "beta"]
    assert betas == ([(0, 2), (0, 2), (1, 2), (1, 2)] if beta_per == "ipc" else [(0, 4), (1, 4), (2, 4), (3, 4)])
    assert [c for c in rec.calls if c[0] != "beta"] == [
        ("loss", (0, 1)), ("loss", (0, 1)), ("next",), ("loss", (2,)), ("loss", (2,)), ("next",),
        ("loss", (0, 1)), ("loss", (0, 1)), ("next",), ("loss", (2,)), ("loss", (2,)), ("next",)]


def test_emu_runs_across_the_whole_set(gen):
    model = _teacher(gen)
    data = [(torch.randn(8, 2, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(2)]
    stats = collect_real_stats(model, data, 3)
    cfm = CFMLoss(model, stats, beta=0.5)
    rc = RecoverConfig(iterations=2, lr=0.05)
    plan = plan_class_batches(3, ipc=2, batch_size=2)
    lo, hi = pixel_bounds((0.5, 0.5), (0.25, 0.25), "cpu")
    betas = []

    def on_batch(cb, images, ce, reg):
        betas.append(float(cfm.beta_t))
        assert torch.isfinite(images).all() and torch.isfinite(reg)

    recover_set(model, cfm, plan, lambda cb: torch.randn(len(cb.classes), 2, 8, 8, generator=gen), rc, 2,
                make_augment("recover", 0.5, 0.125), gen, lo, hi, on_batch)
    cfm.remove()
    assert cfm.b == len(plan) + 1  # one EMU fold per class-batch, over both ipc rounds
    assert betas[0] == betas[1] == 0.5 and betas[2] == betas[3] == pytest.approx(0.25)  # cosine, t/T = 1/2


def test_class_batch_output_is_written_when_the_batch_finishes(gen, tmp_path):
    model = _teacher(gen)
    rc = RecoverConfig(iterations=1, lr=0.1)
    plan = plan_class_batches(3, ipc=2, batch_size=2)
    mean, std = (0.5, 0.4), (0.25, 0.2)
    lo, hi = pixel_bounds(mean, std, "cpu")
    writer = SetWriter(tmp_path, mean, std)

    def on_batch(cb, images, ce, reg):
        writer.write(cb, images)
        if cb.index == 2:
            raise RuntimeError("crash in the third class-batch")

    with pytest.raises(RuntimeError, match="crash"):
        recover_set(model, None, plan, lambda cb: torch.randn(len(cb.classes), 2, 8, 8, generator=gen), rc, 2,
                    IDENTITY, gen, lo, hi, on_batch)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert names == ["new000/class000_id000.png", "new000/class000_id001.png", "new001/class001_id000.png",
                     "new001/class001_id001.png", "new002/class002_id000.png"]
    assert not list(tmp_path.rglob("*.tmp"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new000", "new001", "new002"]  # no other copy


def test_set_writer_stores_the_8bit_pixels_and_indexes_them_last(gen, tmp_path):
    plan = plan_class_batches(3, ipc=2, batch_size=2)
    mean, std = (0.5,), (0.25,)
    writer = SetWriter(tmp_path, mean, std)
    pixels = {}
    for cb in plan:
        p = torch.rand(len(cb.classes), 1, 4, 4, generator=gen)
        pixels[cb.index] = (p * 255).round().to(torch.uint8)
        writer.write(cb, (p - 0.5) / 0.25)
        assert not (tmp_path / INDEX_FILE).exists()
    index = read_index(writer.finish(plan, {"method": "test"}))
    assert (index["count"], index["shape"], index["num_classes"], index["method"]) == (6, [1, 4, 4], 3, "test")
    images, labels = read_set(tmp_path)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]  # class folder, then ipc index
    want = torch.cat([pixels[i] for i in range(4)])[torch.tensor([0, 3, 1, 4, 2, 5])]
    assert images.dtype == torch.uint8 and torch.equal(images, want)  # float32 round trip, then exact
    writer.image_file(1, 1).unlink()
    with pytest.raises(ConfigError, match="1 images of the distilled set are missing"):
        writer.finish(plan, {})


def test_class_batch_reaches_the_target_class(gen):
    model = _teacher(gen)
    lo, hi = pixel_bounds((0.5, 0.5), (0.25, 0.25), "cpu")
    rc = RecoverConfig(iterations=40, lr=0.1)
    targets = torch.tensor([2, 0, 1])
    images, ce, _ = recover_class_batch(torch.zeros(3, 2, 8, 8), targets, model, None, rc, IDENTITY, gen, lo, hi)
    assert (model(images).argmax(1) == targets).all() and float(ce) < 0.5


def test_bn_match_loss_is_the_sre2l_formula(gen):
    model = _teacher(gen)
    loss = BNMatchLoss(model, r_bn=0.01, first_bn_multiplier=10.0)
    x = torch.randn(4, 2, 8, 8, generator=gen, requires_grad=True)
    model(x)
    value = loss(torch.tensor([0, 1, 2, 0]))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    expected, feat = 0.0, x
    for i, bn in enumerate(bns):
        feat = model.features[4 * i](feat)  # the conv before each BN gives its input
        r = (feat.mean((0, 2, 3)) - bn.running_mean).norm() + (feat.var((0, 2, 3), unbiased=False) - bn.running_var).norm()
        expected = expected + (10.0 if i == 0 else 1.0) * r
        feat = model.features[4 * i + 3](model.features[4 * i + 2](bn(feat)))
    torch.testing.assert_close(value, 0.01 * expected)  # float32, same ops in the same order
    value.backward()
    assert x.grad.abs().sum() > 0
    loss.next_batch()
    with pytest.raises(RuntimeError, match="call model"):
        loss(None)
    loss.remove()
    model(x)
    assert all(layer.r_feature is None for layer in loss.layers.values())
