"""Tests of the on-disk plan cache, including fault injection and concurrent writers."""
from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrpplan.cache import LAYOUT_VERSION, SUFFIX, CacheEntry, PlanCache
from lrpplan.errors import CacheWarning
from tests.conftest import read_only_dir, run_together

REPO_ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- helpers

MAGIC = b"PLAN"
VERSION = 2


def encode(payload: bytes, version: int = VERSION) -> bytes:
    """Toy plan format: magic, version byte, payload, crc32 of everything before it."""
    body = MAGIC + bytes([version]) + payload
    return body + zlib.crc32(body).to_bytes(4, "little")


def decode(data: bytes) -> bytes:
    """Inverse of :func:`encode`; raises ValueError on anything malformed or stale."""
    if len(data) < len(MAGIC) + 5 or not data.startswith(MAGIC):
        raise ValueError("not a plan (bad magic)")
    body, crc = data[:-4], data[-4:]
    if zlib.crc32(body).to_bytes(4, "little") != crc:
        raise ValueError("checksum mismatch")
    if body[len(MAGIC)] != VERSION:
        raise ValueError(f"unsupported plan version {body[len(MAGIC)]}")
    return body[len(MAGIC) + 1 :]


def k(i: int) -> str:
    """A valid key (32 lowercase hex chars), spread over prefixes."""
    return hashlib.md5(str(i).encode()).hexdigest()


def plan_file(cache: PlanCache, key: str) -> Path:
    """Where the documented layout puts ``key``."""
    return cache.path / f"plans-v{LAYOUT_VERSION}" / key[:2] / f"{key}{SUFFIX}"


def temp_files(root: Path) -> list[Path]:
    return sorted(root.rglob(".tmp-*")) if root.exists() else []


