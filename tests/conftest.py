"""Shared fixtures: an isolated default plan cache, deterministic seeding, float64 helper."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path
import subprocess
import time
from typing import Iterator

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `import tests.models` from any working directory
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session", autouse=True)
def isolated_default_cache():
    """Point ``LRPPLAN_CACHE`` at a fresh temporary directory for the whole session.

    Tests that pass ``cache=None`` (the default cache) then never touch ``~/.cache``; the
    directory is removed afterwards. Subprocesses started by tests inherit the variable.
    """
    old = os.environ.get("LRPPLAN_CACHE")
    root = Path(tempfile.mkdtemp(prefix="lrpplan-test-cache-"))
    os.environ["LRPPLAN_CACHE"] = str(root)
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop("LRPPLAN_CACHE", None)
        else:
            os.environ["LRPPLAN_CACHE"] = old
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state (inputs are reproducible)."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny graphs: intra-op threads only spin on a busy 2-core machine. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """lrpplan warns once per model or plan and process; every test sees its own first time."""
    from lrpplan import api

    api._WARNED.clear()
    api._WARNED_TRAINING.clear()
    api._RECORDING_MODELS.clear()
    yield


def _to_float64(obj):
    if isinstance(obj, torch.nn.Module):
        return obj.double()
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_float64(o) for o in obj)
    return obj


@pytest.fixture
def float64():
    """``float64(model_or_tensor_or_tuple)``: a float64 copy (modules converted in place).

    Integer tensors (token ids) are returned unchanged.
    """
    return _to_float64


def _under(arg: object, root: Path) -> bool:
    if not isinstance(arg, (str, os.PathLike)):
        return False
    p = os.path.abspath(os.fspath(arg))
    return p == str(root) or p.startswith(str(root) + os.sep)


@contextlib.contextmanager
def read_only_dir(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``root`` (and every folder below it) unwritable for the duration of the block.

    chmod 0o555 stops writes for ordinary users. Tests may run as root, where it does not: a
    probe write detects that, and then every mutating call on a path under ``root`` is made to
    fail with PermissionError instead.
    """
    dirs = [root, *(p for p in root.rglob("*") if p.is_dir())]
    for d in dirs:
        d.chmod(0o555)
    probe = root / "probe"
    try:
        probe.write_bytes(b"x")
    except PermissionError:
        pass
    else:
        probe.unlink()

        def deny(fn):
            def wrapper(*args, **kwargs):
                for a in (*args[:2], kwargs.get("dir")):
                    if _under(a, root):
                        raise PermissionError(errno.EACCES, "Permission denied (simulated)",
                                              os.fspath(a))
                return fn(*args, **kwargs)
            return wrapper

        for name in ("replace", "rename", "unlink", "utime", "mkdir", "rmdir"):
            monkeypatch.setattr(os, name, deny(getattr(os, name)))
        monkeypatch.setattr(tempfile, "mkstemp", deny(tempfile.mkstemp))
    try:
        yield
    finally:
        monkeypatch.undo()
        for d in dirs:
            d.chmod(0o755)


def run_together(procs: list[subprocess.Popen], sync: Path, timeout: float) -> list[tuple]:
    """Wait until every worker wrote ``sync/ready-*``, release them all at once through
    ``sync/go`` and collect ``(stdout, stderr)`` of each; kills the workers on any failure."""
    try:
        deadline = time.monotonic() + timeout
        while len(list(sync.glob("ready-*"))) < len(procs):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.005)
        (sync / "go").touch()
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
