"""Distill: squeeze → stats → recover → evaluate in one run, with the baselines.

Layout of ``<out>``: ``squeeze/``, ``stats/``, ``recover/<method>/ipc{N}_seed{S}/``,
``evaluate/``, and at the top ``config.json``, ``log.txt``, ``results.json`` and
``summary.json`` = {"teacher_accuracy", "results": [{"method", "ipc", "seed", "accuracy"}],
"seconds"}.
"""
from __future__ import annotations

import copy
import sys
import time

from . import evaluate, recover, squeeze, stats
from .checks import check_ipc
from .config import Config
from .datasets import prepare_data
from .rundir import RunDir, write_json

BASELINES = ("sre2l", "none")  # SRe2L (BN matching from noise) and a random real subset


def methods(cfg: Config) -> list[Config]:
    """One config per recover method: the configured loss first, then the baselines
    (each baseline with its own initialisation: noise for sre2l, real images for none)."""
    out = [cfg]
    for loss in BASELINES:
        if loss != cfg.recover.loss:
            c = copy.deepcopy(cfg)
            c.recover.loss, c.recover.init = loss, ""
            out.append(c)
    return out


def starts(cfg: Config) -> dict[str, str]:
    """{method: the baseline holding the very images it started from}: every method of
    ``methods(cfg)`` that starts from real images (``pick_real``, the same picks for the
    same ipc and seed) has the random real subset as its start."""
    real = [c.recover for c in methods(cfg) if recover.init_kind(c.recover) == "real"]
    start = [recover.method_name(rc) for rc in real if rc.loss == "none"]
    return {recover.method_name(rc): start[0] for rc in real if rc.loss != "none" and start}


def run(cfg: Config, out: RunDir, teacher_checkpoint=None, print_table: bool = True) -> dict:
    """Every stage into ``out``'s sub-folders; the checks of every stage that need no
    earlier stage's output (data, teacher checkpoint, ipc) run before ``out`` is claimed."""
    data = prepare_data(cfg)
    squeeze.initial_teacher(cfg, data, teacher_checkpoint)
    check_ipc(data, cfg.ipc)  # the random-real baseline starts from real images
    inputs = {"teacher_checkpoint": teacher_checkpoint} if teacher_checkpoint else {}
    if (done := out.start("distill", cfg, inputs)) is not None:
        if print_table:
            print(evaluate.summary_table(done["results"], done["teacher_accuracy"]), flush=True)
        return done
    teacher = squeeze.run(cfg, out.child("squeeze"), teacher_checkpoint)["artifacts"]["teacher"]
    stats_path = None
    if cfg.recover.loss == "cfm":
        stats_path = stats.run(cfg, out.child("stats"), teacher)["artifacts"]["stats"]
    sets = []
    for c in methods(cfg):
        name = recover.method_name(c.recover)
        sets += recover.run(c, out.child(f"recover/{name}"), teacher, stats_path)["sets"]
    ev = evaluate.run(cfg, out.child("evaluate"), teacher, sets)
    out.write_config(cfg)  # now with the normalisation the data stages resolved
    summary = {"teacher_accuracy": ev["teacher_accuracy"], "results": ev["results"]}
    table = evaluate.summary_table(ev["results"], ev["teacher_accuracy"], starts(cfg))
    out.log("distill: top-1 (%) on the real test set, mean ± half-range over seeds (count)\n" + table, echo=False)
    artifacts = {"teacher": teacher, "distilled": sets}
    if stats_path:
        artifacts["stats"] = stats_path
    summary = dict(summary, seconds=round(time.perf_counter() - out.started, 1))
    write_json(out.path / "summary.json", summary)
    out.finish(dict(summary, artifacts=artifacts))
    if print_table:
        print(table, file=sys.stdout, flush=True)
        print(f"({summary['seconds']:.0f} s; summary in {out.path / 'summary.json'})", flush=True)
    return summary
