"""What identifies an input: a file's content hash, or a folder's file names, sizes and
modification times (cheap: one stat per file). Run directories record these for their inputs
and statistics files for their data, so replaced inputs are never reported with old results."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

HASH_LIMIT = 2**30  # input files up to this size are fingerprinted by content, larger ones by size and mtime
# the index of a distilled set (pipeline/distilled.py), written last beside the set's class
# folders new{c:03d}/: its images count as part of it, so a replaced image is seen
SET_INDEX = "distilled.json"
SET_FOLDERS = "new"


def fingerprint(path) -> dict:
    """What identifies an input file or folder: its absolute path and content hash (size and
    mtime for files over HASH_LIMIT); for a folder (an ImageFolder dataset or distilled set)
    a hash of the names, sizes and modification times of every file under it; for a set's
    index ``distilled.json`` also that of the class folders beside it."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        return {"path": str(path), **tree_fingerprint(path)}
    if not path.is_file():
        return {"path": str(path)}
    if path.name == SET_INDEX:
        return {**_file_fingerprint(path), **tree_fingerprint(path.parent, top=SET_FOLDERS)}
    return _file_fingerprint(path)


def _file_fingerprint(path: Path) -> dict:
    size = path.stat().st_size
    if size > HASH_LIMIT:
        return {"path": str(path), "size": size, "mtime_ns": path.stat().st_mtime_ns}
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return {"path": str(path), "sha256": digest.hexdigest()}


def tree_fingerprint(folder: Path, top: str | None = None) -> dict:
    """{"files": count, "tree": sha256 of every file's relative path, size and mtime} under
    ``folder`` (following symbolic links, as ImageFolder does), or only under its sub-folders
    whose names start with ``top``; one stat per file, no reads."""
    digest, count = hashlib.sha256(), 0
    for root, dirs, names in os.walk(folder, followlinks=True):
        if top is not None and Path(root) == folder:
            dirs[:] = [d for d in dirs if d.startswith(top)]
            names = []
        dirs.sort()
        for name in sorted(names):
            file = Path(root) / name
            try:
                st = file.stat()
            except OSError:
                continue  # a dangling link: no image either
            digest.update(f"{file.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            count += 1
    return {"files": count, "tree": digest.hexdigest()}