def cache_warnings(record: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in record if issubclass(w.category, CacheWarning)]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Never touch the real user cache: point every default location into tmp_path."""
    monkeypatch.setenv("LRPPLAN_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def cache(tmp_path) -> PlanCache:
    return PlanCache(tmp_path / "cache")


# ------------------------------------------------------------------------ basics


def test_round_trip_and_layout(cache):
    key = k(1)
    data = encode(b"hello")
    assert not cache.path.exists()  # created lazily
    assert key not in cache
    assert cache.put(key, data) is True
    path = plan_file(cache, key)
    assert path.read_bytes() == data
    assert key in cache
    assert cache.get(key, decode) == b"hello"
    assert cache.entries() == [CacheEntry(key, path, len(data), path.stat().st_mtime)]
    assert cache.total_bytes() == len(data)
    # overwrite
    assert cache.put(key, encode(b"world"))
    assert cache.get(key, decode) == b"world"
    assert cache.delete(key) is True
    assert cache.delete(key) is False
    assert key not in cache
    assert cache.get(key, decode) is None
    assert temp_files(cache.path) == []


def test_layout_constants():
    assert LAYOUT_VERSION == 1
    assert SUFFIX == ".lrpplan"


def test_put_accepts_bytes_like_and_rejects_str(cache):
    assert cache.put(k(1), bytearray(encode(b"a")))
    assert cache.put(k(2), memoryview(encode(b"b")))
    assert cache.get(k(1), decode) == b"a"
    assert cache.get(k(2), decode) == b"b"
    with pytest.raises(TypeError):
        cache.put(k(3), "not bytes")  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(payload=st.binary(max_size=2048), i=st.integers(0, 10**6))
def test_round_trip_any_bytes(tmp_path_factory, payload, i):
    cache = PlanCache(tmp_path_factory.getbasetemp() / "hypothesis-cache")
    assert cache.put(k(i), encode(payload))
    assert cache.get(k(i), decode) == payload


def test_repr(cache):
    r = repr(cache)
    assert r.startswith("PlanCache(")
    assert str(cache.path) in r
    assert str(cache.max_bytes) in r


def test_max_bytes_validation(tmp_path):
    with pytest.raises(ValueError):
        PlanCache(tmp_path, max_bytes=-1)
    with pytest.raises(TypeError):
        PlanCache(tmp_path, max_bytes=1.5)  # type: ignore[arg-type]
    assert PlanCache(tmp_path).max_bytes == 512 * 2**20


# ---------------------------------------------------------------------- location


def test_location_precedence(tmp_path, monkeypatch):
    explicit = tmp_path / "explicit"
    env = tmp_path / "from-env"
    xdg = tmp_path / "xdg-home"
    home = tmp_path / "home"
    monkeypatch.setenv("LRPPLAN_CACHE", str(env))
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.setenv("HOME", str(home))

    assert PlanCache(explicit).path == explicit
    assert PlanCache(str(explicit)).path == explicit
    assert PlanCache().path == env
    monkeypatch.delenv("LRPPLAN_CACHE")
    assert PlanCache().path == xdg / "lrpplan"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert PlanCache().path == home / ".cache" / "lrpplan"
    # empty variables count as unset
    monkeypatch.setenv("LRPPLAN_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert PlanCache().path == home / ".cache" / "lrpplan"


def test_env_location_is_used_for_writes(tmp_path, monkeypatch):
    env = tmp_path / "from-env"
    monkeypatch.setenv("LRPPLAN_CACHE", str(env))
    assert PlanCache().put(k(1), encode(b"x"))
    assert plan_file(PlanCache(env), k(1)).is_file()


def test_missing_directory_is_a_miss_and_not_created(tmp_path):
    cache = PlanCache(tmp_path / "does" / "not" / "exist")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cache.get(k(1), decode) is None
        assert cache.entries() == []
        assert cache.total_bytes() == 0
        assert cache.verify(decode) == []
        assert cache.clear() == 0
        assert cache.delete(k(1)) is False
    assert record == []
    assert not (tmp_path / "does").exists()


# ------------------------------------------------------------------- key checks

BAD_KEYS = [
    "../x",
    "../" + "a" * 29,
    "aa/" + "a" * 29,
    "A" * 32,
    "0123456789ABCDEF0123456789abcdef",
    "a" * 31,
    "a" * 33,
    "g" * 32,
    "",
    "a" * 32 + "\n",
    " " + "a" * 31,
    b"a" * 32,
    None,
    12,
]


@pytest.mark.parametrize("bad", BAD_KEYS, ids=repr)
def test_invalid_keys_raise_value_error(cache, bad):
    with pytest.raises(ValueError, match="key"):
        cache.get(bad, decode)
    with pytest.raises(ValueError, match="key"):
        cache.put(bad, encode(b"x"))
    with pytest.raises(ValueError, match="key"):
        cache.delete(bad)
    assert (bad in cache) is False
    assert not cache.path.exists()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_only_lowercase_hex32_is_a_key(text):
    cache = PlanCache("/nonexistent-lrpplan-test-root")
    valid = len(text) == 32 and all(c in "0123456789abcdef" for c in text)
    if valid:
        assert cache.get(text, decode) is None
    else:
        with pytest.raises(ValueError):
            cache.get(text, decode)


# ------------------------------------------------------------------ bad entries


def test_missing_entry_is_silent_miss(cache):
    cache.put(k(1), encode(b"x"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cache.get(k(2), decode) is None
    assert record == []


def _flip_bit(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :]


CORRUPTIONS = {
    "truncated_half": lambda d: d[: len(d) // 2],
    "truncated_last_byte": lambda d: d[:-1],
    "bit_flip": _flip_bit,
    "empty": lambda d: b"",
    "foreign_random": lambda d: random.Random(0).randbytes(len(d)),
    "stale_version": lambda d: encode(b"payload" * 10, version=VERSION - 1),
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_bad_entry_warns_once_deletes_and_misses(cache, corrupt):
    key = k(7)
    good = encode(b"payload" * 10)
    assert cache.put(key, good)
    path = plan_file(cache, key)
    bad = corrupt(good)
    assert bad != good
    path.write_bytes(bad)
    with pytest.raises(Exception):
        decode(bad)  # the corruption really is detectable

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cache.get(key, decode) is None
    assert len(record) == 1
    (w,) = record
    assert issubclass(w.category, CacheWarning)
    msg = str(w.message)
    assert key in msg and str(path) in msg and "ValueError" in msg
    assert w.filename == __file__  # stacklevel points at the caller of get()
    assert not path.exists()

    # afterwards it is an ordinary silent miss, and a fresh put works again
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cache.get(key, decode) is None
    assert record == []
    assert cache.put(key, good)
    assert cache.get(key, decode) == b"payload" * 10


def test_decode_raising_any_exception_is_a_bad_entry(cache):
    cache.put(k(1), encode(b"x"))

    def picky(data: bytes) -> object:
        return {}["missing field"]

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cache.get(k(1), picky) is None
    assert [w.category for w in record] == [CacheWarning]
    assert "KeyError" in str(record[0].message)
    assert k(1) not in cache


def test_unreadable_entry_is_a_bad_entry(cache):
    key = k(3)
    path = plan_file(cache, key)
    path.mkdir(parents=True)  # a directory where the file should be: reading fails
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cache.get(key, decode) is None
    assert len(cache_warnings(record)) == 1 and len(record) == 1
    assert key in str(record[0].message)


# ------------------------------------------------------------- unwritable cache


@pytest.fixture
def readonly_cache(tmp_path, monkeypatch):
    """A cache holding one good (k(1)) and one corrupt (k(2)) entry, then made read-only.

    chmod 0o555 stops writes for ordinary users. Tests may run as root, where it
    does not: a probe write detects that, and then every mutating call on a path
    under the cache root is made to fail with PermissionError instead.
    """
    root = tmp_path / "ro"
    cache = PlanCache(root)
    assert cache.put(k(1), encode(b"good"))
    assert cache.put(k(2), encode(b"bad"))
    plan_file(cache, k(2)).write_bytes(b"garbage")
    with read_only_dir(root, monkeypatch):
        yield cache


def test_readonly_put_returns_false_with_one_warning(readonly_cache):
    before = sorted(p.name for p in readonly_cache.path.rglob("*"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert readonly_cache.put(k(99), encode(b"new")) is False
        assert readonly_cache.put(k(1), encode(b"overwrite")) is False
    assert [w.category for w in record] == [CacheWarning, CacheWarning]
    assert k(99) in str(record[0].message)
    assert all(w.filename == __file__ for w in record)
    assert sorted(p.name for p in readonly_cache.path.rglob("*")) == before


def test_readonly_get_hit_and_miss_do_not_raise(readonly_cache):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert readonly_cache.get(k(1), decode) == b"good"  # a failing utime is ignored
        assert readonly_cache.get(k(99), decode) is None
    assert record == []
    assert k(1) in readonly_cache and k(99) not in readonly_cache


def test_readonly_bad_entry_warns_once_and_cannot_delete(readonly_cache):
    path = plan_file(readonly_cache, k(2))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert readonly_cache.get(k(2), decode) is None
    assert len(record) == 1 and issubclass(record[0].category, CacheWarning)
    assert "could not be deleted" in str(record[0].message)
    assert path.exists()
    assert readonly_cache.verify(decode) == [(k(2), "ValueError: not a plan (bad magic)")]


def test_cache_root_under_a_regular_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a directory")
    cache = PlanCache(blocker / "cache")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cache.put(k(1), encode(b"x")) is False
    assert len(record) == 1 and issubclass(record[0].category, CacheWarning)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cache.get(k(1), decode) is None
        assert k(1) not in cache
        assert cache.entries() == []
        assert cache.clear() == 0
        assert cache.verify(decode) == []
        assert cache.delete(k(1)) is False
    assert record == []
    assert blocker.read_bytes() == b"not a directory"


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_keeps_old_entry_and_leaves_no_temp(cache, monkeypatch, failing):
    key = k(5)
    assert cache.put(key, encode(b"old"))

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(os, failing, boom)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cache.put(key, encode(b"new" * 1000)) is False
    assert len(record) == 1 and issubclass(record[0].category, CacheWarning)
    assert "No space left" in str(record[0].message)
    monkeypatch.undo()
    assert temp_files(cache.path) == []
    assert cache.get(key, decode) == b"old"


# ------------------------------------------------------------------------- LRU


def _fill(cache: PlanCache, n: int, payload: bytes = b"x" * 100) -> tuple[list[str], int]:
    """Store n equal-size entries with increasing, clearly old mtimes (k(0) oldest)."""
    keys = [k(i) for i in range(n)]
    data = encode(payload)
    base = time.time() - 10_000
    for i, key in enumerate(keys):
        assert cache.put(key, data)
        os.utime(plan_file(cache, key), (base + 10 * i, base + 10 * i))
    return keys, len(data)


def test_eviction_removes_oldest_first(tmp_path):
    keys, size = _fill(PlanCache(tmp_path), 5)
    small = PlanCache(tmp_path, max_bytes=3 * size)
    assert small.put(k(100), encode(b"x" * 100))
    assert {e.key for e in small.entries()} == {keys[3], keys[4], k(100)}
    assert small.total_bytes() == 3 * size <= small.max_bytes


def test_eviction_stops_as_soon_as_under_budget(tmp_path):
    keys, size = _fill(PlanCache(tmp_path), 5)
    small = PlanCache(tmp_path, max_bytes=5 * size)
    assert small.put(k(100), encode(b"x" * 100))
    assert {e.key for e in small.entries()} == {*keys[1:], k(100)}


def test_get_refreshes_recency(tmp_path):
    keys, size = _fill(PlanCache(tmp_path), 4)
    small = PlanCache(tmp_path, max_bytes=3 * size)
    assert small.get(keys[0], decode) == b"x" * 100  # k(0) becomes most recent
    assert plan_file(small, keys[0]).stat().st_mtime > time.time() - 100
    assert small.put(k(100), encode(b"x" * 100))
    assert {e.key for e in small.entries()} == {keys[0], keys[3], k(100)}


def test_just_written_entry_is_never_evicted(tmp_path):
    cache = PlanCache(tmp_path, max_bytes=1)  # smaller than any plan
    for i in range(3):
        assert cache.put(k(i), encode(b"y" * 50))
        assert [e.key for e in cache.entries()] == [k(i)]
        assert cache.get(k(i), decode) == b"y" * 50


def test_no_eviction_under_budget(tmp_path):
    keys, size = _fill(PlanCache(tmp_path), 5)
    cache = PlanCache(tmp_path, max_bytes=6 * size)
    assert cache.put(k(100), encode(b"x" * 100))
    assert len(cache.entries()) == 6


# ------------------------------------------------------------------ concurrency

WORKER = r"""
import sys, time, warnings, zlib
from pathlib import Path
from lrpplan.cache import PlanCache
from lrpplan.errors import CacheWarning

