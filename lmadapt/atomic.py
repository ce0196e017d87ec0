"""Atomic writes: nothing half-written is ever visible under the final name.

A file is written to a temp file in the same folder and renamed over the target. A folder
(artifact, checkpoint) is written to a temp folder; an existing folder is first renamed aside to
`.NAME.old-PID`, then the new one renamed into place, then the old one removed. A kill between
those two renames leaves no NAME but a complete `.NAME.old-*`: `existing_dir` finds it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    write_file(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2, default=str)))


def write_dir(directory: str | os.PathLike, write: Callable[[Path], None]) -> int:
    """`write(tmp_folder)` fills a temp folder that then replaces `directory`; -> bytes written."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a folder; choose another path")
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        size = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return size
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def existing_dir(directory: str | os.PathLike) -> Path | None:
    """`directory`, or the complete previous version a kill left aside, or None."""
    directory = Path(directory)
    if directory.is_dir():
        return directory
    olds = sorted(directory.parent.glob(f".{directory.name}.old-*"), key=lambda p: p.stat().st_mtime)
    return olds[-1] if olds else None
