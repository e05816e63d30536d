"""Persistent, size-bounded on-disk store of compiled plans.

A plan is stored as opaque bytes under its key, the 32-character lowercase hex
xxh3-128 digest of everything the plan depends on. The cache never interprets
the bytes: the caller passes a ``decode`` callable that parses and validates
them, and any entry that fails to decode is reported once with a
:class:`~lrpplan.errors.CacheWarning`, deleted and treated as a miss.

Layout::

    <root>/plans-v1/<key[:2]>/<key>.lrpplan

The layout version is part of the path, so a future layout never reads files
written by this one (and vice versa).

This module depends only on the standard library and :mod:`lrpplan.errors`.
"""
from __future__ import annotations

import operator
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

from lrpplan.errors import CacheWarning
from lrpplan.fsutil import atomic_write

__all__ = ["LAYOUT_VERSION", "SUFFIX", "CacheEntry", "PlanCache"]

LAYOUT_VERSION = 1
"""Version of the on-disk layout; part of the directory name (``plans-v1``)."""

SUFFIX = ".lrpplan"
"""File suffix of a stored plan."""

DEFAULT_MAX_BYTES = 512 * 2**20

_TMP_PREFIX = ".tmp-"
_KEY_RE = re.compile(r"[0-9a-f]{32}")
_PREFIX_RE = re.compile(r"[0-9a-f]{2}")

StrPath = Union[str, os.PathLike]


def _check_key(key: object) -> str:
    """Return ``key`` if it is a 32-char lowercase hex string, else raise ValueError."""
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        raise ValueError(
            f"invalid plan cache key {key!r}: expected 32 lowercase hex characters "
            "(an xxh3-128 hex digest)"
        )
    return key


