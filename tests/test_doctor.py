"""`unidd-fast doctor`: every backend of every fused op against float64, and every recover-step
feature against the eager fp32 step, on the CPU here; a backend or feature returning wrong
values fails its rows; measured times steer `auto` on CUDA."""
import json

import pytest
import torch

from unidd_fast import cli, doctor, opcheck
from unidd_fast.kernels import registry

import _faults


def test_doctor_json_lists_every_op_and_backend(tmp_path, capsys):
    out = tmp_path / "doctor.json"
    assert cli.main(["doctor", "--device", "cpu", "--arch", "convnet", "--image-size", "8", "--batch", "2",
                     "--repeats", "1", "--backends", "torch", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["op"] for r in report["results"]] == list(doctor.OPS)  
    assert all(r["passed"] and r["backend"] == "torch" and r["median_s"] > 0 and 0 < r["error"] < 1e-3
               for r in report["results"])
    assert report["shapes"] == [[2, 128, 8, 8], [2, 128, 4, 4], [2, 128, 2, 2]]
    features = {r["feature"]: r for r in report["step_features"]}
    assert list(features) == ["eager_fp32", "cuda_graphs", "capturable_adam", "bf16_autocast", "channels_last"]
    for name in ("cuda_graphs", "capturable_adam"):  # CUDA only: not applicable here, never "passed"
        assert features[name]["passed"] is None and features[name]["applicable"] is False
    for name in ("bf16_autocast", "channels_last"):
        row = features[name]
        assert row["passed"] and row["median_s"] > 0 and row["error"] <= row["tolerance"]
    out = capsys.readouterr().out
    assert "regularized_inverse" in out
    assert [line.split()[2] for line in out.splitlines() if line.startswith(("cuda_graphs", "channels_last"))] == [
        "n/a", "pass"]


def test_a_wrong_or_raising_step_feature_fails_its_row(monkeypatch, tmp_path, capsys):
    _faults.faulty_step_features(monkeypatch, wrong=("channels_last",), raising=("bf16_autocast",))
    out = tmp_path / "doctor.json"
    assert cli.main(["doctor", "--device", "cpu", "--arch", "convnet", "--image-size", "8", "--batch", "2",
                     "--repeats", "1", "--backends", "torch", "--json", str(out)]) == 1
    features = {r["feature"]: r for r in json.loads(out.read_text())["step_features"]}
    assert features["channels_last"]["passed"] is False and features["channels_last"]["error"] == pytest.approx(1)
    assert features["bf16_autocast"]["passed"] is False
    assert "injected capture failure" in features["bf16_autocast"]["failure"]
    assert features["cuda_graphs"]["passed"] is None
    assert "FAIL" in capsys.readouterr().out


def test_doctor_runs_triton_in_the_interpreter():
    report = doctor.run("cpu", shapes=[(2, 9, 3, 2)], repeats=1, step_features=False)
    rows = {(r["op"], r["backend"]): r for r in report["results"]}
    assert {b for _, b in rows} == {"torch", "triton"}
    assert all(r["passed"] for r in rows.values()), [r["failure"] for r in rows.values()]


def test_a_wrong_or_raising_backend_fails_its_rows(monkeypatch):
    _faults.install(monkeypatch)
    report = doctor.run("cpu", shapes=[(3, 6, 2, 2)], repeats=1, backends=["torch", "faulty"], step_features=False)
    rows = {(r["op"], r["backend"]): r for r in report["results"]}
    assert not rows["site_stats", "faulty"]["passed"] and rows["site_stats", "faulty"]["error"] > 1e-3
    assert "injected launch failure" in rows["regularized_inverse", "faulty"]["failure"]
    assert rows["site_stats_grad", "faulty"]["passed"]
    assert all(r["passed"] for (op, b), r in rows.items() if b == "torch")
    assert doctor.measured_timings(report)["site_stats"].keys() == {"torch"}


def test_measured_times_steer_auto_on_cuda(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(registry, "triton_available", lambda: True)
    monkeypatch.setattr(registry, "cuda_extension_available", lambda: False)
    key = {"device": "Fake GPU", "torch": torch.__version__, "triton": "x", "extension": None}
    monkeypatch.setattr(registry, "environment_key", lambda device: key)
    registry._load_timings.cache_clear()
    registry.measured_order.cache_clear()
    assert registry.resolve("site_stats", "auto", "cuda") == "triton"  # nothing measured: prediction order
    assert registry.resolve("regularized_inverse", "auto", "cuda", torch.float32, 2048) == "torch"  # large width
    path = registry.save_timings(key, {"site_stats": {"triton": 2e-3, "torch": 1e-3}})
    assert path.parent == tmp_path / "unidd_fast"
    assert registry.resolve("site_stats", "auto", "cuda") == "torch"
    path.write_text("{not json")  # a damaged cache is ignored
    registry._load_timings.cache_clear()
    registry.measured_order.cache_clear()
    assert registry.resolve("site_stats", "auto", "cuda") == "triton"
    registry._load_timings.cache_clear()
    registry.measured_order.cache_clear()


def test_doctor_bad_arguments_exit_2(capsys):
    assert cli.main(["doctor", "--device", "cpu", "--batch", "0"]) == 2
    assert "--batch" in capsys.readouterr().err
    assert cli.main(["doctor", "--device", "cpu", "--backends", "torch,fast"]) == 2
    assert "unknown backends ['fast']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["doctor", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


ILL_CONDITIONED = (2, 768, 2, 2)  # 8 rows for d = 768: the fp32 CFM-loss gradient loses ≈ 1.3e-3 with torch itself


def test_an_ill_conditioned_site_judges_backends_against_the_torch_floor(monkeypatch):
    """At a rank-deficient site fp32 itself misses the fixed 1e-3: a backend computing what
    torch computes passes against torch's own error (the floor), the torch row says why it
    misses, and a backend that is really wrong still fails there."""
    _faults.install(monkeypatch, broken=False)  # "faulty" = the torch ops under another name
    report = doctor.run("cpu", shapes=[ILL_CONDITIONED], repeats=1, backends=["torch", "faulty"],
                        step_features=False, ops=("site_stats", "cfm_site_loss"))
    rows = {(r["op"], r["backend"]): r for r in report["results"]}
    torch_row, same = rows["cfm_site_loss", "torch"], rows["cfm_site_loss", "faulty"]
    assert torch_row["error"] > 1e-3 and not torch_row["passed"] and "the torch backend itself" in torch_row["failure"]
    assert same["passed"] and same["floor"] == pytest.approx(torch_row["error"])
    assert 1e-3 < same["error"] <= same["tolerance"] <= opcheck.FLOOR_MARGIN * same["floor"]
    assert rows["site_stats", "faulty"]["floor"] is None  # met the fixed tolerance: no floor was measured
    _faults.install(monkeypatch)  # now its site statistics are 1 % off
    wrong = doctor.run("cpu", shapes=[ILL_CONDITIONED], repeats=1, backends=["faulty"], step_features=False,
                       ops=("site_stats",))["results"][0]
    assert not wrong["passed"] and wrong["floor"] < 1e-5 and wrong["tolerance"] == opcheck.TOLERANCE[torch.float32]


def test_the_floor_never_widens_the_tolerance_past_its_cap(monkeypatch):
    """With any floor times the margin above everything, the cap decides: a backend 1 % off
    fails a cap of 5e-3 and passes one of 0.1."""
    monkeypatch.setattr(opcheck, "TOLERANCE", {torch.float32: 1e-12})  # every backend misses it: the floor is measured
    monkeypatch.setattr(opcheck, "FLOOR_MARGIN", 1e12)
    _faults.install(monkeypatch)
    for cap, passed in ((5e-3, False), (0.1, True)):
        monkeypatch.setattr(opcheck, "FLOOR_CAP", cap)
        row = doctor.run("cpu", shapes=[(3, 6, 2, 2)], repeats=1, backends=["faulty"], step_features=False,
                         ops=("site_stats",))["results"][0]
        assert row["tolerance"] == cap and row["passed"] is passed and 0 < row["floor"] < 1e-5
