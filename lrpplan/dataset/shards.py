"""The output directory of :func:`lrpplan.dataset.explain_dataset`: shards, sidecars, the index.

Layout of ``OUT``::

    shard-RRR-IIIIII.npy         relevance of input 0 for shard IIIIII, written by rank RRR
    shard-RRR-IIIIII.in1.npy     relevance of input 1 (models with several positional inputs)
    shard-RRR-IIIIII.json        the shard's sidecar: sample ids, targets, scores, files and
                                 their checksums, ledger; written after the .npy files
    index.json                   one index over every shard (written last, by rank 0)

Shard ``i`` holds the samples ``[i * shard_size, min(n, (i + 1) * shard_size))`` of the data set,
whichever rank wrote it, so a shard's content does not depend on the number of processes.

Commit protocol: a shard is done when its sidecar exists, parses, belongs to this run (same run
key) and every file it lists exists with the recorded xxh3-128 checksum. Every file is written
atomically (a temporary ``.tmp-*`` file in ``OUT``, fsync, ``os.replace``), the ``.npy`` files
first and the sidecar last, so a killed process leaves either a committed shard, complete
``.npy`` files without a sidecar (redone on resume), or ``.tmp-*`` files (removed on resume);
never a partly written shard under a final name. A power loss that drops a rename is caught the
same way: the sidecar's checksums no longer match and the shard is redone.

No lock is needed: in one run each shard index is verified by exactly one rank and written by
exactly one rank, and the rank is part of every file name, so two ranks never write one file.
"""
from __future__ import annotations

import io
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import xxhash

from ..errors import InvalidInputError
from ..fsutil import atomic_write, fsync_dir

__all__ = ["CHECKSUM", "INDEX_NAME", "CorruptShardWarning", "DatasetMismatchError", "ShardSpec",
           "ShardStore", "layout", "load", "read_index"]

SHARD_FORMAT = "lrpplan-dataset-shard"
INDEX_FORMAT = "lrpplan-dataset"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
CHECKSUM = "xxh3_128"
"""Checksum algorithm of the shard files (``xxhash.xxh3_128(bytes).hexdigest()``)."""

_TMP_PREFIX = ".tmp-"
_NAME_RE = re.compile(r"shard-(\d{3,})-(\d{6,})(?:\.in(\d+))?\.(npy|json)")
_CHUNK = 8 * 2**20


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()  # what open() would give; mkstemp alone gives 0o600


class CorruptShardWarning(UserWarning):
    """A finished shard failed verification (bad checksum, missing file, unreadable sidecar) and
    is computed again."""


