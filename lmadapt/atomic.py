"""Atomic writes: nothing half-written is ever visible under the final name; and reads of what
was written that turn a truncated or corrupt file into one line naming it (DamagedFile).

A file is written to a temp file in the same folder and renamed over the target. A folder
(artifact, checkpoint) is written to a temp folder; an existing folder is first renamed aside to
`.NAME.old-PID`, then the new one renamed into place, then the old one removed. A kill between
those two renames leaves no NAME but a complete `.NAME.old-*`: `existing_dir` finds it, and the
next complete write of NAME removes every `.NAME.old-*` (out of date by then).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path: str | os.PathLike, folder: bool) -> None:
    """mkstemp / mkdtemp make 0600 / 0700 (private) temps: give the final file or folder the mode
    a plain open() / mkdir() would have had (0666 / 0777 less the umask), so a result or artifact
    is readable by whoever could read a file written the usual way (a server, a teammate)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def write_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _publish_mode(tmp, folder=False)
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
        _publish_mode(tmp, folder=True)
        size = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        # the previous version, and any an earlier kill left aside: once NAME is complete again they
        # are out of date, and `existing_dir` must not fall back on them if NAME is later deleted
        for stale in directory.parent.glob(f".{directory.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)
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


# ---------------------------------------------------------------------------------------------
# Reading back what was written: a damaged file is one line naming it and what is wrong.


class DamagedFile(ValueError):
    """An artifact, checkpoint or cache file that is truncated or corrupt; the message names the
    file, the problem and the fix."""


def check_safetensors(path: str | os.PathLike) -> None:
    """Cheap structural check without reading the tensors: the 8-byte header length, the JSON
    header, and a file size equal to what the header's offsets need (catches truncation)."""
    import struct
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DamagedFile(f"{path}: truncated ({size} bytes, not even a safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise DamagedFile(f"{path}: damaged or truncated safetensors file (header of {n} bytes, "
                              f"file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DamagedFile(f"{path}: damaged safetensors file (unreadable header)") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and "data_offsets" in v]
    want = 8 + n + max(ends, default=0)
    if size != want:
        raise DamagedFile(f"{path}: truncated or damaged safetensors file ({size} bytes, its header "
                          f"needs {want})")


def read_safetensors(path: str | os.PathLike, fix: str) -> dict:
    """load_file with a one-line DamagedFile error; `fix` says what to do (re-save, retrain, ...)."""
    from safetensors.torch import load_file
    try:
        check_safetensors(path)
        return load_file(str(path))
    except DamagedFile as e:
        raise DamagedFile(f"{e}; {fix}") from None
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors' own error type is not part of its stable API
        raise DamagedFile(f"{path}: damaged safetensors file ({str(e).splitlines()[0]}); {fix}") from None


def read_json_file(path: str | os.PathLike, fix: str):
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DamagedFile(f"{path}: damaged (not UTF-8 text); {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DamagedFile(f"{path} line {e.lineno}: damaged or truncated JSON ({e.msg}); {fix}") from None
