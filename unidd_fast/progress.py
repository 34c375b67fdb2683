"""Progress: tqdm bars, shown only on a terminal unless forced, silenced by --quiet; and,
for the long stages, progress lines with rate and ETA written to the run's log (log.txt)
whether or not there is a terminal."""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

_QUIET = False
LOG_EVERY = 60.0  # seconds between two progress lines in the log


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = bool(quiet)


def rate_line(done: float, total: float, seconds: float, unit: str = "it") -> str:
    """"done/total unit (rate unit/s, ETA h:mm:ss)" for ``done`` of ``total`` after ``seconds``."""
    rate = done / seconds if seconds > 0 else float("inf")
    eta = tqdm.format_interval((total - done) / rate) if 0 < rate < float("inf") else "?"
    shown = f"{rate:.3g}" if rate < float("inf") else "?"
    return f"{done:g}/{total:g} {unit} ({shown} {unit}/s, ETA {eta})"


class _Logged:
    """A tqdm bar that also calls ``log(line)`` at most every ``every`` seconds (and after the
    last item) with the count, the rate and the ETA; other attributes are the bar's."""

    def __init__(self, bar, desc: str, total, log, every: float, unit: str):
        self.bar, self.desc, self.total, self.log, self.every, self.unit = bar, desc, total, log, every, unit

    def __getattr__(self, name):
        return getattr(self.bar, name)

    def __len__(self) -> int:
        return len(self.bar)

    def __iter__(self):
        total = self.total
        start = last = time.monotonic()
        for done, item in enumerate(self.bar, 1):
            yield item
            now = time.monotonic()
            if now - last >= self.every or done == total:
                last = now
                self.log(f"{self.desc}: {rate_line(done, total or done, now - start, self.unit)}")


def progress(iterable=None, desc: str = "", total=None, enable: bool | None = None, log=None,
             every: float | None = None, unit: str = "it", **kwargs):
    """tqdm over ``iterable``; disabled when quiet, or (by default) when stderr is not a TTY.
    ``log``: also write progress lines with rate and ETA through it every ``every`` seconds
    (default LOG_EVERY), terminal or not."""
    if enable is None:
        enable = not _QUIET and sys.stderr.isatty()
    bar = tqdm(iterable, desc=desc, total=total, disable=not enable, dynamic_ncols=True, leave=False, **kwargs)
    if log is None:
        return bar
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return _Logged(bar, desc, total, log, LOG_EVERY if every is None else every, unit)