def _default_root() -> Path:
    """``$LRPPLAN_CACHE``, else ``$XDG_CACHE_HOME/lrpplan``, else ``~/.cache/lrpplan``."""
    env = os.environ.get("LRPPLAN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "lrpplan"
    return Path.home() / ".cache" / "lrpplan"


def _unlink_quietly(path: Path) -> bool:
    """Remove ``path``; return whether it is gone now. Never raises OSError."""
    try:
        path.unlink()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class CacheEntry:
    """One stored plan file.

    Attributes
    ----------
    key : str
        The plan key (32 lowercase hex characters).
    path : pathlib.Path
        The file holding the plan bytes.
    size : int
        File size in bytes.
    mtime : float
        Modification time (seconds since the epoch); refreshed on every hit and
        used as the least-recently-used order for eviction.
    """

    key: str
    path: Path
    size: int
    mtime: float


class PlanCache:
    """A directory of plan files keyed by hex digest, bounded in total size.

    Parameters
    ----------
    path : str or os.PathLike, optional
        Root directory of the cache. If omitted: ``$LRPPLAN_CACHE``, else
        ``$XDG_CACHE_HOME/lrpplan``, else ``~/.cache/lrpplan``. The directory
        is created on the first write; a missing directory reads as empty.
    max_bytes : int, default 512 MiB
        Upper bound on the total size of the plan files. After each write the
        least recently used plans (oldest mtime) are evicted until the total is
        at most ``max_bytes``; the plan just written is never evicted, so a
        single plan larger than ``max_bytes`` is still kept.

    Notes
    -----
    The cache never raises for a bad entry or an unwritable directory: reads
    of unusable entries and failed writes emit one
    :class:`~lrpplan.errors.CacheWarning` each and behave as a miss / a no-op.
    Invalid keys are programming errors and raise :class:`ValueError`.

    No lock is needed, between threads or processes. A plan is a pure function
    of its key, so concurrent writers of one key write identical (or equally
    valid) bytes; each writes a private temporary file in the target
    directory and ``os.replace`` renames it over the final name atomically, so
    the last writer wins and readers see either the old complete file, the new
    complete file, or no file, never a partial one. Concurrent evictions or
    deletions only ever remove whole files, and a vanished file is a miss.
    """

    def __init__(self, path: StrPath | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        max_bytes = operator.index(max_bytes)
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.path: Path = _default_root() if path is None else Path(path).expanduser()
        self.max_bytes: int = max_bytes

    # ------------------------------------------------------------------ helpers

    @classmethod
    def ensure(cls, cache: PlanCache | StrPath | bool | None) -> PlanCache | None:
        """Coerce a user-facing ``cache=`` argument to a cache or ``None``.

        Parameters
        ----------
        cache : None, False, str, os.PathLike or PlanCache
            ``None`` gives the default cache, ``False`` disables caching, a
            path gives a cache rooted there and a :class:`PlanCache` is
            returned unchanged.

        Returns
        -------
        PlanCache or None
            ``None`` means caching is disabled.

        Raises
        ------
        TypeError
            For any other value (including ``True`` and ``0``).
        """
        if cache is False:
            return None
        if cache is None:
            return cls()
        if isinstance(cache, PlanCache):
            return cache
        if isinstance(cache, (str, os.PathLike)):
            return cls(cache)
        raise TypeError(
            "cache= must be None (default cache), False (no caching), a directory path "
            f"or a PlanCache; got {cache!r} of type {type(cache).__name__}"
        )

    @property
    def _plans_dir(self) -> Path:
        return self.path / f"plans-v{LAYOUT_VERSION}"

    def _file(self, key: str) -> Path:
        return self._plans_dir / key[:2] / f"{key}{SUFFIX}"

    def _subdirs(self) -> list[Path]:
        try:
            with os.scandir(self._plans_dir) as it:
                return [
                    Path(e.path)
                    for e in it
                    if _PREFIX_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
                ]
        except (FileNotFoundError, NotADirectoryError):
            return []

    # --------------------------------------------------------------- public API

    def get(self, key: str, decode: Callable[[bytes], Any]) -> Any | None:
        """Return ``decode(bytes)`` of the stored plan, or ``None`` on a miss.

        Parameters
        ----------
        key : str
            32 lowercase hex characters.
        decode : callable
            Parses and validates the stored bytes; raises on bad data.

        Returns
        -------
        object or None
            The decoded plan, or ``None`` if there is no entry or it is
            unusable. An unusable entry (unreadable, truncated, corrupt, stale
            or foreign bytes) emits one :class:`~lrpplan.errors.CacheWarning`
            and is deleted (best effort).

        Raises
        ------
        ValueError
            If ``key`` is not a valid key.
        """
        path = self._file(_check_key(key))
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            reason: BaseException = exc
        else:
            try:
                plan = decode(data)
            except Exception as exc:  # decode may raise anything on bad data
                reason = exc
            else:
                try:
                    os.utime(path)  # LRU bookkeeping; fine to skip on a read-only cache
                except OSError:
                    pass
                return plan
        removed = _unlink_quietly(path)
        warnings.warn(
            f"lrpplan plan cache: ignoring unusable entry {key} ({path}): "
            f"{type(reason).__name__}: {reason}; "
            + ("the file was deleted." if removed else "the file could not be deleted."),
            CacheWarning,
            stacklevel=2,
        )
        return None

    def put(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` atomically, then evict down to ``max_bytes``.

        The bytes go to a temporary file in the target directory, which is
        flushed, fsynced and renamed over the final name with ``os.replace``;
        the directory is then fsynced (best effort). No lock is taken: plans
        are a pure function of their key, so concurrent writers of one key
        write identical or equally valid bytes, the last rename wins
        atomically and readers never see a partial file.

        Parameters
        ----------
        key : str
            32 lowercase hex characters.
        data : bytes
            The serialized plan.

        Returns
        -------
        bool
            ``True`` if stored. ``False`` if the cache could not be written
            (read-only or missing permissions, disk full, any ``OSError``); a
            :class:`~lrpplan.errors.CacheWarning` says why.

        Raises
        ------
        ValueError
            If ``key`` is not a valid key.
        TypeError
            If ``data`` is not bytes-like.
        """
        target = self._file(_check_key(key))
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"plan data must be bytes, got {type(data).__name__}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, data, prefix=_TMP_PREFIX, suffix=".part")
        except OSError as exc:
            warnings.warn(
                f"lrpplan plan cache: could not store plan {key} in {self.path}: "
                f"{type(exc).__name__}: {exc}. Continuing without caching it.",
                CacheWarning,
                stacklevel=2,
            )
            return False
        self._evict(keep=target)
        return True

    def _evict(self, keep: Path) -> None:
        """Remove least recently used plans until the total is <= ``max_bytes``."""
        entries = self.entries()
        total = sum(e.size for e in entries)
        if total <= self.max_bytes:
            return
        for entry in sorted(entries, key=lambda e: (e.mtime, e.key)):
            if entry.path == keep:
                continue
            if _unlink_quietly(entry.path):
                total -= entry.size
                if total <= self.max_bytes:
                    return

    def delete(self, key: str) -> bool:
        """Remove the plan stored under ``key``.

        Returns
        -------
        bool
            ``True`` if a file was removed, ``False`` if there was none.

        Raises
        ------
        ValueError
            If ``key`` is not a valid key.
        OSError
            If the file exists but cannot be removed.
        """
        try:
            self._file(_check_key(key)).unlink()
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def entries(self) -> list[CacheEntry]:
        """List the stored plans, sorted by key.

        Files that are not plans of this layout (temporary files, foreign
        names) are not listed.
        """
        found: list[CacheEntry] = []
        for sub in self._subdirs():
            try:
                with os.scandir(sub) as it:
                    names = [e.name for e in it]
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                key = name[: -len(SUFFIX)]
                if not name.endswith(SUFFIX) or not _KEY_RE.fullmatch(key) or key[:2] != sub.name:
                    continue
                path = sub / name
                try:
                    st = path.stat()
                except FileNotFoundError:  # removed concurrently
                    continue
                found.append(CacheEntry(key, path, st.st_size, st.st_mtime))
        found.sort(key=lambda e: e.key)
        return found

    def total_bytes(self) -> int:
        """Total size in bytes of the stored plan files."""
        return sum(e.size for e in self.entries())

    def clear(self) -> int:
        """Remove every stored plan and any leftover temporary file.

        Returns
        -------
        int
            Number of plan files removed (temporary files are not counted).
        """
        removed = 0
        for entry in self.entries():
            try:
                entry.path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        for sub in self._subdirs():
            for tmp in sub.glob(f"{_TMP_PREFIX}*"):
                _unlink_quietly(tmp)
        return removed

    def verify(self, decode: Callable[[bytes], Any]) -> list[tuple[str, str]]:
        """Decode every stored plan and report the ones that fail.

        Nothing is deleted and no warning is emitted.

        Parameters
        ----------
        decode : callable
            Same as for :meth:`get`.

        Returns
        -------
        list of (str, str)
            ``(key, error message)`` for each entry that cannot be read or
            decoded, sorted by key.
        """
        bad: list[tuple[str, str]] = []
        for entry in self.entries():
            try:
                decode(entry.path.read_bytes())
            except FileNotFoundError:  # removed concurrently
                continue
            except Exception as exc:
                bad.append((entry.key, f"{type(exc).__name__}: {exc}"))
        return bad

    def __contains__(self, key: object) -> bool:
        """Whether a plan file exists for ``key`` (not decoded; invalid keys -> False)."""
        if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
            return False
        return self._file(key).is_file()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r}, max_bytes={self.max_bytes})"
