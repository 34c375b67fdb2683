"""Pre-flight of a run's fused-op backends and recover-step features (CPU, injected faults): a
backend or feature returning wrong values or raising is switched off for the run with a
warning in log.txt and results.json, the result equals that of a run without it, and
--strict makes it an error. Covers recover and stats."""
import dataclasses
import json

import pytest
import torch

from unidd_fast.cli import main
from unidd_fast.errors import ConfigError, NonFiniteError
from unidd_fast.pipeline import preflight, stepcheck
from unidd_fast.pipeline.config import RecoverConfig
from unidd_fast.pipeline.distilled import read_set
from unidd_fast.real_stats import RealStats

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
    # stats checks its site statistics only
    backend, fallbacks = preflight.check_backends(model, (3, 6, 6), 2, "cpu", "faulty", ops=("site_stats",))
    assert backend == "torch" and [f["feature"] for f in fallbacks] == ["backend faulty for site_stats"]


def test_a_bf16_run_checks_its_backend_on_bf16_maps(monkeypatch, tmp_path):
    _faults.install(monkeypatch, bf16_only=True)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5)).eval()
    assert preflight.feature_dtypes("fp32") == (torch.float32,)
    assert preflight.check_backends(model, (3, 6, 6), 2, "cpu", "faulty") == ("faulty", [])  # fp32 maps are right
    backend, fallbacks = preflight.check_backends(model, (3, 6, 6), 2, "cpu", "faulty",
                                                  dtypes=preflight.feature_dtypes("bf16"))
    assert backend == "torch" and [f["feature"] for f in fallbacks] == ["backend faulty for site_stats on bfloat16 maps"]
    # recover passes the run's precision on
    _, st = squeeze_and_stats(tmp_path)
    common = ["recover", "--from", str(st), "--quiet", "--ipc", "1", "--seeds", "0", "--iterations", "2",
              "--set", "recover.backend=faulty"]
    for precision, fell_back in (("fp32", False), ("bf16", True)):
        out = tmp_path / precision
        assert main(common + ["--out", str(out), "--set", f"recover.precision={precision}"]) == 0
        features = [f["feature"] for f in json.loads((out / "results.json").read_text())["fallbacks"]]
        assert ("backend faulty for site_stats on bfloat16 maps" in features) == fell_back


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


def test_step_features_on_the_cpu_check_what_exists_here(gen):
    rc = RecoverConfig(lr=0.1, precision="bf16")
    rows = {r["feature"]: r for r in stepcheck.check(_faults.step_case(gen, rc))}
    assert rows["eager_fp32"]["median_s"] > 0
    for name in ("cuda_graphs", "capturable_adam"):  # CUDA only: not applicable, never passed
        assert rows[name]["applicable"] is False and rows[name]["passed"] is None
    for name in ("bf16_autocast", "channels_last"):
        row = rows[name]
        assert row["passed"] and row["loss_error"] <= row["loss_tolerance"] and row["error"] <= row["tolerance"]
    assert rows["bf16_autocast"]["loss_error"] > 0  # autocast was on
    assert rows["bf16_autocast"]["error"] > rows["channels_last"]["error"]  # bf16 rounds far more
    logged = []
    assert preflight.check_step_features(_faults.step_case(gen, rc), rc, log=logged.append) == (rc, []) and not logged


@pytest.mark.parametrize("fault", ["raising", "wrong"])
def test_a_failing_cuda_graph_or_capturable_adam_turns_graphs_off(gen, monkeypatch, fault):
    """On a (pretended) GPU: the capture raising, or capturable Adam doubling the update."""
    failing = "cuda_graphs" if fault == "raising" else "capturable_adam"
    _faults.faulty_step_features(monkeypatch, cuda=True, **{fault: (failing,)})
    rc = RecoverConfig(lr=0.1, precision="bf16")
    logged = []
    got, fallbacks = preflight.check_step_features(_faults.step_case(gen, rc), rc, log=logged.append)
    # a failing capturable Adam fails the graphs too (a capture needs it): both go
    want = ["step feature cuda_graphs"] if fault == "raising" else ["step feature cuda_graphs",
                                                                     "step feature capturable_adam"]
    assert [f["feature"] for f in fallbacks] == want
    assert got == dataclasses.replace(rc, cuda_graphs="off")  # bf16 and channels_last passed and stay
    assert len(logged) == 1 and logged[0].startswith("warning: step feature cuda_graphs failed the pre-flight")
    assert ("injected capture failure" if fault == "raising" else "image update 1 (tolerance 0.25)") in logged[0]
    with pytest.raises(ConfigError, match=f"step feature {failing} failed.*--strict makes this an error"):
        preflight.check_step_features(_faults.step_case(gen, rc), rc, strict=True)


