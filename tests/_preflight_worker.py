"""Run by tests/test_preflight_torchrun.py under ``torchrun --nproc_per_node=2`` (gloo, CPU):
the pre-flight with a fault on one rank only, each rank writing what it decided (backend,
recover settings, fallbacks, warnings, errors) to argv[1]/rank{R}.json."""
import json
import sys
from pathlib import Path

import pytest
import torch

import _faults
from unidd_fast import distributed as ud
from unidd_fast.pipeline import preflight
from unidd_fast.pipeline.config import RecoverConfig


def outcome(call) -> dict:
    """What ``call(log)`` returned or raised, and what it logged."""
    logged = []
    try:
        got, fallbacks = call(logged.append)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "log": logged}
    if isinstance(got, RecoverConfig):
        got = {"precision": got.precision, "channels_last": got.channels_last}
    return {"got": got, "fallbacks": fallbacks, "log": logged}


def main(out: Path) -> None:
    here = ud.init("cpu")
    rank, record = here.rank, {}
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5)).eval()
    with pytest.MonkeyPatch.context() as mp:  # backend "faulty" is wrong on rank 1 only
        _faults.install(mp, broken=rank == 1)
        record["backend"] = outcome(lambda log: preflight.check_backends(model, (3, 6, 6), 500, "cpu", "faulty",
                                                                         log=log))
    rc = RecoverConfig(lr=0.1, precision="bf16")  # bf16 and channels_last on the CPU

    def features(strict=False, broken=None):
        case = _faults.step_case(torch.Generator().manual_seed(1), rc)  # the same case on every rank
        if broken is not None:
            broken(case)
        return outcome(lambda log: preflight.check_step_features(case, rc, strict, log))

    faults = {"alone": (0, {"wrong": ("channels_last",)}), "together": (1, {"together": ("bf16_autocast",
                                                                                        "channels_last")})}
    for name, (faulty_rank, fault) in faults.items():
        for strict in (False, True):
            with pytest.MonkeyPatch.context() as mp:
                if rank == faulty_rank:
                    _faults.faulty_step_features(mp, **fault)
                record[name + "_strict" * strict] = features(strict)
    record["raising"] = features(broken=lambda case: case.init[1].fill_(float("nan")) if rank == 1 else None)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    ud.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
