"""Files and folders written whole or not at all, and the sha256 of a file.

Every stage writes through these, so a killed process never leaves a half-written file or folder
under its real name: a file is written as `NAME.tmp`, fsynced and renamed; a folder is built as
`NAME.tmp/` and renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

READ_BLOCK = 1 << 22  # bytes read at a time when hashing a file


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
    """Rename a finished folder to `out`, replacing any folder there."""
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
