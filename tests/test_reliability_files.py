"""Hostile and malformed input files: each is refused with one line naming the file and the
fix (exit status 2), before anything reads what the file claims to be."""
import pickle
import subprocess

import numpy as np
import pytest

from _pipeline_data import write_cifar
from _tiny_runs import ROOT, command, env


class _ObjectFieldDtype:
    """Pickles as a structured dtype holding an object field, its flags reset to 0: numpy
    would read the array's raw bytes as object pointers."""

    def __reduce__(self):
        return (np.dtype, ("V8", False, True), (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))


class _PointerArray:
    """An 'array' of one element of that dtype whose bytes are a pointer the file chooses."""

    def __reduce__(self):
        return (np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                (1, (1,), _ObjectFieldDtype(), False, (0x4141414141414141).to_bytes(8, "little")))


def _cli(*argv):
    """The command line in a child process, so that a crash shows as a failure, not pytest's."""
    return subprocess.run(command(*argv), env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_cifar_structured_dtype_with_object_pointers_is_refused(tmp_path):
    root = write_cifar(tmp_path / "data")
    with open(root / "cifar-10-batches-py" / "data_batch_1", "wb") as handle:
        pickle.dump({"data": _PointerArray(), "labels": [0]}, handle, protocol=2)
    done = _cli("squeeze", "--dataset", "cifar10", "--data", str(root), "--out", str(tmp_path / "run"), "--quiet")
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "data_batch_1" in lines[0] and "dtype" in lines[0], done.stderr
    assert not (tmp_path / "run").exists()
