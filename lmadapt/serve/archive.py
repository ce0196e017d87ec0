"""Unpacking an uploaded artifact archive (.tar, .tar.gz or .zip) without trusting it.

Refused: absolute paths, '..' components, links, devices, more than MAX_MEMBERS entries, more than
`max_bytes` unpacked (a zip bomb), anything not a plain file or folder. The artifact is the folder
holding method.json: the archive's root or its single top folder.
"""
from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

MAX_MEMBERS = 64


class ArchiveError(ValueError):
    pass


def _safe_name(name: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise ArchiveError(f"archive member '{name}' points outside the artifact folder (absolute or '..')")
    return p


def extract(data: bytes, dest: Path, max_bytes: int) -> Path:
    """Unpack `data` into the empty folder `dest`; -> the artifact folder inside it."""
    dest = Path(dest)
    buf = io.BytesIO(data)
    if zipfile.is_zipfile(buf):
        _extract_zip(zipfile.ZipFile(buf), dest, max_bytes)
    else:
        buf.seek(0)
        try:
            tar = tarfile.open(fileobj=buf, mode="r:*")
        except tarfile.TarError:
            raise ArchiveError("the upload is not a .tar, .tar.gz or .zip archive") from None
        with tar:
            _extract_tar(tar, dest, max_bytes)
    if (dest / "method.json").is_file():
        return dest
    subs = [p for p in dest.iterdir() if p.is_dir()]
    if len(subs) == 1 and (subs[0] / "method.json").is_file():
        return subs[0]
    raise ArchiveError("the archive holds no lmadapt artifact: method.json must be at its root or in "
                       "its single top folder (archive the folder `Adapted.save` wrote)")


def _extract_zip(z: zipfile.ZipFile, dest: Path, max_bytes: int) -> None:
    infos = z.infolist()
    if len(infos) > MAX_MEMBERS:
        raise ArchiveError(f"the archive has {len(infos)} entries; an artifact has a few (at most {MAX_MEMBERS})")
    total = 0
    for info in infos:
        p = _safe_name(info.filename)
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise ArchiveError(f"archive member '{info.filename}' is a symbolic link")
        total += info.file_size
        if total > max_bytes:
            raise ArchiveError(f"the archive unpacks to more than {max_bytes} bytes")
        target = dest.joinpath(*p.parts)
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with z.open(info) as src, open(target, "wb") as out:
            n = 0
            while chunk := src.read(1 << 20):
                n += len(chunk)
                if n > info.file_size or total - info.file_size + n > max_bytes:
                    raise ArchiveError("an archive member is larger than its header says")
                out.write(chunk)


def _extract_tar(tar: tarfile.TarFile, dest: Path, max_bytes: int) -> None:
    members, total = [], 0
    for m in tar:
        if len(members) >= MAX_MEMBERS:
            raise ArchiveError(f"the archive has more than {MAX_MEMBERS} entries; an artifact has a few")
        _safe_name(m.name)
        if not (m.isfile() or m.isdir()):
            raise ArchiveError(f"archive member '{m.name}' is a link or a special file")
        total += m.size
        if total > max_bytes:
            raise ArchiveError(f"the archive unpacks to more than {max_bytes} bytes")
        members.append(m)
    try:
        tar.extractall(dest, members=members, filter="data")  # the stdlib's own checks on top of ours
    except (tarfile.TarError, OSError) as e:
        raise ArchiveError(f"cannot unpack the archive ({e})") from None
