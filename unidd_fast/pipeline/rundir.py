"""Run directories: every stage writes ``config.json`` (the resolved configuration),
``log.txt`` and ``results.json`` (metrics and ``artifacts``: absolute paths of the files
this stage made and those it was given, so ``--from DIR`` finds everything upstream)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from ..real_stats import atomic_write
from .config import Config


def write_json(path, obj) -> None:
    text = json.dumps(obj, indent=2)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text + "\n"))


class RunDir:
    """The output directory of one stage. ``log`` appends to ``log.txt`` (and to the
    parent run's log), echoing to stderr unless ``quiet``."""

    def __init__(self, path, quiet: bool = False, parent: "RunDir | None" = None):
        self.path = Path(path).expanduser().resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.quiet, self.parent = quiet, parent
        self.started = time.perf_counter()

    def log(self, message: str, echo: bool = True) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        with open(self.path / "log.txt", "a") as handle:
            handle.write(line + "\n")
        if self.parent is not None:
            self.parent.log(message, echo)
        elif echo and not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def write_config(self, cfg: Config) -> None:
        cfg.write(self.path / "config.json")

    def write_results(self, results: dict) -> None:
        results = dict(results, seconds=round(time.perf_counter() - self.started, 2))
        write_json(self.path / "results.json", results)

    def child(self, name: str) -> "RunDir":
        return RunDir(self.path / name, self.quiet, parent=self)


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
