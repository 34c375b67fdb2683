"""Evaluate: the KD loss, reading distilled sets (ours and other methods' folders), the table."""
import pytest
import torch
import torch.nn.functional as F

from unidd_fast.errors import ConfigError
from unidd_fast.pipeline.datasets import Batches, Data, TensorImages
from unidd_fast.pipeline.distilled import SetWriter, read_set
from unidd_fast.pipeline.evaluate import kd_loss, load_distilled, summary_table
from unidd_fast.pipeline.recover import plan_class_batches


def test_kd_loss_is_batchmean_kl_optionally_t2_scaled(gen):
    s = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    temp = 4.0
    p, log_q = F.softmax(t / temp, 1), F.log_softmax(s / temp, 1)
    expected = (p * (p.log() - log_q)).sum() / 6
    torch.testing.assert_close(kd_loss(s, t, temp), expected)  # float64, same formula (SRe2L, the release)
    torch.testing.assert_close(kd_loss(s, t, temp, t2=True), expected * temp**2)
    assert float(kd_loss(t, t, temp)) == pytest.approx(0, abs=1e-12)
    torch.autograd.gradcheck(lambda x: kd_loss(x, t, temp), (s,))


def _data(classes=3, channels=1, size=4):
    empty = TensorImages(torch.zeros(classes, channels, size, size), torch.arange(classes), (0.5,) * channels,
                         (0.25,) * channels, size)
    return Data("test", empty, empty, torch.arange(classes), [f"c{i}" for i in range(classes)], size, channels,
                (0.5,) * channels, (0.25,) * channels)


def _write_set(root, gen, classes=3, ipc=2):
    plan = plan_class_batches(classes, ipc, batch_size=2)
    writer = SetWriter(root, (0.5,), (0.25,))
    for cb in plan:
        writer.write(cb, torch.randn(len(cb.classes), 1, 4, 4, generator=gen))
    return writer.finish(plan, {})


def test_run_directory_index_and_image_folder_are_the_same_8bit_set(gen, tmp_path):
    index = _write_set(tmp_path, gen)
    data = _data()
    by_dir, n = load_distilled(tmp_path, data)
    by_index, m = load_distilled(index, data)
    stored, labels = read_set(tmp_path)
    assert n == m == 6 and by_dir.samples == by_index.samples
    x, y = next(iter(Batches(by_dir, 6, workers=1)))  # through a DataLoader worker
    assert y.tolist() == labels.tolist() == [0, 0, 1, 1, 2, 2]
    # exactly the stored 8-bit pixels, normalised as the in-memory datasets do
    want = TensorImages(stored, labels, (0.5,), (0.25,), 4).batch(torch.arange(6))[0]
    assert torch.equal(x, want)
    (tmp_path / "new001" / "class001_id000.png").unlink()
    with pytest.raises(ConfigError, match="lists 6 images but the class folders hold 5"):
        load_distilled(tmp_path, data)


def test_foreign_folders_map_classes_by_name(gen, tmp_path):
    from PIL import Image

    for name in ("c2", "c0"):
        (tmp_path / name).mkdir()
        Image.new("L", (6, 6), 128).save(tmp_path / name / "x.png")
    ds, n = load_distilled(tmp_path, _data())
    assert n == 2 and sorted(ds.labels.tolist()) == [0, 2]
    assert ds[0][0].shape == (1, 4, 4)  # resized to the dataset's side
    (tmp_path / "sre2l" / "new009").mkdir(parents=True)
    Image.new("L", (4, 4)).save(tmp_path / "sre2l" / "new009" / "class009_id000.png")
    with pytest.raises(ConfigError, match="exceed the dataset's 3 classes"):
        load_distilled(tmp_path / "sre2l", _data())
    with pytest.raises(ConfigError, match="does not exist"):
        load_distilled(tmp_path / "nothing", _data())


def test_summary_table_means_over_seeds():
    records = [{"method": "cfm", "ipc": 1, "seed": s, "accuracy": a} for s, a in ((0, 0.8), (1, 0.9))]
    records.append({"method": "random-real", "ipc": 10, "seed": 0, "accuracy": 0.5})
    table = summary_table(records, 0.99)
    assert "85.00 ± 5.00 (2)" in table and "50.00 ± 0.00 (1)" in table and "99.00%" in table
    assert table.splitlines()[1].split()[:2] == ["cfm", "85.00"]


def test_summary_table_compares_each_method_with_its_starting_images():
    acc = {("cfm", 1, 0): 0.90, ("cfm", 1, 1): 0.80, ("random-real", 1, 0): 0.85, ("random-real", 1, 1): 0.70,
           ("cfm", 10, 0): 0.95, ("random-real", 10, 0): 0.97, ("sre2l", 10, 0): 0.60}
    records = [{"method": m, "ipc": i, "seed": s, "accuracy": a} for (m, i, s), a in acc.items()]
    table = summary_table(records, None, {"cfm": "random-real"})
    cfm = table.splitlines()[1]
    # paired by seed: ipc 1 gains +5 and +10 -> +7.50 ± 2.50; ipc 10 loses 2 points
    assert "+7.50 ± 2.50 (2)" in cfm and "-2.00 ± 0.00 (1)" in cfm
    assert "vs start" in table.splitlines()[0]
    assert "WORSE" in table and "cfm ipc=10 (-2.00)" in table and "cfm ipc=1 " not in table.splitlines()[-1]
    assert summary_table(records).count("vs start") == 0  # nothing to compare with: the old table


def test_distill_starts_pair_real_initialised_methods_with_the_random_real_subset():
    from unidd_fast.pipeline import config, distill

    cfg = config.defaults("digits")
    assert distill.starts(cfg) == {"cfm": "random-real"}
    cfg.recover.init = "noise"
    assert distill.starts(cfg) == {}


def test_evaluate_from_the_run_equals_evaluate_of_its_image_folder(tmp_path):
    import json

    from _tiny_runs import squeeze_and_stats
    from unidd_fast.cli import main

    sq, st = squeeze_and_stats(tmp_path)  # digits at 8 px
    rc = tmp_path / "rc"
    assert main(["recover", "--from", str(st), "--out", str(rc), "--ipc", "2", "--seeds", "0", "--iterations", "3",
                 "--quiet"]) == 0
    flags = ["--seeds", "0", "--set", "evaluate.epochs=3", "--set", "evaluate.batch_size=8", "--set",
             "data.workers=1", "--quiet"]
    assert main(["evaluate", "--from", str(rc), "--out", str(tmp_path / "ev_run"), *flags]) == 0
    assert main(["evaluate", "--from", str(sq), "--distilled", str(rc), "--out", str(tmp_path / "ev_folder"),
                 *flags]) == 0
    (a,), (b,) = (json.loads((tmp_path / d / "results.json").read_text())["results"] for d in ("ev_run", "ev_folder"))
    assert a["accuracy"] == b["accuracy"] and 0 < a["accuracy"] <= 1
