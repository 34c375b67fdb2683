"""The unidd-fast command line: help, errors that name the fix, kernels forwarding."""
import subprocess
import sys

import pytest

from unidd_fast.cli import main


@pytest.mark.parametrize("command", ["distill", "squeeze", "stats", "recover", "evaluate", "plan", "show"])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"unidd-fast {command}" in out
    if command != "show":
        for flag in ("--out", "--from", "--dataset", "--data", "--ipc", "--seeds", "--iterations", "--device",
                     "--quiet", "--set"):
            assert flag in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "distill" in out and "kernels" in out


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "unidd_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "squeeze" in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["squeeze", "--dataset", "cifar10", "--quiet"], "needs --data PATH"),
    (["squeeze", "--dataset", "cifar10", "--data", "/nonexistent/cifar", "--quiet"], "cifar-10-batches-py"),
    (["squeeze", "--dataset", "imagenet", "--data", "/nonexistent/inet", "--quiet"], "train/<class>/<image>"),
    (["recover", "--set", "recover.lrr=1", "--quiet"], "unknown config key 'recover.lrr'"),
    (["recover", "--teacher", "t.safetensors", "--quiet"], "recover needs --stats FILE"),
    (["recover", "--loss", "sre2l", "--quiet"], "recover needs --teacher FILE"),
    (["stats", "--quiet"], "stats needs --teacher FILE"),
    (["evaluate", "--teacher", "t.safetensors", "--quiet"], "evaluate needs --distilled PATH"),
    (["evaluate", "--quiet"], "evaluate needs --teacher FILE"),
    (["recover", "--from", "/nonexistent/run", "--quiet"], "--from /nonexistent/run does not exist"),
    (["squeeze", "--set", "squeeze.epochs=lots", "--quiet"], "squeeze.epochs='lots'"),
    (["squeeze", "--teacher-checkpoint", "/nonexistent.pt", "--quiet"], "/nonexistent.pt does not exist"),
    (["show", "/nonexistent/run"], "does not exist"),
    (["plan", "--nproc", "0"], "--nproc must be >= 1"),
    (["plan", "--dataset", "folder"], "plan for --dataset folder counts the images: give --data"),
])
def test_errors_name_the_problem(argv, message, capsys, tmp_path):
    if argv[0] != "show":
        argv += ["--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"unidd-fast {argv[0]}: error:" in err and message in err


def test_bad_list_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["recover", "--ipc", "one"])
    assert exit_info.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_kernels_forwards_to_the_aot_tool(monkeypatch):
    import unidd_fast.kernels.compile_report as aot

    seen = []
    monkeypatch.setattr(aot, "main", lambda argv: seen.append(argv) or 0)
    assert main(["kernels", "--target", "sm_80", "--skip-cuda"]) == 0
    assert seen == [["--target", "sm_80", "--skip-cuda"]]