def test_recover_turns_failing_step_features_off_with_the_result_of_a_run_without_them(monkeypatch, tmp_path, capsys):
    _faults.faulty_step_features(monkeypatch, wrong=("channels_last",), raising=("bf16_autocast",))
    _, st = squeeze_and_stats(tmp_path)
    common = ["recover", "--from", str(st), "--quiet", "--ipc", "1", "--seeds", "0", "--iterations", "2"]
    assert main(common + ["--out", str(tmp_path / "faulty"), "--precision", "bf16"]) == 0
    results = json.loads((tmp_path / "faulty" / "results.json").read_text())
    assert [(f["feature"], f["fallback"]) for f in results["fallbacks"]] == [
        ("step feature bf16_autocast", "an fp32 teacher"),
        ("step feature channels_last", "NCHW (contiguous) images and teacher")]
    log = (tmp_path / "faulty" / "log.txt").read_text()
    assert "step feature bf16_autocast failed the pre-flight check (RuntimeError: injected capture failure" in log
    assert "step feature channels_last failed the pre-flight check (loss relative error" in log
    # no step feature in use: nothing to check, and the same images as the run that fell back
    plain = ["--out", str(tmp_path / "plain"), "--precision", "fp32", "--set", "recover.channels_last=false"]
    assert main(common + plain) == 0
    assert json.loads((tmp_path / "plain" / "results.json").read_text())["fallbacks"] == []
    (want, want_labels), (got, got_labels) = read_set(tmp_path / "plain"), read_set(tmp_path / "faulty")
    assert torch.equal(want, got) and torch.equal(want_labels, got_labels)
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "strict"), "--strict"]) == 2
    assert "step feature channels_last failed" in capsys.readouterr().err


def test_stats_falls_back_from_a_faulty_site_statistics_backend(faulty, tmp_path, capsys):
    sq, st = squeeze_and_stats(tmp_path)
    assert json.loads((st / "results.json").read_text())["fallbacks"] == []
    common = ["stats", "--from", str(sq), "--quiet", "--set", "recover.backend=faulty"]
    assert main(common + ["--out", str(tmp_path / "faulty")]) == 0
    results = json.loads((tmp_path / "faulty" / "results.json").read_text())
    assert [(f["feature"], f["fallback"]) for f in results["fallbacks"]] == [("backend faulty for site_stats",
                                                                            "backend torch")]
    assert "relative error" in results["fallbacks"][0]["failure"]
    assert "warning: backend faulty for site_stats failed the pre-flight check" in (
        tmp_path / "faulty" / "log.txt").read_text()
    want, got = RealStats.load(st / "stats.safetensors"), RealStats.load(tmp_path / "faulty" / "stats.safetensors")
    assert want.sites == got.sites
    for site in want.sites:
        assert torch.equal(want[site].psi, got[site].psi) and torch.equal(want[site].mu, got[site].mu)
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "strict"), "--strict"]) == 2
    assert "backend faulty for site_stats failed" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "strict")]) == 0  # the same --out, without --strict
    assert (tmp_path / "strict" / "stats.safetensors").is_file()


def test_float32_features_on_cuda_get_the_tf32_tolerance(monkeypatch):
    graphs, bf16 = stepcheck.BY_NAME["cuda_graphs"], stepcheck.BY_NAME["bf16_autocast"]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert [stepcheck.arithmetic(graphs, d) for d in ("cpu", "cuda")] == ["float32", "tf32"]
    assert stepcheck.arithmetic(bf16, "cuda") == "bfloat16"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert stepcheck.arithmetic(graphs, "cuda") == "float32"
    tol = stepcheck.TOLERANCE
    assert tol["float32"] < tol["tf32"] < tol["bfloat16"] < 1  # a wrong step (update error >= 1) always fails


def test_a_failing_reference_step_is_the_run_s_error_named_as_the_pre_flight(gen):
    rc = RecoverConfig(lr=0.1)
    case = _faults.step_case(gen, rc)
    case.init[1] = float("nan")
    with pytest.raises(NonFiniteError, match="^pre-flight, the eager fp32 recover step on random images: "):
        preflight.check_step_features(case, rc)


