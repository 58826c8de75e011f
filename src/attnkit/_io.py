"""Atomic file writes: write to a temporary file beside the target, then rename it into place,
so an interrupted write never leaves a half-written file and never damages the previous one.

:func:`write_durably` and :func:`fsync_dir` flush a file and a folder's entries to disk, for
writers (checkpoints) whose renames must also survive a power cut, not only a killed process."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable


def _ordinary_mode() -> int:
    """``0666 & ~umask``: what ``open()`` gives a new file (mkstemp and some writers make 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where folders cannot be
    opened (Windows) or fsynced (some network and FUSE file systems)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def write_durably(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the file should be new: ``open`` gives it ordinary
    permissions)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, give the file ordinary permissions (``0666 & ~umask``; mkstemp
    and some writers make it 0600), then rename it onto ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _ordinary_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))
