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
import contextlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from _tiny_runs import ROOT, alive, env, torchrun, torchrun_command, wait_until
from unidd_fast import RealStats
from unidd_fast.cli import main
from unidd_fast.pipeline.distilled import INDEX_FILE, read_set
from unidd_fast.pipeline.recover import plan_class_batches

# 6 class-batches in 3 rounds, each long enough (~0.3 s) for the kill test to land mid-run
RECOVER = ["--ipc", "3", "--seeds", "0", "--set", "recover.batch_size=5", "--iterations", "200", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_runs):
    sq, st = tiny_runs
    return {"root": tmp_path_factory.mktemp("torchrun"), "sq": sq, "st": st}



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


def two_rank_recover(runs, emu: bool) -> Path:
    """The uninterrupted 2-rank recover run (made once per module)."""
    out = runs["root"] / f"rc2_emu{emu}"
    if not (out / "results.json").is_file():
        _ok(torchrun("recover", "--from", str(runs["st"]), "--out", str(out), *RECOVER, "--set", f"recover.emu={emu}"))
    return out


@pytest.mark.parametrize("emu", [False, True])
def test_recover_two_ranks_against_one_process(runs, emu):
    two, one = two_rank_recover(runs, emu), runs["root"] / f"rc1_emu{emu}"
    assert main(["recover", "--from", str(runs["st"]), "--out", str(one), *RECOVER, "--set", f"recover.emu={emu}"]) == 0
    names = sorted(p.relative_to(one) for p in one.glob("new*/*.png"))
    assert names == sorted(p.relative_to(two) for p in two.glob("new*/*.png")) and len(names) == 30  # none missing
    assert not (two / "checkpoints").exists()
    (got, got_labels), (want, want_labels) = read_set(two), read_set(one)
    assert torch.equal(got_labels, want_labels)
    # class-batch b holds the classes 5·(b mod 2) .. +4 of ipc index b // 2
    plan = plan_class_batches(10, 3, 5)
    same = [all((two / n).read_bytes() == (one / n).read_bytes() for n in names
                if int(n.parent.name[3:]) in cb.classes.tolist() and n.stem.endswith(f"id{cb.ipc_index:03d}"))
            for cb in plan]
    if emu:
        # class-batch 1 starts from no EMU on both; the others see other running means
        assert same == [True] + [False] * 5
    else:
        assert all(same) and torch.equal(got, want)
    log = (two / "log.txt").read_text()
    assert "class-batch 1/6" in log and "class-batch 5/6" in log and "class-batches ..6 are finished" in log


def _children(pid: int) -> list[int]:
    return [int(c) for t in os.listdir(f"/proc/{pid}/task")
            for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]


def test_recover_two_ranks_killed_and_resumed_is_bit_identical(runs):
    reference = two_rank_recover(runs, True)
    out = runs["root"] / "rc2_killed"
    argv = ["recover", "--from", str(runs["st"]), "--out", str(out), *RECOVER, "--set", "recover.emu=True"]
    # its own process group: torchrun and both workers are killed by one signal, as by a scheduler
    proc = subprocess.Popen(torchrun_command(*argv), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    # wait for the state asserted below: both ranks have checkpointed their first round
    checkpoints = [out / "checkpoints" / f"recover_rank{r}.safetensors" for r in (0, 1)]

    def started():
        assert proc.poll() is None or (out / INDEX_FILE).exists(), "torchrun ended before both ranks checkpointed"
        return all(c.exists() for c in checkpoints) or (out / INDEX_FILE).exists()

    wait_until(started, "both ranks' first checkpoints")
    workers = _children(proc.pid)
    with contextlib.suppress(ProcessLookupError):  # (no process left if the run had ended)
        os.killpg(proc.pid, signal.SIGKILL)  # at any instant from here on, up to after the end of the run
    proc.wait()
    wait_until(lambda: not any(alive(pid) for pid in workers), "the killed workers (nothing more is written)")
    finished = (out / INDEX_FILE).exists()  # only if the kill came after the last round
    assert finished or len(list((out / "checkpoints").glob("recover_rank*.safetensors"))) == 2

    _ok(torchrun(*argv))
    log = (out / "log.txt").read_text()
    assert finished or re.search(r"resuming after class-batch [246]/6", log), log
    (got, got_labels), (want, want_labels) = read_set(out), read_set(reference)
    assert torch.equal(got, want) and torch.equal(got_labels, want_labels)
    assert not (out / "checkpoints").exists()


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