class DatasetMismatchError(InvalidInputError):
    """The output directory holds shards of a different run (other model weights, rules, target,
    data set size or batch size); resuming into it would mix two explanations."""


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` covers the data set samples ``range(start, stop)``."""

    index: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def layout(n_samples: int, shard_size: int) -> list[ShardSpec]:
    """Contiguous shards of ``shard_size`` samples (the last one may be shorter)."""
    return [ShardSpec(i, s, min(n_samples, s + shard_size))
            for i, s in enumerate(range(0, n_samples, shard_size))]


def shard_stem(rank: int, index: int) -> str:
    return f"shard-{rank:03d}-{index:06d}"


def npy_name(rank: int, index: int, input_pos: int) -> str:
    suffix = "" if input_pos == 0 else f".in{input_pos}"
    return f"{shard_stem(rank, index)}{suffix}.npy"


# ---------------------------------------------------------------------------------------------
# files


def _atomic_write(target: Path, data: bytes) -> None:
    """Atomic write of one shard file; the caller fsyncs the directory once per shard."""
    atomic_write(target, data, prefix=_TMP_PREFIX + target.name + ".", mode=_FILE_MODE,
                 sync_dir=False)


def npy_bytes(array: np.ndarray) -> bytes:
    """The bytes :func:`numpy.save` writes for ``array`` (no pickle)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def checksum_bytes(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def checksum_file(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# the store


class ShardStore:
    """Writes, verifies and indexes the shards of one run in ``root``.

    Parameters
    ----------
    root:
        the output directory (created if missing).
    run_key:
        xxh3-128 of the run configuration; a sidecar with another key belongs to another run.
    config:
        the run configuration itself (stored in sidecars and the index, named in mismatch errors).
    """

    def __init__(self, root: Path, run_key: str, config: dict[str, Any]) -> None:
        self.root = root
        self.run_key = run_key
        self.config = config

    def scan(self) -> dict[int, list[str]]:
        """Shard index -> names of the shard files present (one directory listing)."""
        groups: dict[int, list[str]] = {}
        try:
            with os.scandir(self.root) as it:
                names = sorted(e.name for e in it)
        except FileNotFoundError:
            return groups
        for name in names:
            m = _NAME_RE.fullmatch(name)
            if m:
                groups.setdefault(int(m.group(2)), []).append(name)
        return groups

    def remove_temporaries(self) -> int:
        """Remove ``.tmp-*`` files left by killed runs; call only while no rank writes."""
        removed = 0
        try:
            with os.scandir(self.root) as it:
                stale = [e.name for e in it if e.name.startswith(_TMP_PREFIX)]
        except FileNotFoundError:
            return 0
        for name in stale:
            _unlink(self.root / name)
            removed += 1
        return removed

    def remove_index(self) -> None:
        _unlink(self.root / INDEX_NAME)

    # ---- verification

    def verify(self, spec: ShardSpec, names: Sequence[str]) -> tuple[Optional[int], bool]:
        """Check the files present for ``spec``; keep one committed copy and delete the rest.

        Returns
        -------
        (rank, corrupt)
            ``rank``: the writer rank of the committed copy, or None when the shard must be
            (re)computed; ``corrupt``: a sidecar was present but failed verification (a
            :class:`CorruptShardWarning` was emitted).

        Raises
        ------
        DatasetMismatchError
            when a readable sidecar belongs to another run configuration.
        """
        chosen: Optional[dict] = None
        corrupt = False
        for name in names:
            if not name.endswith(".json") or chosen is not None:
                continue
            problem, record = self._check_sidecar(self.root / name, spec)
            if problem is None:
                chosen = record
                continue
            corrupt = True
            warnings.warn(f"lrpplan dataset: shard {spec.index} (samples {spec.start}.."
                          f"{spec.stop - 1}) in {self.root} failed verification: {problem}; "
                          "it is computed again", CorruptShardWarning, stacklevel=3)
        keep = set()
        if chosen is not None:
            keep = {shard_stem(chosen["rank"], spec.index) + ".json"}
            keep.update(f["file"] for f in chosen["files"])
        for name in names:  # corrupt copies, orphans of killed runs, duplicates
            if name not in keep:
                _unlink(self.root / name)
        return (None if chosen is None else int(chosen["rank"])), corrupt

    def _check_sidecar(self, path: Path, spec: ShardSpec) -> tuple[Optional[str], Any]:
        try:
            record = json.loads(path.read_text())
            if record.get("format") != SHARD_FORMAT or record.get("version") != FORMAT_VERSION:
                return f"{path.name} is not a version {FORMAT_VERSION} shard sidecar", None
            files = record["files"]
            rank = int(record["rank"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"unreadable sidecar {path.name} ({type(exc).__name__}: {exc})", None
        if record.get("run") != self.run_key:
            raise DatasetMismatchError(self._mismatch_message(path, record.get("config")))
        if (record.get("index"), record.get("sample_range")) != (spec.index,
                                                                  [spec.start, spec.stop]):
            return f"{path.name} describes another sample range", None
        if path.name != shard_stem(rank, spec.index) + ".json":
            return f"{path.name} names rank {rank}", None
        for f in files:
            fp = self.root / f["file"]
            try:
                size = fp.stat().st_size
            except FileNotFoundError:
                return f"{f['file']} is missing", None
            if size != f["bytes"]:
                return f"{f['file']} has {size} bytes, the sidecar records {f['bytes']}", None
            digest = checksum_file(fp)
            if digest != f["checksum"]:
                return (f"{f['file']} has checksum {digest}, the sidecar records "
                        f"{f['checksum']}"), None
        return None, record

    def _mismatch_message(self, path: Path, theirs: Any) -> str:
        what = []
        if isinstance(theirs, dict):
            what = [k for k in sorted(set(theirs) | set(self.config))
                    if theirs.get(k) != self.config.get(k)]
        differs = f" ({', '.join(what)} differ)" if what else ""
        return (f"{self.root} holds shards of another run{differs}, e.g. {path.name}: resuming "
                "would mix two explanations. Use another --out directory, or delete this one "
                "to start over.")

    # ---- writing

    def write(self, rank: int, spec: ShardSpec, arrays: Sequence[Optional[np.ndarray]],
              meta: dict[str, Any]) -> dict[str, Any]:
        """Write the shard's ``.npy`` files, then its sidecar; return the sidecar record."""
        files = []
        for pos, arr in enumerate(arrays):
            if arr is None:
                continue
            data = npy_bytes(arr)
            name = npy_name(rank, spec.index, pos)
            _atomic_write(self.root / name, data)
            files.append({"input": pos, "file": name, "shape": list(arr.shape),
                          "dtype": arr.dtype.name, "bytes": len(data),
                          "checksum": checksum_bytes(data)})
        record = {"format": SHARD_FORMAT, "version": FORMAT_VERSION, "run": self.run_key,
                  "rank": rank, "index": spec.index, "sample_range": [spec.start, spec.stop],
                  **meta, "files": files, "config": self.config}
        _atomic_write(self.root / (shard_stem(rank, spec.index) + ".json"),
                     json.dumps(record, sort_keys=True).encode())
        fsync_dir(self.root)
        return record

    # ---- the index

    def read_sidecar(self, rank: int, spec: ShardSpec, wait_s: float = 30.0) -> dict[str, Any]:
        """The committed sidecar of ``spec`` written by ``rank``.

        A file written by another node may take a moment to show up on a network file system
        (attribute caching), hence the short wait.
        """
        path = self.root / (shard_stem(rank, spec.index) + ".json")
        deadline = time.monotonic() + wait_s
        while True:
            try:
                record = json.loads(path.read_text())
                break
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise InvalidInputError(f"shard {spec.index}: {path} is missing after the "
                                            "run (was the directory modified meanwhile?)")
                time.sleep(0.1)
        if record.get("run") != self.run_key or record.get("index") != spec.index:
            raise DatasetMismatchError(self._mismatch_message(path, record.get("config")))
        return record

    def write_index(self, records: Sequence[dict[str, Any]], header: dict[str, Any]) -> bool:
        """Write ``index.json`` (unless it already holds exactly these bytes); return whether
        it was written."""
        shards = []
        for r in records:
            shards.append({k: r[k] for k in ("index", "rank", "sample_range", "ids", "targets",
                                             "scores", "files", "plan_key", "ledger")})
        data = _dump_index(header, shards)
        target = self.root / INDEX_NAME
        try:
            if target.read_bytes() == data:
                return False
        except FileNotFoundError:
            pass
        _atomic_write(target, data)
        fsync_dir(self.root)
        return True


def _dump_index(header: dict[str, Any], shards: list[dict[str, Any]]) -> bytes:
    """Indented header, one compact line per shard (readable and small)."""
    lines = ["{"]
    for k, v in header.items():
        lines.append(f" {json.dumps(k)}: {json.dumps(v, sort_keys=True)},")
    body = ",\n".join("  " + json.dumps(s, sort_keys=True, separators=(",", ":"))
                      for s in shards)
    lines.append(' "shards": [' + ("\n" + body + "\n ]" if shards else "]"))
    lines.append("}")
    return ("\n".join(lines) + "\n").encode()


# ---------------------------------------------------------------------------------------------
# reading


def read_index(out: "str | os.PathLike[str]") -> dict[str, Any]:
    """The parsed ``index.json`` of an output directory."""
    path = Path(out) / INDEX_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"{path} does not exist: the run has not finished (run it "
                                "again to resume)") from None


def load(out: "str | os.PathLike[str]", position: int = 0,
         verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Sample ids and relevance of one explained input, concatenated over all shards.

    Parameters
    ----------
    out:
        the output directory of a finished run.
    position:
        which positional model input (0 for single-input models).
    verify:
        check every file's checksum against the index.

    Returns
    -------
    (ids, relevance)
        ``ids``: int64 array of data set indices; ``relevance``: ``[n, *sample_shape]``.
        Shards with different sample shapes (e.g. padded per batch) cannot be concatenated:
        read them one by one from the index then.
    """
    root = Path(out)
    index = read_index(root)
    ids, parts = [], []
    for shard in index["shards"]:
        entry = next((f for f in shard["files"] if f["input"] == position), None)
        if entry is None:
            raise InvalidInputError(f"input {position} has no relevance in shard {shard['index']}")
        path = root / entry["file"]
        if verify and checksum_file(path) != entry["checksum"]:
            raise InvalidInputError(f"{path} does not match its checksum in the index")
        parts.append(np.load(path, allow_pickle=False))
        ids.extend(shard["ids"])
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    if len({p.shape[1:] for p in parts}) > 1:
        raise InvalidInputError("shards have different sample shapes; read them one by one")
    return np.asarray(ids, dtype=np.int64), np.concatenate(parts)
