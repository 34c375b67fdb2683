"""`torchrun --nproc_per_node=2 -m unidd_fast stats|recover|evaluate` with gloo on the CPU,
against the same stage in one process.

- stats: the shards' moments are merged exactly; what differs is float32 rounding of each
  batch's covariance, because the shards put other images into each batch.
- recover: class-batches are dealt round-robin and every class-batch has its own random
  stream, so without EMU the distilled set is the single-process set bit for bit. With EMU
  a rank matches against the running mean of the batches of *earlier rounds* only (the
  batches of its own round run concurrently), so only the first class-batch is identical.
- evaluate: DistributedDataParallel over the same global batches and augmentations; each
  rank's BatchNorm sees half a batch (SyncBatchNorm has no CPU implementation), so the
  accuracy agrees closely, not exactly.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from _tiny_runs import squeeze_and_stats, torchrun
from unidd_fast import RealStats
from unidd_fast.cli import main

RECOVER = ["--ipc", "2", "--seeds", "0", "--set", "recover.batch_size=5", "--iterations", "20", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    sq, st = squeeze_and_stats(root)
    return {"root": root, "sq": sq, "st": st}


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _ok(done):
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone reports (and writes)


def test_stats_two_ranks_match_one_process(runs):
    out = runs["root"] / "st2"
    _ok(torchrun("stats", "--from", str(runs["sq"]), "--out", str(out), "--quiet"))
    got, want = RealStats.load(out / "stats.safetensors"), RealStats.load(runs["st"] / "stats.safetensors")
    assert got.sites == want.sites and got.shapes == want.shapes and got.num_images == want.num_images == 1347
    for name in want.sites:
        assert got[name].count == want[name].count
        # float32 per-batch covariances of differently composed batches: ~1e-6 of the largest entry
        for field in ("psi", "mu", "phi", "phi_soft"):
            ref = getattr(want[name], field)
            torch.testing.assert_close(getattr(got[name], field), ref, rtol=1e-4, atol=1e-5 * ref.abs().max())
        torch.testing.assert_close(got[name].phi, want[name].phi, rtol=1e-12, atol=0)  # label sums: exact
    assert json.loads((out / "results.json").read_text())["num_images"] == 1347


@pytest.mark.parametrize("emu", [False, True])
def test_recover_two_ranks_against_one_process(runs, emu):
    flags = RECOVER + ["--set", f"recover.emu={emu}"]
    two, one = runs["root"] / f"rc2_emu{emu}", runs["root"] / f"rc1_emu{emu}"
    _ok(torchrun("recover", "--from", str(runs["st"]), "--out", str(two), *flags))
    assert main(["recover", "--from", str(runs["st"]), "--out", str(one), *flags]) == 0
    names = sorted(p.name for p in (one / "batches").iterdir())
    assert names == sorted(p.name for p in (two / "batches").iterdir()) and len(names) == 4  # none missing
    assert sorted(p.relative_to(two) for p in two.glob("new*/*.png")) == \
        sorted(p.relative_to(one) for p in one.glob("new*/*.png"))
    assert not (two / "checkpoints").exists()
    got, want = load_file(str(two / "distilled.safetensors")), load_file(str(one / "distilled.safetensors"))
    assert torch.equal(got["labels"], want["labels"]) and torch.isfinite(got["images"]).all()
    same = [torch.equal(load_file(str(two / "batches" / n))["images"], load_file(str(one / "batches" / n))["images"])
            for n in names]
    if emu:
        # class-batch 1 starts from no EMU on both; the others see other running means
        assert same == [True, False, False, False]
    else:
        assert all(same) and torch.equal(got["images"], want["images"])
    log = (two / "log.txt").read_text()
    assert "class-batch 1/4" in log and "class-batch 3/4" in log and "class-batches ..4 are finished" in log


def test_evaluate_ddp_matches_one_process(runs):
    sets = runs["root"] / "random_real"
    assert main(["recover", "--from", str(runs["st"]), "--out", str(sets), "--loss", "none", "--ipc", "5",
                 "--seeds", "0", "--quiet"]) == 0
    flags = ["--from", str(sets), "--set", "evaluate.epochs=30", "--set", "evaluate.batch_size=10", "--quiet"]
    _ok(torchrun("evaluate", "--out", str(runs["root"] / "ev2"), *flags))
    assert main(["evaluate", "--out", str(runs["root"] / "ev1"), *flags]) == 0
    two, one = (json.loads((runs["root"] / d / "results.json").read_text()) for d in ("ev2", "ev1"))
    assert two["teacher_accuracy"] == one["teacher_accuracy"]
    (a,), (b,) = two["results"], one["results"]
    assert (a["method"], a["ipc"], a["seed"]) == (b["method"], b["ipc"], b["seed"]) == ("random-real", 5, 0)
    assert b["accuracy"] > 0.5  # well above chance (0.1): the comparison below means something
    assert abs(a["accuracy"] - b["accuracy"]) <= 0.03, (a, b)
    assert (runs["root"] / "ev2" / "log.txt").read_text().count("epoch 30/30") == 1
