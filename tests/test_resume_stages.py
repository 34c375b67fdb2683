"""squeeze, evaluate and stats resume after a crash: rerun into the same directory, they
continue from their last checkpoint and end bit for bit where an uninterrupted run ends."""
import json

import pytest
import torch
from safetensors.torch import load_file

from _tiny_runs import TINY
from unidd_fast import RealStats, collect_real_stats
from unidd_fast.cli import main
from unidd_fast.pipeline import config, stats
from unidd_fast.pipeline.checkpoint import EpochCheckpoint
from unidd_fast.pipeline.datasets import Batches, prepare_data
from unidd_fast.pipeline.models import load_teacher
from unidd_fast.pipeline.rundir import RunDir

EVERY_EPOCH = ["--set", "checkpoint_every=0"]


class Crash(Exception):
    """The simulated kill."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_runs):
    sq, st = tiny_runs
    return {"root": tmp_path_factory.mktemp("resume"), "sq": sq, "st": st}



def crash_after_save(monkeypatch, path_name: str, epoch: int):
    """Make EpochCheckpoint raise Crash right after it wrote ``path_name`` at ``epoch``."""
    save = EpochCheckpoint.save

    def saving_then_crashing(self, model, optimizer, at_epoch, step, force=False):
        wrote = save(self, model, optimizer, at_epoch, step, force)
        if self.path.name == path_name and at_epoch == epoch:
            raise Crash(f"killed after {path_name} epoch {epoch}")
        return wrote

    monkeypatch.setattr(EpochCheckpoint, "save", saving_then_crashing)


def test_squeeze_resumes_from_its_epoch_checkpoint(runs, tmp_path, monkeypatch):
    argv = ["squeeze"] + TINY + ["--set", "squeeze.epochs=3"] + EVERY_EPOCH
    with monkeypatch.context() as patch:
        crash_after_save(patch, "squeeze.pt", 2)
        with pytest.raises(Crash):
            main(argv + ["--out", str(tmp_path / "a")])
    assert (tmp_path / "a" / "checkpoints" / "squeeze.pt").is_file()
    assert not (tmp_path / "a" / "teacher.safetensors").exists()
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "resumed from squeeze.pt after epoch 2" in log and "squeeze: epoch 3/3" in log
    assert not (tmp_path / "a" / "checkpoints" / "squeeze.pt").exists()
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    got, want = (load_file(str(tmp_path / d / "teacher.safetensors")) for d in "ab")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_evaluate_skips_finished_sets_and_resumes_the_current_one(runs, tmp_path, monkeypatch):
    sets = tmp_path / "sets"
    assert main(["recover", "--from", str(runs["st"]), "--out", str(sets), "--loss", "none", "--ipc", "2",
                 "--seeds", "0,1", "--quiet"]) == 0
    argv = ["evaluate", "--from", str(sets), "--set", "evaluate.epochs=3", "--quiet"] + EVERY_EPOCH
    with monkeypatch.context() as patch:
        crash_after_save(patch, "set001.pt", 1)
        with pytest.raises(Crash):
            main(argv + ["--out", str(tmp_path / "a")])
    progress = tmp_path / "a" / "checkpoints" / "evaluate"
    assert (progress / "set000.json").is_file() and (progress / "set001.pt").is_file()
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "evaluate random-real seed=0: finished before" in log
    assert "resumed from set001.pt after epoch 1" in log
    assert log.count("evaluate random-real ipc=2 seed=0: epoch 3/3") == 1  # set 0 was trained once
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    got, want = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert got["results"] == want["results"] and len(got["results"]) == 2
    assert got["teacher_accuracy"] == want["teacher_accuracy"]


def test_stats_resumes_after_the_last_chunk(runs, tmp_path, monkeypatch):
    cfg = config.load(runs["sq"] / "config.json")
    teacher = runs["sq"] / "teacher.safetensors"
    save, calls = stats.save_progress, []

    def saving_then_crashing(*args):
        save(*args)
        calls.append(args[3])
        if len(calls) == 3:
            raise Crash("killed after the third chunk")

    with monkeypatch.context() as patch:
        patch.setattr(stats, "save_progress", saving_then_crashing)
        with pytest.raises(Crash):
            stats.run(cfg, RunDir(tmp_path / "a", quiet=True), teacher, batch_size=200, chunk_batches=1)
    assert calls == [200, 400, 600]
    stats.run(cfg, RunDir(tmp_path / "a", quiet=True), teacher, batch_size=200, chunk_batches=1)
    assert "stats: resuming after 600 of 1347 training images" in (tmp_path / "a" / "log.txt").read_text()
    assert not (tmp_path / "a" / "checkpoints" / "stats.safetensors").exists()
    stats.run(cfg, RunDir(tmp_path / "b", quiet=True), teacher, batch_size=200, chunk_batches=1)
    got, want = (RealStats.load(tmp_path / d / "stats.safetensors") for d in "ab")
    assert got.num_images == want.num_images == 1347
    for name in want.sites:
        for field in ("psi", "mu", "phi", "phi_soft"):
            assert torch.equal(getattr(got[name], field), getattr(want[name], field)), (name, field)

    # against one uninterrupted pass over the same batches with collect_real_stats: the
    # chunks' float64 moments are merged exactly; what may differ is the float32 rounding of
    # each batch's features and covariance (the stage may run the teacher channels_last,
    # which sums the convolutions in another order): ~1e-7 of the largest entry
    model, _ = load_teacher(teacher)
    one_pass = collect_real_stats(model, Batches(prepare_data(cfg).train, 200), 10)
    for name in want.sites:
        for field in ("psi", "mu", "phi", "phi_soft"):
            ref = getattr(one_pass[name], field)
            torch.testing.assert_close(getattr(got[name], field), ref, rtol=1e-5, atol=1e-6 * ref.abs().max())
