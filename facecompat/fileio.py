"""Files written whole or not at all, and file fingerprints.

Every file the project writes goes through a temporary name in the same folder and is renamed
onto its path only when complete (``os.replace`` is atomic on POSIX), so a run killed at any
moment leaves the old file or the new one, never half of one. Temporary files get the mode a
plain ``open`` would give (``mkstemp`` makes them private).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new temporary file next to ``path`` (same filesystem, so the rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    return fd, tmp


class atomic_write:
    """``with atomic_write(path, mode) as f``: write ``f``; it is renamed onto ``path`` on success,
    removed on an exception. ``fsync=True`` flushes it to disk before the rename (checkpoints)."""

    def __init__(self, path: str | os.PathLike, mode: str = "wb", *, fsync: bool = False,
                 encoding: str | None = None):
        self.path = Path(path)
        self.mode = mode
        self.fsync = fsync
        self.encoding = encoding if encoding is not None or "b" in mode else "utf-8"

    def __enter__(self) -> IO[Any]:
        fd, self.tmp = _temp_beside(self.path)
        self.file = os.fdopen(fd, self.mode, encoding=self.encoding)
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self.fsync:
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_path(path) as tmp``: a writer that needs a file name (a numpy memmap, a
    library's own ``save``) writes ``tmp``; it is renamed onto ``path`` on success and removed on
    an exception."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        yield Path(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.replace(tmp, path)


def file_sha1(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-1 of a file's bytes (checkpoint, weights and face-list fingerprints)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()
