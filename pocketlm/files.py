"""Files and folders written whole or not at all, and the sha256 of a file.

Every stage writes through these, so a killed process never leaves a half-written file or folder
under its real name: a file is written as `NAME.tmp`, fsynced and renamed; a folder is built as
`NAME.tmp/` and renamed into place.

What they publish gets the mode a plain `open()` or `mkdir()` would give it (0o666 or 0o777 less the
umask): some writers (safetensors' save_file) write a private 0600 temporary of their own and rename it,
which would leave a checkpoint unreadable to everyone sharing its folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

READ_BLOCK = 1 << 22  # bytes read at a time when hashing a file


def umask() -> int:
    """The process's umask, read without widening it for other threads even for an instant."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # No /proc (macOS): os.umask can only be read by setting it; the value set meanwhile is the strictest,
    # so a file another thread creates in that instant is private rather than open to all.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def plain_mode(path: Path, mask: int | None = None) -> None:
    """Give `path` the mode `open()` (a file) or `mkdir()` (a folder) would have created it with."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~(umask() if mask is None else mask))


class AtomicFile:
    """A file written under `NAME.tmp`, hashed as it is written, renamed to `NAME` on close."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.f = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.size += len(data)

    def close(self) -> dict:
        """Flush, fsync and rename into place; returns {"size", "sha256"} of what was written."""
        self.f.flush()
        os.fchmod(self.f.fileno(), 0o666 & ~umask())  # a NAME.tmp left by a crash keeps its old mode
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return {"size": self.size, "sha256": self.sha.hexdigest()}


def atomic_write(path: Path, data: bytes) -> dict:
    """Write `data` to `path` atomically; returns {"size", "sha256"}."""
    f = AtomicFile(path)
    f.write(data)
    return f.close()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def staging_dir(out: Path) -> Path:
    """A fresh, empty `out.tmp/` beside `out`, to build a folder in before `publish_dir`."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, out: Path) -> None:
    """Rename a finished folder to `out`, replacing any folder there; everything in it gets plain modes."""
    mask = umask()
    for path in [tmp, *tmp.rglob("*")]:
        if not path.is_symlink():
            plain_mode(path, mask)
    if not out.exists():
        os.replace(tmp, out)
        return
    # Folders can't be swapped atomically; move the old one aside only for the rename itself.
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)


def publish_files(tmp: Path, out: Path) -> None:
    """Move each file of a finished folder into the existing folder `out`, replacing files of the same
    names and keeping every other file there; `tmp` is removed."""
    mask = umask()
    for path in sorted(tmp.iterdir()):
        plain_mode(path, mask)
        os.replace(path, out / path.name)
    tmp.rmdir()