warnings.simplefilter("error", CacheWarning)  # any bad read or failed write kills the worker
root, key, wid, sync = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])

def decode(data):
    body, crc = data[:-4], data[-4:]
    if not body.startswith(b"PLAN") or zlib.crc32(body).to_bytes(4, "little") != crc:
        raise ValueError("corrupt")
    return body[4:]

cache = PlanCache(root)
body = b"PLAN" + bytes([wid]) * 300_000  # equally valid, distinguishable per writer
data = body + zlib.crc32(body).to_bytes(4, "little")
(sync / f"ready-{wid}").touch()
deadline = time.monotonic() + 60
while not (sync / "go").exists():
    if time.monotonic() > deadline:
        sys.exit("no go signal")
    time.sleep(0.001)
for _ in range(20):
    assert cache.put(key, data) is True
    got = cache.get(key, decode)
    assert got is not None and len(set(got)) == 1, "partial or mixed plan seen"
print("ok")
"""


def test_concurrent_writers_same_key(tmp_path):
    root = tmp_path / "shared"
    sync = tmp_path / "sync"
    sync.mkdir()
    key = k(42)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(root), key, str(wid), str(sync)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for wid in range(1, 5)
    ]
    results = run_together(procs, sync, timeout=60)
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert out.strip() == "ok"

    cache = PlanCache(root)
    entries = cache.entries()
    assert [e.key for e in entries] == [key]
    assert cache.verify(decode_any_version) == []
    payload = decode_any_version(plan_file(cache, key).read_bytes())
    assert len(payload) == 300_000 and len(set(payload)) == 1 and payload[0] in range(1, 5)
    assert temp_files(root) == []


def decode_any_version(data: bytes) -> bytes:
    """The worker's format: magic + payload + crc32 (no version byte)."""
    body, crc = data[:-4], data[-4:]
    if not body.startswith(MAGIC) or zlib.crc32(body).to_bytes(4, "little") != crc:
        raise ValueError("corrupt")
    return body[len(MAGIC) :]


