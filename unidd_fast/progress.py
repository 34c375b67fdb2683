"""Progress bars: tqdm, shown only on a terminal unless forced, silenced by --quiet."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = bool(quiet)


def progress(iterable=None, desc: str = "", total=None, enable: bool | None = None, **kwargs):
    """tqdm over ``iterable``; disabled when quiet, or (by default) when stderr is not a TTY."""
    if enable is None:
        enable = not _QUIET and sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=not enable, dynamic_ncols=True, leave=False, **kwargs)
