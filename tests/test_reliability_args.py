"""Bad arguments fail before any work with a message saying what to change; a run
directory refuses another stage, configuration or input file (naming the difference),
returns a finished run as it is, and starts over with --force."""
import json

import pytest

from _pipeline_data import write_image_folders
from _tiny_runs import TINY, squeeze_and_stats
from unidd_fast.cli import main
from unidd_fast.errors import ConfigError
from unidd_fast.pipeline import config
from unidd_fast.pipeline.rundir import config_diff


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("args")
    sq, st = squeeze_and_stats(root)
    (root / "garbage.safetensors").write_bytes(b"\x00" * 40)
    write_image_folders(root / "folder", per_class=2, size=8)  # 3 classes
    return {"sq": sq, "st": st, "root": root}



def _fails(argv, capsys, *messages):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for message in messages:
        assert message in err, err
    return err


BAD_VALUES = [
    (["--ipc", "0"], "ipc=0 is invalid: expected one or more distinct integers >= 1", "--ipc"),
    (["--set", "recover.beta=-0.1"], "recover.beta=-0.1 is invalid: expected a regularisation β > 0",
     "--set recover.beta="),
    (["--set", "recover.beta_min=0"], "recover.beta_min=0.0 is invalid", "β_min > 0"),
    (["--set", "recover.batch_size=0"], "recover.batch_size=0 is invalid", "class count >= 1"),
    (["--iterations", "-5"], "recover.iterations=-5 is invalid", "--iterations or --set recover.iterations"),
    (["--set", "recover.lr=0"], "recover.lr=0.0 is invalid", "learning rate > 0"),
    (["--set", "evaluate.temperature=-1"], "evaluate.temperature=-1.0 is invalid", "temperature > 0"),
    (["--set", "recover.betas=0.5,1.5"], "recover.betas=0.5,1.5 is invalid", "[0, 1)"),
    (["--set", "data.dataset=mnist"], "data.dataset='mnist': choose one of", "digits"),
    (["--set", "data.split_seed=-1"], "data.split_seed=-1 is invalid", "[0, 2**32)"),
    (["--seeds", str(2**64)], f"seeds={2**64} is invalid", "< 2**63"),
    (["--iterations", str(10**23)], f"recover.iterations={10**23} is invalid", "<= 10000000"),
    (["--set", "data.image_size=4096"], "data.image_size=4096 is invalid", "<= 1024"),
    (["--set", "model.width=1000000000"], "model.width=1000000000 is invalid", "<= 4096"),
    (["--ipc", "1,1", "--seeds", "0"], "ipc=1,1 is invalid", "distinct"),
    (["--ipc", "1", "--seeds", "0,0"], "seeds=0,0 is invalid", "distinct"),
    (["--set", "recover.beta=inf"], "recover.beta=inf is invalid: expected a regularisation β > 0"),
    (["--set", "recover.lr=inf"], "recover.lr=inf is invalid"),
    (["--set", "data.workers=5000"], "data.workers=5000 is invalid", "<= 64"),
    (["--set", "data.workers=-2"], "data.workers=-2 is invalid", "-1 for the machine's cores"),
    (["--set", "data.std=inf"], "data.std=inf is invalid: expected finite standard deviations > 0"),
    (["--set", "data.mean=nan"], "data.mean=nan is invalid: expected finite means"),
    (["--set", "data.image_size=12", "--set", "model.depth=3"], "data.image_size=12 must be a multiple of 8",
     "model.depth"),
]


@pytest.mark.parametrize("case", BAD_VALUES, ids=lambda case: " ".join(case[0]))
def test_bad_values_fail_before_the_run_directory_exists(runs, tmp_path, capsys, case):
    extra, *messages = case
    out = tmp_path / "never"
    _fails(["recover", "--from", str(runs["st"]), "--out", str(out), "--quiet"] + extra, capsys, *messages)
    assert not out.exists()