# ------------------------------------------------------------ clear and verify


def test_clear_removes_plans_and_stale_temp_files(cache):
    for i in range(3):
        assert cache.put(k(i), encode(b"z"))
    stale = plan_file(cache, k(0)).parent / ".tmp-crashed-writer.part"
    stale.write_bytes(b"half a pl")
    unrelated = cache.path / "keep-me.txt"
    unrelated.write_text("not ours")
    assert len(cache.entries()) == 3  # temp and foreign files are not entries
    assert cache.clear() == 3
    assert cache.entries() == []
    assert cache.total_bytes() == 0
    assert temp_files(cache.path) == []
    assert unrelated.exists()
    assert cache.clear() == 0


def test_verify_reports_without_deleting_or_warning(cache):
    for i in range(4):
        assert cache.put(k(i), encode(b"v" * 20))
    plan_file(cache, k(1)).write_bytes(_flip_bit(encode(b"v" * 20)))
    plan_file(cache, k(3)).write_bytes(b"")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = cache.verify(decode)
    assert record == []
    assert sorted(report) == sorted(
        [(k(1), "ValueError: checksum mismatch"), (k(3), "ValueError: not a plan (bad magic)")]
    )
    assert len(cache.entries()) == 4  # nothing deleted
    assert cache.get(k(0), decode) == b"v" * 20


