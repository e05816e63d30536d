"""Crash-safe file writes shared by the plan cache and the dataset shards."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional


def fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a directory so a rename in it survives a crash.

    Skipped silently where directories cannot be opened (Windows) or synced.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(target: Path, data: bytes | bytearray | memoryview, *, prefix: str,
                 suffix: str = "", mode: Optional[int] = None, sync_dir: bool = True) -> None:
    """Write ``data`` to ``target`` through a temporary file in the same directory.

    The temporary file is written, flushed and fsynced, then ``os.replace``-d onto ``target``
    (readers see the old file or the new one, never a partial one) and removed on any failure.
    ``sync_dir=False`` leaves the directory fsync to the caller (to batch several renames).
    """
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
    try:
        with open(fd, "wb") as f:
            if mode is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync_dir:
        fsync_dir(target.parent)