def test_unknown_dataset_flag_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["squeeze", "--dataset", "mnist"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'mnist'" in capsys.readouterr().err


def test_missing_inputs_and_unwritable_output(runs, tmp_path, capsys):
    teacher = str(runs["sq"] / "teacher.safetensors")
    _fails(["recover", "--teacher", "/nonexistent/t.safetensors", "--loss", "none", "--quiet", "--out",
            str(tmp_path / "a")], capsys, "--teacher /nonexistent/t.safetensors does not exist", "unidd-fast squeeze")
    _fails(["recover", "--teacher", teacher, "--stats", "/nonexistent/s.safetensors", "--quiet", "--out",
            str(tmp_path / "b")], capsys, "--stats /nonexistent/s.safetensors does not exist")
    _fails(["evaluate", "--teacher", teacher, "--distilled", "/nonexistent/set", "--quiet", "--out",
            str(tmp_path / "c")], capsys, "--distilled /nonexistent/set does not exist")
    _fails(["squeeze", "--dataset", "folder", "--data", "/nonexistent/data", "--quiet", "--out", str(tmp_path / "d")],
           capsys, "/nonexistent/data does not exist")
    assert not any((tmp_path / n).exists() for n in "abcd")
    _fails(["squeeze", "--quiet", "--out", "/proc/unidd-run"] + TINY, capsys, "--out /proc/unidd-run is not writable",
           "--out DIR")
    (tmp_path / "file").write_text("")
    _fails(["squeeze", "--quiet", "--out", str(tmp_path / "file" / "run")] + TINY, capsys, "is a file, not a directory")


def test_inputs_that_do_not_fit_fail_before_any_work(runs, tmp_path, capsys):
    teacher = str(runs["sq"] / "teacher.safetensors")
    out = tmp_path / "run"
    # a 10-class digits teacher on a 3-class image folder
    _fails(["recover", "--teacher", teacher, "--loss", "none", "--dataset", "folder", "--data",
            str(runs["root"] / "folder"), "--quiet", "--out", str(out), "--set", "data.image_size=8",
            "--set", "data.channels=1", "--set", "data.mean=0.5", "--set", "data.std=0.25"],
           capsys, "the teacher predicts 10 classes but the dataset folder has 3")
    # an 8 px teacher asked to take 16 px images
    _fails(["stats", "--from", str(runs["sq"]), "--set", "data.image_size=16", "--quiet", "--out", str(out)],
           capsys, "trained on 8 px images but data.image_size is 16", "--set data.image_size=8")
    _fails(["recover", "--from", str(runs["st"]), "--stats", str(runs["root"] / "garbage.safetensors"), "--quiet",
            "--out", str(out)], capsys, "garbage.safetensors is not a readable statistics file")
    assert not (out / "run.json").exists() and not (out / "config.json").exists()


def test_run_directory_refuses_other_configurations_and_force_starts_over(runs, tmp_path, capsys):
    out = tmp_path / "rc"
    base = ["recover", "--from", str(runs["st"]), "--out", str(out), "--seeds", "0", "--iterations", "2",
            "--set", "recover.batch_size=5", "--quiet"]
    assert main(base + ["--ipc", "2"]) == 0
    assert (out / "new000" / "class000_id001.png").is_file()
    # STAGE_FILES["recover"] covers exactly what recover wrote: --force and the temporary cleanup see all of it
    from unidd_fast.pipeline.rundir import RunDir

    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    written = {p.relative_to(out).as_posix() for p in RunDir(out).written("recover")}
    assert "distilled.json" in written and files - written == {"log.txt", ".unidd-lock"}, files - written
    capsys.readouterr()

    err = _fails(base + ["--ipc", "1", "--set", "recover.beta=0.2"], capsys, "holds a `recover` run with a different "
                 "configuration", "ipc: [2] -> [1]", "recover.beta: 0.1 -> 0.2", "--force")
    assert "threads" not in err
    other_teacher = runs["root"] / "sq2"
    assert main(["squeeze", "--out", str(other_teacher), "--set", "seeds=1"] + TINY) == 0
    _fails(base + ["--ipc", "2", "--teacher", str(other_teacher / "teacher.safetensors"), "--allow-stats-mismatch"],
           capsys,
           "input teacher:", "sq/teacher.safetensors -> ", "sq2/teacher.safetensors")
    _fails(["stats", "--from", str(runs["sq"]), "--out", str(out), "--quiet"], capsys,
           "holds a `recover` run, not `stats`")

    # the same run again: finished, nothing is recomputed; runtime keys may differ
    log_lines = (out / "log.txt").read_text().count("class-batch")
    assert main(base + ["--ipc", "2", "--set", "threads=2"]) == 0
    assert "already finished" in (out / "log.txt").read_text()
    assert (out / "log.txt").read_text().count("class-batch") == log_lines

    assert main(base + ["--ipc", "1", "--force"]) == 0
    assert not (out / "new000" / "class000_id001.png").exists()  # the ipc-2 images are gone
    assert json.loads((out / "config.json").read_text())["ipc"] == [1]
    assert "--force: deleted the earlier recover run" in (out / "log.txt").read_text()


def test_config_diff_compares_what_the_stage_depends_on():
    a = config.defaults("digits").to_dict()
    b = config.defaults("digits")
    b.evaluate.epochs, b.device, b.recover.eta = 5, "cuda", 0.5
    b = b.to_dict()
    assert config_diff(a, b, "recover") == ["recover.eta"]
    assert config_diff(a, b, "evaluate") == ["evaluate.epochs"]
    assert config_diff(a, b, "squeeze") == []
    a["data"]["mean"], b["data"]["mean"] = [0.3], []  # not resolved yet on one side
    assert config_diff(a, b, "squeeze") == []


def test_validate_is_called_by_the_stages_too(tmp_path):
    from unidd_fast.pipeline.rundir import RunDir

    cfg = config.defaults("digits")
    cfg.ipc = [0]
    with pytest.raises(ConfigError, match="ipc=0 is invalid"):
        RunDir(tmp_path).start("recover", cfg)


def test_keys_added_since_a_config_was_written_take_their_defaults(tmp_path):
    from unidd_fast.pipeline.rundir import RunDir

    cfg = config.defaults("digits")
    assert RunDir(tmp_path).start("recover", cfg) is None
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["recover"]["eta"], raw["data"]["flip"]  # as if written by an older version
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert RunDir(tmp_path).start("recover", cfg) is None  # resumes
    cfg.recover.eta = 0.3
    with pytest.raises(ConfigError, match=r"recover.eta: 0.1 -> 0.3"):
        RunDir(tmp_path).start("recover", cfg)


def test_force_never_deletes_an_input_of_the_new_run(runs, tmp_path, capsys):
    sq = tmp_path / "sq"
    assert main(["squeeze", "--out", str(sq)] + TINY) == 0
    teacher = sq / "teacher.safetensors"
    before = teacher.read_bytes()
    _fails(["recover", "--teacher", str(teacher), "--loss", "none", "--out", str(sq), "--force"] + TINY,
           capsys, f"--force would delete {teacher}", "an input of this run", "choose another --out")
    assert teacher.read_bytes() == before
    assert json.loads((sq / "run.json").read_text())["stage"] == "squeeze"  # nothing was claimed


def test_force_deletes_only_the_files_the_earlier_stage_wrote(runs, tmp_path, capsys):
    out = tmp_path / "st"
    argv = ["stats", "--from", str(runs["sq"]), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    mine = [out / "checkpoints" / "notes.txt", out / "recover" / "x.png", out / "batches" / "keep.safetensors",
            out / "new000" / "mine.txt", out / "show" / "plot.png", out / "ipc1_seed0" / "a.txt", out / "mine.txt"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("user data")
    assert main(argv + ["--force"]) == 0
    assert all(p.read_text() == "user data" for p in mine)
    assert (out / "stats.safetensors").is_file()
    assert "--force: deleted the earlier stats run" in (out / "log.txt").read_text()


def _replace_image(path):
    """Another image under the same name (other pixels, other size and mtime)."""
    from PIL import Image

    Image.new("RGB", (9, 9), (255, 0, 0)).save(path, format="PNG")


def test_folder_inputs_with_replaced_images_are_not_reported_as_finished(runs, tmp_path, capsys):
    data = write_image_folders(tmp_path / "data", per_class=2, size=8)
    squeeze = ["squeeze", "--dataset", "folder", "--data", str(data), "--out", str(tmp_path / "sq"), "--arch",
               "convnet"] + TINY
    assert main(squeeze) == 0
    _replace_image(data / "train" / "cat" / "0.png")
    _fails(squeeze, capsys, "input data:", f"{data} (its contents changed)", "--force")

    recover = tmp_path / "rc"
    assert main(["recover", "--from", str(runs["st"]), "--out", str(recover), "--loss", "none", "--ipc", "1",
                 "--seeds", "0", "--quiet"]) == 0
    images = tmp_path / "images"
    for png in recover.glob("new*/*.png"):  # the set as a plain image folder
        (images / png.parent.name).mkdir(parents=True, exist_ok=True)
        (images / png.parent.name / png.name).write_bytes(png.read_bytes())
    evaluate = ["evaluate", "--teacher", str(runs["sq"] / "teacher.safetensors"), "--distilled", str(images),
                "--out", str(tmp_path / "ev"), "--seeds", "0", "--set", "evaluate.epochs=1"] + TINY
    assert main(evaluate) == 0
    _replace_image(images / "new001" / "class001_id000.png")
    _fails(evaluate, capsys, "input distilled:", f"{images} (its contents changed)")

    from_run = ["evaluate", "--from", str(recover), "--out", str(tmp_path / "ev_run"), "--seeds", "0",
                "--set", "evaluate.epochs=1"] + TINY  # our own set: its index and the images beside it
    assert main(from_run) == 0
    _replace_image(recover / "new001" / "class001_id000.png")
    _fails(from_run, capsys, "input distilled:", "(its contents changed)")


def test_statistics_of_another_teacher_or_dataset_are_refused(runs, tmp_path, capsys):
    other = tmp_path / "sq_other"
    assert main(["squeeze", "--out", str(other), "--set", "seeds=1"] + TINY) == 0
    mine, theirs = runs["sq"] / "teacher.safetensors", other / "teacher.safetensors"
    base = ["recover", "--stats", str(runs["st"] / "stats.safetensors"), "--ipc", "1", "--seeds", "0",
            "--iterations", "1"] + TINY
    _fails(base + ["--teacher", str(theirs), "--out", str(tmp_path / "a")], capsys,
           "was collected with the teacher", str(mine), f"not with {theirs}", "--allow-stats-mismatch")
    _fails(base + ["--teacher", str(mine), "--set", "data.split_seed=1", "--out", str(tmp_path / "b")], capsys,
           "was collected on other data than this run reads", "data.split_seed: 0 -> 1")
    assert not any((tmp_path / n / "run.json").exists() for n in "ab")
    assert main(base + ["--teacher", str(theirs), "--allow-stats-mismatch", "--out", str(tmp_path / "c")]) == 0


def test_unreadable_from_and_a_full_disk_are_one_line_errors(runs, tmp_path, capsys, monkeypatch):
    import errno

    from unidd_fast.pipeline import squeeze

    _fails(["recover", "--from", "/etc/passwd", "--out", str(tmp_path / "a"), "--quiet"], capsys,
           "--from /etc/passwd is not a run directory")

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(squeeze, "save_teacher", full)
    err = _fails(["squeeze", "--out", str(tmp_path / "b")] + TINY, capsys, "no space left on device",
                 "teacher.safetensors", "free some space")
    assert len(err.strip().splitlines()) == 1
