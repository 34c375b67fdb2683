"""Pre-flight of a recover run's fused-op backends (CPU, injected faults): a backend returning
wrong values or raising is switched off for the run with a warning in log.txt and
results.json, the result equals the torch backend's, and --strict makes it an error."""
import json

import pytest
import torch

from unidd_fast.cli import main
from unidd_fast.pipeline import preflight
from unidd_fast.pipeline.distilled import read_set

import _faults
from _tiny_runs import squeeze_and_stats


@pytest.fixture
def faulty(monkeypatch):
    _faults.install(monkeypatch)


def test_check_backends_on_a_model(faulty):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5)).eval()
    assert preflight.check_backends(model, (3, 6, 6), 2, "cpu", "torch") == ("torch", [])  # nothing to check
    logged = []
    backend, fallbacks = preflight.check_backends(model, (3, 6, 6), 2, "cpu", "faulty", log=logged.append)
    assert backend == "torch"
    failed = {f["feature"] for f in fallbacks}
    assert {"backend faulty for site_stats", "backend faulty for regularized_inverse"} <= failed
    assert "backend faulty for site_stats_grad" not in failed
    assert "injected launch failure" in logged[0] and "uses backend torch" in logged[0]


def test_recover_falls_back_with_a_warning_and_strict_refuses(faulty, tmp_path, capsys):
    _, st = squeeze_and_stats(tmp_path)
    common = ["recover", "--from", str(st), "--quiet", "--ipc", "1", "--seeds", "0", "--iterations", "2"]
    assert main(common + ["--out", str(tmp_path / "torch"), "--set", "recover.backend=torch"]) == 0
    assert main(common + ["--out", str(tmp_path / "faulty"), "--set", "recover.backend=faulty"]) == 0
    results = json.loads((tmp_path / "faulty" / "results.json").read_text())
    assert any(f["feature"] == "backend faulty for site_stats" for f in results["fallbacks"])
    assert json.loads((tmp_path / "torch" / "results.json").read_text())["fallbacks"] == []
    assert "failed the pre-flight check" in (tmp_path / "faulty" / "log.txt").read_text()
    (want, want_labels), (got, got_labels) = read_set(tmp_path / "torch"), read_set(tmp_path / "faulty")
    assert torch.equal(want, got) and torch.equal(want_labels, got_labels)
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "strict"), "--set", "recover.backend=faulty", "--strict"]) == 2
    assert "--strict" in capsys.readouterr().err
