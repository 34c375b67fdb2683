"""The pre-flight under ``torchrun --nproc_per_node=2`` (gloo, CPU) with a fault on one rank
only (tests/_preflight_worker.py): every rank falls back the same way, the warning names the
rank that failed, --strict fails every rank, and a rank whose check raises does not leave the
other waiting."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from _tiny_runs import env
from unidd_fast.pipeline import preflight

WORKER = Path(__file__).with_name("_preflight_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("preflight_torchrun")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(WORKER), str(out)], env=env(), capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _same_on_both(ranks, key):
    assert ranks[0][key] == ranks[1][key]
    return ranks[0][key]


def test_a_backend_failing_on_one_rank_is_dropped_on_both(ranks):
    got = _same_on_both(ranks, "backend")
    assert got["got"] == "torch"
    assert {f["feature"]: f["ranks"] for f in got["fallbacks"]} == {
        "backend faulty for site_stats": [1], "backend faulty for regularized_inverse": [1],
        "backend faulty for regularized_inverse_grad": [1]}
    shape = (preflight.PREFLIGHT_BATCH, 5, 4, 4)  # a class-batch of 500, checked on the capped batch
    assert f"backend faulty for site_stats failed the pre-flight check on rank 1 ({shape}: relative error" in (
        got["log"][0])


def test_a_step_feature_failing_on_rank_0_is_switched_off_on_both(ranks):
    got = _same_on_both(ranks, "alone")
    assert got["got"] == {"precision": "bf16", "channels_last": False}
    assert [(f["feature"], f["ranks"]) for f in got["fallbacks"]] == [("step feature channels_last", [0])]
    assert got["log"][0].startswith("warning: step feature channels_last failed the pre-flight check on rank 0 (loss")


def test_a_combination_failing_on_rank_1_switches_bf16_off_on_both(ranks):
    got = _same_on_both(ranks, "together")
    assert got["got"] == {"precision": "fp32", "channels_last": True}
    (fallback,) = got["fallbacks"]
    assert (fallback["feature"], fallback["ranks"]) == ("step feature bf16_autocast", [1])
    assert fallback["failure"].startswith("together with channels_last: ")


@pytest.mark.parametrize("fault, rank", [("alone", 0), ("together", 1)])
def test_strict_fails_every_rank(ranks, fault, rank):
    error = _same_on_both(ranks, f"{fault}_strict")["error"]
    assert error.startswith("ConfigError: step feature ") and f"failed the pre-flight check on rank {rank}" in error


def test_a_rank_whose_check_raises_stops_the_other_too(ranks):
    assert ranks[1]["raising"]["error"].startswith("NonFiniteError: pre-flight, the eager fp32 recover step")
    assert ranks[0]["raising"]["error"].startswith(
        "UniddError: the pre-flight failed on rank 1: NonFiniteError: pre-flight, the eager fp32 recover step")
