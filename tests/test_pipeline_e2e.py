"""End to end through the command line on tiny data: every dataset reader through
squeeze → stats → recover → evaluate, the digits default, the run-directory layout, show."""
import json

import pytest
import torch

from _pipeline_data import write_cifar, write_image_folders, write_tiny_imagenet
from unidd_fast.cli import main
from unidd_fast.pipeline.distilled import read_set

TINY = ["--quiet", "--device", "cpu", "--set", "threads=1", "--set", "model.width=8", "--set",
        "model.depth=1", "--set", "data.image_size=8", "--set", "data.workers=0", "--set", "squeeze.epochs=1",
        "--set", "squeeze.batch_size=4", "--set", "squeeze.lr=0.01", "--set", "evaluate.epochs=1", "--set", "evaluate.batch_size=4",
        "--set", "recover.batch_size=2"]


def _write(kind, root):
    if kind in ("cifar10", "cifar100"):
        return write_cifar(root, kind, classes=3, per_batch=4)
    if kind == "tiny-imagenet":
        return write_tiny_imagenet(root, per_class=3, size=16)[0]
    return write_image_folders(root, per_class=3, size=12)


@pytest.mark.parametrize("kind", ["cifar10", "cifar100", "tiny-imagenet", "imagenet", "folder"])
def test_every_reader_runs_the_four_stages(tmp_path, capsys, kind):
    data = _write(kind, tmp_path / "data")
    runs = tmp_path / "runs"
    extra = ["--arch", "resnet18" if kind == "cifar10" else "convnet"]  # one ResNet path (3×3 stem at 8 px)
    assert main(["squeeze", "--dataset", kind, "--data", str(data), "--out", str(runs / "sq")] + TINY + extra) == 0
    assert main(["stats", "--from", str(runs / "sq"), "--out", str(runs / "st"), "--quiet"]) == 0
    assert main(["recover", "--from", str(runs / "st"), "--out", str(runs / "rc"), "--ipc", "1",
                 "--iterations", "2", "--quiet"]) == 0
    assert main(["evaluate", "--from", str(runs / "rc"), "--out", str(runs / "ev"), "--quiet"]) == 0
    for stage in ("sq", "st", "rc", "ev"):
        for name in ("config.json", "log.txt", "results.json"):
            assert (runs / stage / name).is_file(), (stage, name)
    config = json.loads((runs / "rc" / "config.json").read_text())
    assert config["data"]["dataset"] == kind and config["recover"]["iterations"] == 2
    assert config["model"]["arch"] == ("resnet18" if kind == "cifar10" else "convnet")
    assert sorted(p.name for p in runs.joinpath("rc").glob("new*")) == ["new000", "new001", "new002"]
    assert (runs / "rc" / "new002" / "class002_id000.png").is_file()
    images, labels = read_set(runs / "rc")
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8 and labels.tolist() == [0, 1, 2]
    results = json.loads((runs / "ev" / "results.json").read_text())
    (record,) = results["results"]
    assert record["method"] == "cfm" and record["ipc"] == 1 and 0 <= record["accuracy"] <= 1
    assert "cfm" in capsys.readouterr().out


def test_digits_default_tiny(tmp_path, capsys):
    out = tmp_path / "distill"
    argv = ["distill", "--out", str(out), "--ipc", "1,2", "--seeds", "0", "--iterations", "2", "--quiet",
            "--set", "squeeze.epochs=1", "--set", "evaluate.epochs=2"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["teacher_accuracy"] <= 1 and summary["seconds"] > 0
    got = sorted((r["method"], r["ipc"], r["seed"]) for r in summary["results"])
    assert got == sorted((m, i, 0) for m in ("cfm", "sre2l", "random-real") for i in (1, 2))
    assert all(set(r) == {"method", "ipc", "seed", "accuracy"} for r in summary["results"])
    table = capsys.readouterr().out
    assert "random-real" in table and "ipc=2" in table and "teacher" in table
    for name in ("config.json", "log.txt", "results.json"):
        assert (out / name).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["dataset"] == "digits" and len(config["data"]["mean"]) == 1  # resolved normalisation
    for method in ("cfm", "sre2l", "random-real"):
        assert (out / "recover" / method / "ipc2_seed0" / "new009" / "class009_id001.png").is_file()
    assert main(["show", str(out)]) == 0
    shown = sorted(p.name for p in (out / "show").iterdir())
    assert "filters.png" in shown and "grid_recover_cfm_ipc1_seed0.png" in shown


def test_evaluate_reads_another_methods_folder(tmp_path, capsys):
    sq = tmp_path / "sq"
    assert main(["squeeze", "--out", str(sq), "--quiet", "--set", "squeeze.epochs=1"]) == 0
    foreign = write_image_folders(tmp_path / "other", classes=tuple(f"new{c:03d}" for c in range(10)), per_class=1,
                                  size=16, splits=("sre2l",)) / "sre2l"
    assert main(["evaluate", "--teacher", str(sq / "teacher.safetensors"), "--distilled", str(foreign), "--out",
                 str(tmp_path / "ev"), "--seeds", "3", "--quiet", "--set", "evaluate.epochs=1"]) == 0
    (record,) = json.loads((tmp_path / "ev" / "results.json").read_text())["results"]
    assert record["method"] == "sre2l" and record["ipc"] == 1 and record["seed"] == 3
