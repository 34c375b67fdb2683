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
