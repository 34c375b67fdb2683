"""Recover survives SIGKILL: a killed run, rerun into the same directory, finishes with the
distilled set of an uninterrupted run bit for bit, without recomputing a finished class-batch."""
import json
import re
import signal
import subprocess

import pytest

from _tiny_runs import command, env, wait_until
from unidd_fast.cli import main
from unidd_fast.pipeline.checkpoint import RecoverCheckpoint
from unidd_fast.pipeline.distilled import INDEX_FILE

# ipc 2 × 10 classes in class-batches of 5 classes = 4 class-batches; the kill comes once the
# second is on disk, so it normally lands while the third or fourth runs (~0.2 s each)
ARGS = ["--ipc", "2", "--seeds", "0", "--set", "recover.batch_size=5", "--iterations", "100", "--quiet"]
LINE = re.compile(r"class-batch (\d+)/4 ce")


@pytest.fixture(scope="module")
def stats_run(tiny_runs):
    return tiny_runs[1]


def _computed(log_text: str) -> list[int]:
    return [int(m.group(1)) for m in LINE.finditer(log_text)]


def test_sigkill_mid_run_then_resume_is_bit_identical(stats_run, tmp_path):
    out = tmp_path / "killed"
    argv = ["recover", "--from", str(stats_run), "--out", str(out), *ARGS]
    proc = subprocess.Popen(command(*argv), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    second = out / "new009" / "class009_id000.png"  # the last image of class-batch 2

    def started():
        assert proc.poll() is None or second.exists(), proc.stderr.read().decode()[-2000:]
        return second.exists()

    wait_until(started, "class-batch 2's images")
    proc.kill()  # at any instant from here on: mid-run, or (on a starved machine) after the end
    proc.wait()
    proc.stderr.close()
    finished = (out / INDEX_FILE).exists()
    assert proc.returncode == -signal.SIGKILL or (finished and proc.returncode == 0)
    if not finished:
        done, _, _, _ = RecoverCheckpoint(out / "checkpoints").load("cpu")
        assert 2 <= done <= 4 and len(list(out.glob("new*/*.png"))) <= 5 * done  # checkpoint before files
    before = (out / "log.txt").read_text()

    assert main(argv) == 0  # the rerun, in this process (the run sets threads=1, as in the child)
    after = (out / "log.txt").read_text()[len(before):]
    if finished:
        assert "already finished" in after and _computed(after) == []
    else:
        assert f"resuming after class-batch {done}/4" in after
        assert _computed(after) == list(range(done + 1, 5))  # nothing finished was computed again
    assert not (out / "checkpoints").exists()

    clean = tmp_path / "clean"
    assert main(["recover", "--from", str(stats_run), "--out", str(clean), *ARGS]) == 0
    assert _computed((clean / "log.txt").read_text()) == [1, 2, 3, 4]
    assert len(list(clean.glob("new*/*.png"))) == 20
    for png in sorted(clean.glob("new*/*.png")):
        assert (out / png.relative_to(clean)).read_bytes() == png.read_bytes(), png.name
    assert json.loads((out / "results.json").read_text())["sets"][0]["ipc"] == 2


def test_a_checkpoint_left_beside_a_finished_set_is_removed_by_the_rerun(stats_run, tmp_path):
    out = tmp_path / "finished"
    argv = ["recover", "--from", str(stats_run), "--out", str(out), "--ipc", "1", "--seeds", "0", "--iterations", "2",
            "--quiet"]
    assert main(argv) == 0
    # as if killed between writing distilled.json and removing the checkpoint
    RecoverCheckpoint(out / "checkpoints").save(2, {}, 0)
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(dict(run, finished=False)))
    assert main(argv) == 0
    assert not (out / "checkpoints").exists()
    assert "already finished" in (out / "log.txt").read_text()
