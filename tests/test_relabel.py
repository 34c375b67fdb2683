"""relabel + evaluate --labels: stored draws and top-k teacher logits replay online KD."""
import pytest
import torch

from unidd_fast.errors import ConfigError
from unidd_fast.pipeline import config
from unidd_fast.pipeline.datasets import TensorImages
from unidd_fast.pipeline.evaluate import kd_loss, train_student
from unidd_fast.pipeline.models import build_model
from unidd_fast.pipeline.labels import StoredLabelBatches, kd_topk_loss, record

C = 5


def setup(gen, cutmix=0.5):
    cfg = config.defaults("digits")
    for key, value in {"evaluate.epochs": 2, "evaluate.batch_size": 4, "evaluate.cutmix": cutmix,
                       "evaluate.augment": "rrc", "data.flip": True, "checkpoint_every": 0}.items():
        config.set_value(cfg, key, value)
    images = torch.randint(0, 256, (11, 1, 16, 16), generator=gen, dtype=torch.uint8)
    distilled = TensorImages(images, torch.arange(11) % C, (0.5,), (0.25,), 16)
    torch.manual_seed(1)
    teacher = build_model("convnet", C, 16, channels=1, width=6, depth=2).eval().requires_grad_(False)
    return cfg, distilled, teacher


def student():
    torch.manual_seed(2)
    return build_model("convnet", C, 16, channels=1, width=6, depth=2)


def test_topk_loss_with_every_class_is_kd_loss(gen):
    s, t = torch.randn(6, C, generator=gen, dtype=torch.float64), torch.randn(6, C, generator=gen, dtype=torch.float64)
    values, indices = t.topk(C, 1)
    torch.testing.assert_close(kd_topk_loss(s, values, indices, 4.0), kd_loss(s, t, 4.0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kd_topk_loss(s, values, indices, 4.0, t2=True), kd_loss(s, t, 4.0, t2=True))
    v2, i2 = t.topk(2, 1)  # top-2: p renormalised over the two classes, q over all
    p = torch.softmax(v2 / 4, 1)
    want = (p * (p.log() - torch.log_softmax(s / 4, 1).gather(1, i2))).sum() / 6
    torch.testing.assert_close(kd_topk_loss(s, v2, i2, 4.0), want)


def test_stored_labels_replay_online_kd(gen, tmp_path):
    cfg, distilled, teacher = setup(gen)
    device = torch.device("cpu")
    assert record(teacher, distilled, cfg.evaluate, True, device, 3, tmp_path / "set000", topk=0) == 2
    assert record(teacher, distilled, cfg.evaluate, True, device, 3, tmp_path / "set000", topk=0) == 0  # resumed
    online, stored = student(), student()
    train_student(online, teacher, distilled, cfg, device, 3)
    train_student(stored, torch.nn.Identity(), distilled, cfg, device, 3, labels=tmp_path / "set000")
    for a, b in zip(online.state_dict().values(), stored.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # top-k < classes trains too, and other settings are refused, naming the difference
    record(teacher, distilled, cfg.evaluate, True, device, 3, tmp_path / "top2", topk=2)
    train_student(student(), torch.nn.Identity(), distilled, cfg, device, 3, labels=tmp_path / "top2")
    with pytest.raises(ConfigError, match="seed"):
        StoredLabelBatches(tmp_path / "set000", distilled, cfg.evaluate, True, device, 4)
    config.set_value(cfg, "evaluate.epochs", 3)
    with pytest.raises(ConfigError, match="epoch"):
        StoredLabelBatches(tmp_path / "set000", distilled, cfg.evaluate, True, device, 3)
    other = TensorImages(distilled.images.flip(0), distilled.labels, (0.5,), (0.25,), 16)
    config.set_value(cfg, "evaluate.epochs", 2)
    with pytest.raises(ConfigError, match="fingerprint"):
        StoredLabelBatches(tmp_path / "set000", other, cfg.evaluate, True, device, 3)
    (tmp_path / "set000" / "epoch0001.safetensors").write_bytes(b"torn")
    batches = StoredLabelBatches(tmp_path / "set000", distilled, cfg.evaluate, True, device, 3)
    with pytest.raises(ConfigError, match="not a readable labels file"):
        batches.set_epoch(1)
    assert record(teacher, distilled, cfg.evaluate, True, device, 3, tmp_path / "set000", topk=0) == 1  # rewritten


def test_evaluate_does_not_depend_on_a_teacher_left_channels_last(gen):
    """A recover run in the same process leaves the teacher channels_last (RecoverEngine),
    whose CPU convolutions round differently. Evaluate's student must come out the same as
    with a freshly loaded (NCHW) teacher."""
    cfg, distilled, _ = setup(gen, cutmix=0.0)
    config.set_value(cfg, "evaluate.temperature", 1.0)  # at T = 20 the targets' last bits divide away
    torch.manual_seed(1)
    teacher = build_model("convnet", C, 16, channels=1, width=32, depth=3).eval().requires_grad_(False)
    device = torch.device("cpu")
    fresh, after_recover = student(), student()
    train_student(fresh, teacher, distilled, cfg, device, 3)
    x = distilled.batch(torch.arange(8))[0]
    nchw = teacher(x)
    teacher.to(memory_format=torch.channels_last)
    assert not torch.equal(teacher(x), nchw)  # the layout shows in the KD targets
    train_student(after_recover, teacher, distilled, cfg, device, 3)
    for a, b in zip(fresh.state_dict().values(), after_recover.state_dict().values()):
        assert torch.equal(a, b)
