"""Concurrent runs into one --out, and when a run directory is claimed."""
import json
import socket
import subprocess
import sys

from _tiny_runs import ROOT, TINY, env
from unidd_fast.cli import main

HOLD = """
import sys
from unidd_fast.pipeline.rundir import RunDir
RunDir(sys.argv[1]).lock()
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_run_into_a_locked_out_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=env(), cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # waits for the state asserted
        assert main(["squeeze", "--out", str(out)] + TINY) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is in use by another run (pid {holder.pid} on {socket.gethostname()}" in err, err
        assert len(err.strip().splitlines()) == 1
        assert not (out / "config.json").exists() and not (out / "run.json").exists()
    finally:
        holder.kill()  # a killed holder releases the lock
        holder.wait()
    assert main(["squeeze", "--out", str(out)] + TINY) == 0
    assert json.loads((out / "run.json").read_text())["finished"]
    assert main(["squeeze", "--out", str(out)] + TINY) == 0  # a finished run in this process released it too


def _claimed(out) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if p.name in ("config.json", "run.json"))


def test_the_run_directory_is_claimed_only_after_every_check(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    too_many = ["--ipc", "1000", "--seeds", "0"]  # digits has ~135 training images per class
    sq = tmp_path / "sq"
    assert main(["squeeze", "--out", str(sq)] + TINY) == 0
    cases = [["squeeze", "--teacher-checkpoint", str(garbage)] + TINY,
             ["recover", "--teacher", str(sq / "teacher.safetensors"), "--loss", "none"] + too_many + TINY,
             ["distill", "--teacher-checkpoint", str(garbage)] + TINY,
             ["distill"] + too_many + TINY]
    for i, argv in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert main(argv[:1] + ["--out", str(out)] + argv[1:]) == 2, argv
        err = capsys.readouterr().err
        assert "garbage.pt" in err or "fewer than ipc=1000" in err, err
        assert _claimed(out) == [], (argv, _claimed(out))


def test_a_refused_distill_rerun_leaves_the_run_as_it_was(tmp_path, capsys):
    out = tmp_path / "distill"
    argv = ["distill", "--out", str(out), "--ipc", "1", "--seeds", "0", "--iterations", "1", "--set",
            "evaluate.epochs=1"] + TINY
    assert main(argv) == 0
    config = (out / "config.json").read_text()
    assert main(argv + ["--set", "recover.lr=0.5"]) == 2
    assert "recover.lr: 0.25 -> 0.5" in capsys.readouterr().err
    assert (out / "config.json").read_text() == config
    assert main(argv) == 0  # finished: nothing to do
    assert "already finished" in (out / "log.txt").read_text()


def test_temporary_files_left_by_a_kill_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "sq"
    assert main(["squeeze", "--out", str(out)] + TINY) == 0
    left = [out / ".teacher.safetensors.k2x_9abc.tmp", out / "checkpoints" / ".squeeze.pt.a1b2c3d4.tmp",
            out / ".run.json.zz00zz00.tmp"]
    mine = [out / ".notes.tmp", out / "checkpoints" / "mine.txt"]
    for path in left + mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
    assert main(["squeeze", "--out", str(out)] + TINY) == 0  # finished: nothing to redo, but cleaned
    assert not any(p.exists() for p in left)
    assert all(p.read_text() == "partial" for p in mine)


def test_atomic_write_syncs_the_file_and_its_directory(tmp_path, monkeypatch):
    import os
    import stat
    from pathlib import Path

    from unidd_fast import real_stats

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(real_stats.os, "fsync", fsync)
    real_stats.atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
    assert synced == [False, True]  # the file before the rename, the directory after it
