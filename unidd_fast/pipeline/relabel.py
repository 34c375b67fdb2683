"""The ``unidd-fast relabel`` stage: stored soft labels (``labels.py``) for every evaluation
job of a run, one ``set{i:03d}/`` folder per job in ``evaluate``'s order."""
from __future__ import annotations

from .config import Config
from .evaluate import load_distilled, prepare_jobs
from .labels import record
from .rundir import RunDir


def run(cfg: Config, out: RunDir, teacher_path, distilled: list) -> dict:
    """Write the labels of every evaluation job (distilled set × seed, as ``evaluate`` lists
    them) into ``set{i:03d}/``; resumable per epoch file."""
    device, data, teacher, _, jobs, inputs = prepare_jobs(cfg, teacher_path, distilled)
    if (done := out.start("relabel", cfg, inputs)) is not None:
        return done
    records = []
    for i, job in enumerate(jobs):
        images, _ = load_distilled(job["path"], data, in_memory=True)
        folder = out.path / f"set{i:03d}"
        label = f"relabel {job['method']} ipc={job['ipc']} seed={job['seed']}"
        written = record(teacher, images, cfg.evaluate, cfg.data.flip, device, job["seed"], folder,
                         cfg.evaluate.label_topk, desc=label)
        out.log(f"{label}: {cfg.evaluate.epochs} epochs in {folder} ({written} written now)")
        records.append(dict(job, labels=str(folder)))
    results = {"results": records, "artifacts": {"teacher": str(teacher_path), "labels": str(out.path),
                                                 "distilled": [str(j["path"]) for j in jobs]}}
    out.finish(results)
    return results