def test_the_backend_check_caps_the_batch_and_keeps_each_site_s_shape(monkeypatch):
    from unidd_fast.pipeline.models import build_model

    _faults.install(monkeypatch, broken=False)
    checked = []
    monkeypatch.setattr(preflight.opcheck, "check_ops", lambda device, shapes, *a, **kw: checked.append(shapes) or [])
    model = build_model("convnet", 3, 16, channels=3, width=6, depth=3).eval()
    sites = [s[1:] for s in preflight.teacher_shapes(model, (3, 16, 16), 1, "bn")]
    assert len(sites) == 3
    for batch, n in ((500, preflight.PREFLIGHT_BATCH), (7, 7)):
        assert preflight.check_backends(model, (3, 16, 16), batch, "cpu", "faulty") == ("faulty", [])
        assert checked.pop() == [(n, *site) for site in sites]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_the_capped_batch_takes_the_kernels_reduction_paths_of_a_full_batch(arch, tmp_path):
    """The site statistics' chunk plans (functions of the shape only) at ImageNet's 224 px,
    fp32 and bf16 maps: wherever the largest class-batch (1000) reduces over several row
    chunks, or (Triton) over enough of them for the two-level chunk sum, the checked batch
    does too. Triton's plan is Python; the CUDA one is csrc's, through the CPU emulation."""
    import shutil

    import triton

    from unidd_fast.opcheck import site_shapes
    from unidd_fast.kernels.triton.site_stats import num_chunks, reduce_group

    def triton_path(n, d, hw, size):
        chunks = num_chunks(n, d, n * hw, size)
        chunks = triton.cdiv(n, triton.cdiv(n, chunks))  # as site_stats_forward deals the samples
        return chunks > 1, reduce_group(chunks) < chunks

    paths = [triton_path]
    if shutil.which("g++"):
        from unidd_fast.kernels.cuda.emulator import EmulatedKernels, build_emulator

        kernels = EmulatedKernels(build_emulator(tmp_path))
        paths.append(lambda n, d, hw, size: kernels.stats_chunks(n, d, hw) > 1)
    cap, reduced, lost_at_16 = preflight.PREFLIGHT_BATCH, 0, set()
    for _, d, h, w in site_shapes(arch, 224, 1):
        for path in paths:
            for size in (4, 2):
                full = path(1000, d, h * w, size)
                assert path(cap, d, h * w, size) == full, (d, h, w, size)
                reduced += full is True or full == (True, True)
                if path(16, d, h * w, size) != full:
                    lost_at_16.add((d, h, w))
    assert reduced > 0
    assert (512, 7, 7) in lost_at_16  # the bound is not idle: 16 images would miss the deepest sites' paths


def test_kept_features_are_checked_together_on_the_cpu(gen, monkeypatch):
    rows, check = [], stepcheck.check

    def spy(*args, **kwargs):
        rows.extend(out := check(*args, **kwargs))
        return out

    monkeypatch.setattr(stepcheck, "check", spy)
    rc = RecoverConfig(lr=0.1, precision="bf16")  # and channels_last, by default
    assert preflight.check_step_features(_faults.step_case(gen, rc), rc) == (rc, [])
    row = rows[-1]
    assert row["feature"] == "bf16_autocast+channels_last" and row["dtype"] == "bfloat16" and row["passed"]
    assert 0 < row["loss_error"] <= row["loss_tolerance"]
    assert [r["feature"] for r in rows] == ["eager_fp32", "bf16_autocast", "channels_last", "eager_fp32",
                                           "bf16_autocast+channels_last"]
    assert not stepcheck.new_combination(["channels_last"]) and not stepcheck.new_combination([])
    assert not stepcheck.new_combination(["cuda_graphs", "capturable_adam"])  # graphs make Adam capturable


def test_an_interaction_fault_switches_off_bf16_first_on_the_cpu(gen, monkeypatch):
    _faults.faulty_step_features(monkeypatch, together=("bf16_autocast", "channels_last"))
    rc = RecoverConfig(lr=0.1, precision="bf16")
    logged = []
    got, fallbacks = preflight.check_step_features(_faults.step_case(gen, rc), rc, log=logged.append)
    assert got == dataclasses.replace(rc, precision="fp32")
    assert [(f["feature"], f["fallback"], f["ranks"]) for f in fallbacks] == [
        ("step feature bf16_autocast", "an fp32 teacher", [0])]
    assert fallbacks[0]["failure"].startswith("together with channels_last: loss relative error")
    assert "image update 1 (tolerance 0.75)" in fallbacks[0]["failure"]
    assert len(logged) == 1 and logged[0].startswith("warning: step feature bf16_autocast failed the pre-flight")
    with pytest.raises(ConfigError, match="bf16_autocast failed.*together with channels_last"):
        preflight.check_step_features(_faults.step_case(gen, rc), rc, strict=True)


