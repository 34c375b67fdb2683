"""Run directories: every stage writes ``config.json`` (the resolved configuration),
``log.txt`` and ``results.json`` (metrics and ``artifacts``: absolute paths of the files
this stage made and those it was given, so ``--from DIR`` finds everything upstream).

A stage claims its directory with ``start`` and seals it with ``finish``; ``run.json``
records the stage, a fingerprint of its input files and whether it finished. Running a
stage again into the same directory resumes it (or returns the finished results at once);
a different stage, configuration or input file is refused with the differing keys named,
unless ``force``, which deletes what the stage wrote there and starts over.

Under torchrun every rank checks, only rank 0 writes.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import socket
import sys
import time
from pathlib import Path

from .. import distributed
from ..errors import ConfigError
from ..real_stats import atomic_write
from .config import Config, validate
from .config import from_dict as config_from_dict
from .fingerprint import fingerprint

RUN_FILE = "run.json"
LOCK_FILE = ".unidd-lock"  # flock()ed by the process running a stage here; says who it is
_LOCKS: dict[Path, object] = {}  # run directories this process holds: {path: open lock file}
# Keys that change how a stage runs, not what it computes: resuming with other values is fine.
RUNTIME_KEYS = frozenset({"device", "threads", "checkpoint_every", "data.workers", "recover.backend",
                          "recover.cuda_graphs", "recover.compile", "recover.channels_last",
                          "recover.strict"})
# What each stage's result depends on (config sections or keys); "distill" compares everything.
STAGE_KEYS = {
    "squeeze": ("data", "model", "squeeze", "seeds"),
    "stats": ("data", "model", "recover.sites"),
    "recover": ("data", "model", "recover", "ipc", "seeds"),
    "evaluate": ("data", "model", "evaluate", "seeds"),
    "relabel": ("data", "model", "evaluate", "seeds"),
}
# What each stage writes into its run directory, as regular expressions over paths relative
# to it; ``force`` deletes the files of the earlier stage that match (and their temporaries)
# and nothing else. ``show`` pictures and log.txt stay.
_CLAIM = r"(?:config|results|run)\.json"
_SET = r"(?:distilled\.json|new\d{3}/class\d{3}_id\d{3}\.(?:png|jpg)|checkpoints/recover_rank\d+\.safetensors)"
STAGE_FILES = {
    "squeeze": r"teacher\.safetensors|checkpoints/squeeze\.pt",
    "stats": r"stats\.safetensors|checkpoints/stats\.safetensors",
    "recover": rf"(?:ipc\d+_seed\d+/)?{_SET}",
    "evaluate": r"checkpoints/evaluate/(?:teacher\.json|set\d{3}\.(?:json|pt))",
    "relabel": r"set\d{3}/epoch\d{4}\.safetensors",
}
STAGE_FILES["distill"] = "summary\\.json|" + "|".join(
    rf"{folder}/(?:{_CLAIM}|{STAGE_FILES[stage]})"
    for folder, stage in (("squeeze", "squeeze"), ("stats", "stats"), ("recover/[^/]+", "recover"),
                          ("evaluate", "evaluate")))
TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]+\.tmp")  # atomic_write's temporary file of .../NAME


def write_json(path, obj) -> None:
    text = json.dumps(obj, indent=2)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text + "\n"))


def flatten(raw: dict) -> dict:
    """{"section.field" or top-level name: value} of a config dict."""
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def config_diff(old: dict, new: dict, stage: str) -> list[str]:
    """Keys (``section.field``) whose values differ between two config dicts, restricted to
    what ``stage`` depends on; runtime keys and a not-yet-resolved normalisation are skipped."""
    old, new = flatten(old), flatten(new)
    prefixes = STAGE_KEYS.get(stage)
    diff = []
    for key in sorted(set(old) | set(new)):
        if key in RUNTIME_KEYS:
            continue
        if prefixes is not None and not any(key == p or key.startswith(p + ".") for p in prefixes):
            continue
        a, b = old.get(key), new.get(key)
        if key in ("data.mean", "data.std") and (not a or not b):
            continue  # computed from the data (digits) once the data is read
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            diff.append(key)
    return diff


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class RunDir:
    """The output directory of one stage. ``log`` appends to ``log.txt`` (and to the
    parent run's log), echoing to stderr unless ``quiet``. ``force`` (inherited by children)
    makes ``start`` wipe an earlier run instead of resuming or refusing it."""

    def __init__(self, path, quiet: bool = False, parent: "RunDir | None" = None, force: bool = False):
        self.path = Path(path).expanduser().resolve()  # created by the first file written
        self.main = distributed.info().is_main
        self.quiet, self.parent, self.force = quiet, parent, force
        self.started = time.perf_counter()

    def log(self, message: str, echo: bool = True) -> None:
        if not self.main:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / "log.txt", "a") as handle:
            handle.write(line + "\n")
        if self.parent is not None:
            self.parent.log(message, echo)
        elif echo and not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def lock(self) -> None:
        """Hold an exclusive lock on this directory (``flock`` of LOCK_FILE) until ``unlock``
        or the process ends, however it ends. ConfigError naming the holder (pid, host,
        command) if another process holds it. Rank 0 locks for all ranks; re-entrant."""
        if not self.main or self.path in _LOCKS:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "it has not said who it is yet"
            handle.close()
            raise ConfigError(f"--out {self.path} is in use by another run ({holder}): wait for it to finish, "
                              "or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                     f"{shlex.join(sys.argv)}\n")
        handle.flush()
        _LOCKS[self.path] = handle

    def unlock(self) -> None:
        handle = _LOCKS.pop(self.path, None)
        if handle is not None:
            handle.close()  # releases the flock

    def write_config(self, cfg: Config) -> None:
        if self.main:
            cfg.write(self.path / "config.json")

    def write_results(self, results: dict) -> None:
        if self.main:
            results = dict(results, seconds=round(time.perf_counter() - self.started, 2))
            write_json(self.path / "results.json", results)

    def child(self, name: str) -> "RunDir":
        return RunDir(self.path / name, self.quiet, parent=self, force=self.force)

    # --- resume / refuse / start over ----------------------------------------------------

    def _read(self, name: str) -> dict | None:
        file = self.path / name
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file} is not valid JSON ({exc}); rerun with --force to start over") from None

    def written(self, stage: str) -> list[Path]:
        """Files here that ``stage`` writes (``STAGE_FILES``), and temporaries of them."""
        pattern = re.compile(rf"(?:{_CLAIM}|{STAGE_FILES.get(stage, '(?!)')})")
        found = []
        for folder, _, names in os.walk(self.path):
            rel = Path(folder).relative_to(self.path)
            for name in names:
                temporary = TEMPORARY.fullmatch(name)
                if pattern.fullmatch((rel / (temporary.group(1) if temporary else name)).as_posix()):
                    found.append(Path(folder) / name)
        return found

    def clear(self, stage: str, inputs: list[Path]) -> None:
        """Delete what ``stage`` wrote here (``written``) and the folders that leaves empty;
        refuse (ConfigError) if one of those files is, or lies in, an input of the new run."""
        doomed = self.written(stage)
        for path in doomed:
            hit = next((i for i in inputs if path == i or i in path.parents), None)
            if hit is not None:
                raise ConfigError(f"--force would delete {path}, an input of this run ({hit}): choose another "
                                  f"--out, or move the input out of {self.path}")
        if not self.main:
            return
        for path in doomed:
            path.unlink(missing_ok=True)
        for folder in sorted({p.parent for p in doomed}, key=lambda p: len(p.parts), reverse=True):
            while folder != self.path and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent

    def start(self, stage: str, cfg: Config, inputs: dict | None = None) -> dict | None:
        """Claim this directory for ``stage`` with ``cfg`` and the input files ``inputs``
        ({name: path or list of paths}). Returns the stored results if the same run finished
        here before (nothing to do), else None after writing config.json and run.json.

        Raises ConfigError naming the differing keys if the directory holds another stage,
        configuration or input file, unless ``force`` (then it starts over)."""
        validate(cfg)
        if cfg.data.data and cfg.data.dataset != "digits":
            inputs = dict(inputs or {}, data=cfg.data.data)
        if self.parent is None:
            self.lock()
        prints = {name: ([fingerprint(p) for p in value] if isinstance(value, (list, tuple)) else fingerprint(value))
                  for name, value in (inputs or {}).items() if value is not None}
        before = self._read(RUN_FILE)
        if before is not None and self.main:  # under the lock: temporaries of a killed writer
            for path in self.written(str(before.get("stage"))):
                if TEMPORARY.fullmatch(path.name):
                    path.unlink(missing_ok=True)
        if before is not None and self.force:
            distributed.barrier()  # every rank has read run.json before rank 0 deletes it
            self.clear(str(before.get("stage")), _input_paths(inputs, cfg))
            self.log(f"{stage}: --force: deleted the earlier {before.get('stage')} run in {self.path}")
            before = None
        if before is not None:
            self._refuse_a_different_run(before, stage, cfg, prints)
            if before.get("finished") and (results := self._read("results.json")) is not None:
                self.log(f"{stage}: already finished in {self.path} with this configuration (--force to redo)")
                return results
            self.log(f"{stage}: resuming the run in {self.path}")
        self.write_config(cfg)
        if self.main:
            write_json(self.path / RUN_FILE, {"stage": stage, "inputs": prints, "finished": False})
        distributed.barrier()
        return None

    def _refuse_a_different_run(self, before: dict, stage: str, cfg: Config, prints: dict) -> None:
        hint = "rerun with --force to delete it and start over, or choose another --out"
        if before.get("stage") != stage:
            raise ConfigError(f"{self.path} holds a `{before.get('stage')}` run, not `{stage}`: {hint}")
        old = self._read("config.json") or {}
        try:  # keys added to Config since the file was written take their defaults
            old = config_from_dict(old).to_dict()
        except ConfigError:
            pass  # compared as written
        new = cfg.to_dict()
        flat_old, flat_new = flatten(old), flatten(new)
        changes = [f"{k}: {_show(flat_old.get(k))} -> {_show(flat_new.get(k))}" for k in config_diff(old, new, stage)]
        old_inputs = before.get("inputs", {})
        for name in sorted(set(old_inputs) | set(prints)):
            if old_inputs.get(name) != prints.get(name):
                changes.append(f"input {name}: {describe_change(old_inputs.get(name), prints.get(name))}")
        if changes:
            raise ConfigError(f"{self.path} holds a `{stage}` run with a different configuration "
                              f"({'; '.join(changes)}): {hint}")

    def finish(self, results: dict) -> None:
        """Write results.json and mark the run finished (a rerun returns these results)."""
        self.write_results(results)
        if self.main:
            run = self._read(RUN_FILE) or {}
            write_json(self.path / RUN_FILE, dict(run, finished=True))


def _input_paths(inputs: dict | None, cfg: Config) -> list[Path]:
    """Absolute paths of a run's input files and folders, its dataset's included."""
    values = [cfg.data.data] if cfg.data.data else []
    for value in (inputs or {}).values():
        values += value if isinstance(value, (list, tuple)) else [value]
    return [Path(v).expanduser().resolve() for v in values if v]


def describe_change(old, new) -> str:
    """"a.safetensors -> b.safetensors", or "a.safetensors (its contents changed)"."""
    def paths(value):
        return [p["path"] for p in (value if isinstance(value, list) else [value])] if value else []

    if old and new and paths(old) == paths(new):
        return f"{', '.join(paths(new))} (its contents changed)"
    return f"{', '.join(paths(old)) or 'none'} -> {', '.join(paths(new)) or 'none'}"


def read_results(path) -> dict:
    """``results.json`` of the run directory ``path`` (what ``--from`` reads)."""
    path = Path(path).expanduser()
    file = path / "results.json"
    if not file.is_file():
        raise ConfigError(f"--from {path}: no results.json there; point it at the output directory of a "
                          "finished unidd-fast stage (squeeze, stats or recover)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file} is not valid JSON ({exc}); rerun the stage that wrote it") from None