def test_entries_ignore_foreign_files(cache):
    assert cache.put(k(1), encode(b"a"))
    plans = cache.path / f"plans-v{LAYOUT_VERSION}"
    (plans / "zz").mkdir()
    (plans / "zz" / f"{'z' * 32}{SUFFIX}").write_bytes(b"x")  # non-hex prefix dir
    wrong_dir = plans / k(1)[:2] / f"{'f' * 32}{SUFFIX}"  # key in the wrong prefix dir
    if k(1)[:2] != "ff":
        wrong_dir.write_bytes(b"x")
    (plans / k(1)[:2] / "notes.txt").write_bytes(b"x")
    (cache.path / "plans-v0").mkdir()
    (cache.path / "plans-v0" / "old.lrpplan").write_bytes(b"x")
    assert [e.key for e in cache.entries()] == [k(1)]


# ---------------------------------------------------------------------- ensure


def test_ensure_coercions(tmp_path, monkeypatch):
    monkeypatch.setenv("LRPPLAN_CACHE", str(tmp_path / "default"))
    default = PlanCache.ensure(None)
    assert isinstance(default, PlanCache) and default.path == tmp_path / "default"
    existing = PlanCache(tmp_path / "mine", max_bytes=123)
    assert PlanCache.ensure(existing) is existing
    from_str = PlanCache.ensure(str(tmp_path / "s"))
    assert isinstance(from_str, PlanCache) and from_str.path == tmp_path / "s"
    from_path = PlanCache.ensure(tmp_path / "p")
    assert isinstance(from_path, PlanCache) and from_path.path == tmp_path / "p"
    assert PlanCache.ensure(False) is None


@pytest.mark.parametrize("bad", [True, 0, 1, 1.5, ["dir"], b"/tmp/x", object()], ids=repr)
def test_ensure_rejects_other_values(bad):
    with pytest.raises(TypeError) as info:
        PlanCache.ensure(bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)