@pytest.mark.parametrize("together, dropped", [(("cuda_graphs", "bf16_autocast"), ["cuda_graphs"]),
                                               (("bf16_autocast", "channels_last"), ["cuda_graphs", "bf16_autocast"])])
def test_on_a_gpu_a_failing_combination_drops_graphs_then_bf16(gen, monkeypatch, together, dropped):
    """The CUDA default (graphs, capturable Adam, bf16, channels_last) on a pretended GPU: the
    combination fails, graphs go first; if the rest still fails, bf16 goes too."""
    _faults.faulty_step_features(monkeypatch, together=together, cuda=True)
    rc = RecoverConfig(lr=0.1, precision="bf16")
    got, fallbacks = preflight.check_step_features(_faults.step_case(gen, rc), rc)
    assert [f["feature"] for f in fallbacks] == [f"step feature {name}" for name in dropped]
    assert fallbacks[0]["failure"].startswith("together with capturable_adam, bf16_autocast, channels_last: ")
    assert got == dataclasses.replace(rc, cuda_graphs="off", precision="fp32" if len(dropped) > 1 else "bf16")


def test_a_feature_missing_the_fixed_tolerance_is_judged_against_the_step_s_rounding_floor(gen, monkeypatch):
    """With the fixed tolerances below anything a step meets (as at an ill-conditioned
    teacher, where fp32 rounding alone is amplified past them), a feature whose image update
    is off by twice the eager step's own one-ulp sensitivity (the floor) passes, one off by
    eight times it fails (FLOOR_MARGIN = 4), and one that doubles the update fails whatever
    the floor: the floor's tolerance stays below 1."""
    monkeypatch.setattr(stepcheck, "TOLERANCE", dict.fromkeys(stepcheck.TOLERANCE, 1e-12))
    monkeypatch.setattr(stepcheck, "LOSS_TOLERANCE", dict.fromkeys(stepcheck.LOSS_TOLERANCE, 1e-12))
    real_build = stepcheck.build_engine
    stretch = {"factor": 1.0}

    def stretched(model, regularizer, rc, augment, generator, lo, hi, options):
        """channels_last: the eager step with its image update ``factor`` times as long (losses exact)."""
        engine = real_build(model, regularizer, rc, augment, generator, lo, hi,
                            dataclasses.replace(options, channels_last=False))
        if options.channels_last:
            run = engine.run
            engine.run = lambda init, targets, desc="iterations": (
                lambda images, ce, reg: (init + (images - init) * stretch["factor"], ce, reg))(*run(init, targets, desc))
        return engine

    monkeypatch.setattr(stepcheck, "build_engine", stretched)
    case = _faults.step_case(gen, RecoverConfig(lr=0.1))
    loss_floor, floor = stepcheck.rounding_floor(case, stepcheck.reference_step(case)[0])
    assert 0 <= loss_floor < stepcheck.LOSS_CAP and 0 < floor < stepcheck.UPDATE_CAP  # a tiny net's losses may not move
    for times, passed in ((2, True), (8, False)):
        stretch["factor"] = 1 + times * floor
        rows = {r["feature"]: r for r in stepcheck.check(case, ["channels_last"])}
        row = rows["channels_last"]
        assert row["passed"] is passed and (row["loss_floor"], row["floor"]) == (loss_floor, floor)
        # the stretch itself rounds in fp32 at this scale: 2 and 8 keep clear of the margin 4 either way
        assert row["error"] == pytest.approx(times * floor, rel=0.25) and row["tolerance"] == stepcheck.FLOOR_MARGIN * floor
        assert rows["eager_fp32"]["floor"] is None
    _faults.faulty_step_features(monkeypatch, wrong=("channels_last",))
    row = stepcheck.check(case, ["channels_last"])[1]
    assert not row["passed"] and row["error"] == pytest.approx(1) and row["tolerance"] <= stepcheck.UPDATE_CAP < 1
