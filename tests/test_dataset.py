"""``lrpplan.dataset.explain_dataset``: shards, index, resume, corruption, torchrun, the CLI.

References are independent of the code under test: shards are read with plain numpy, checksums
recomputed with xxhash, targets and scores recomputed from the model's own output, relevance
compared with per-batch ``lrpplan.explain(..., cache=False)`` (the engine, which the data set
layer must reproduce) and, for a bias-free linear model, with the closed-form ε-rule in float64.
Multi-process and kill/resume runs are subprocesses (``python -m torch.distributed.run``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from torch import nn

import lrpplan
from lrpplan.cli import main
from lrpplan.dataset import (CorruptShardWarning, DatasetMismatchError, explain_dataset, load,
                             read_index)

N, BATCH = 38, 8  # 5 shards, the last one holds 6 samples

# the factories, shared by in-process tests and the subprocess runs (written to tmp dirs)
FACTORIES = '''
import os
import time

import torch
from torch import nn

N = 40


class Images(torch.utils.data.Dataset):
    """N random 1x8x8 images with a label each; LRPPLAN_TEST_SLEEP seconds per sample."""

    def __init__(self, n=N):
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 1, 8, 8, generator=gen)
        self.y = torch.randint(0, 5, (n,), generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        delay = float(os.environ.get("LRPPLAN_TEST_SLEEP", "0"))
        if delay:
            time.sleep(delay)
        return self.x[i], self.y[i]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(24, 5),
    ).eval()


def make_data():
    return Images()
'''

RUNNER = '''
import json
import os
import sys

from factories import make_data, make_model
from lrpplan.dataset import explain_dataset

out, cache, report = sys.argv[1:4]
s = explain_dataset(make_model(), make_data(), out=out, batch_size=4, cache=cache,
                    progress=False)
with open(f"{report}.{s.rank}.json", "w") as f:
    json.dump({"rank": s.rank, "world": s.world_size, "new": s.new_samples,
               "skipped": s.skipped_samples, "traces": s.traces,
               "first_call_cached": list(s.first_call_cached)}, f)
'''


def _namespace() -> dict:
    ns: dict = {}
    exec(compile(FACTORIES, "factories", "exec"), ns)
    return ns


FACT = _namespace()


def cnn() -> nn.Module:
    return FACT["make_model"]()


def images(n: int = N) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(2))


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def shard_arrays(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """ids and relevance of input 0, read with plain json + numpy (no lrpplan)."""
    index = json.loads((out / "index.json").read_text())
    ids, rel = [], []
    for shard in index["shards"]:
        (entry,) = [f for f in shard["files"] if f["input"] == 0]
        rel.append(np.load(out / entry["file"], allow_pickle=False))
        ids.extend(shard["ids"])
    return np.asarray(ids), np.concatenate(rel)


def reference(model: nn.Module, x: torch.Tensor, batch: int, target=None) -> torch.Tensor:
    parts = []
    for s in range(0, len(x), batch):
        t = target[s:s + batch] if isinstance(target, torch.Tensor) else target
        parts.append(lrpplan.explain(model, x[s:s + batch], target=t, cache=False).relevance)
    return torch.cat(parts)


def run(model, data, out, **kw):
    kw.setdefault("batch_size", BATCH)
    kw.setdefault("progress", False)
    return explain_dataset(model, data, out=out, **kw)


# ---------------------------------------------------------------------------------------------
# single process


def test_single_process_writes_shards_and_index(tmp_path):
    model, x = cnn(), images()
    out = tmp_path / "out"
    s = run(model, torch.utils.data.TensorDataset(x), out, cache=tmp_path / "cache")

    index = json.loads((out / "index.json").read_text())
    for key in ("format", "version", "lrpplan", "torch", "n_samples", "shard_size", "dtype",
                "inputs", "rules", "rule_preset", "target", "plan_keys", "checksum", "shards",
                "conservation", "run", "model"):
        assert key in index, key
    assert (index["lrpplan"], index["torch"]) == (lrpplan.__version__, torch.__version__)
    assert index["n_samples"] == N and index["rule_preset"] == "epsilon"
    assert index["dtype"] == "float32" and index["checksum"] == "xxh3_128"
    assert index["plan_keys"] == [lrpplan.explain(model, x[:2], cache=False).plan_key]
    assert [sh["sample_range"] for sh in index["shards"]] == \
        [[0, 8], [8, 16], [16, 24], [24, 32], [32, 38]]
    for sh in index["shards"]:
        (f,) = sh["files"]
        assert f["file"] == f"shard-000-{sh['index']:06d}.npy"
        data = (out / f["file"]).read_bytes()
        assert xxhash.xxh3_128(data).hexdigest() == f["checksum"] and len(data) == f["bytes"]
        assert f["shape"] == [sh["sample_range"][1] - sh["sample_range"][0], 1, 8, 8]

    ids, rel = shard_arrays(out)
    np.testing.assert_array_equal(ids, np.arange(N))
    assert rel.dtype == np.float32 and rel.shape == (N, 1, 8, 8)
    torch.testing.assert_close(torch.from_numpy(rel), reference(model, x, BATCH),
                               rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        logits = model(x).double()
    targets = [t for sh in index["shards"] for t in sh["targets"]]
    scores = [v for sh in index["shards"] for v in sh["scores"]]
    np.testing.assert_array_equal(targets, logits.argmax(1).numpy())
    np.testing.assert_allclose(scores, logits.max(1).values.numpy(), rtol=1e-6)

    assert (s.samples, s.new_samples, s.skipped_samples, s.shards) == (N, N, 0, 5)
    assert s.traces == 1 and s.first_call_cached == (False,) and s.world_size == 1
    share = rel.reshape(N, -1).astype(np.float64).sum(1) / np.asarray(scores)
    assert s.mean_input_share == pytest.approx(share.mean(), rel=1e-9)
    assert s.shards_closing == 5 and s.max_abs_residual < 1e-4
    ids2, rel2 = load(out)  # the package's reader agrees with plain numpy
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(rel2, rel)


@pytest.mark.parametrize("how", ["data", "int", "per-sample", "callable"])
def test_targets_closed_form_linear(tmp_path, how):
    """y = W x (no bias): the ε-rule gives R = x ⊙ W[t] · s / (s + ε sign s), in float64."""
    torch.manual_seed(3)
    lin = nn.Linear(16, 4, bias=False).double()
    model = nn.Sequential(nn.Flatten(), lin).eval()
    x = torch.randn(12, 1, 4, 4, dtype=torch.float64)
    labels = torch.randint(0, 4, (12,))
    kw = {}
    if how == "data":
        data, want = torch.utils.data.TensorDataset(x, labels), labels
    else:
        data = torch.utils.data.TensorDataset(x)
        want = {"int": torch.full((12,), 2), "per-sample": labels,
                "callable": torch.full((12,), 1)}[how]
        kw["target"] = {"int": 2, "per-sample": labels.tolist(),
                        "callable": lambda out: out[:, 1]}[how]
    run(model, data, tmp_path / "out", batch_size=5, cache=False, **kw)
    w = lin.weight.detach()[want]  # [12, 16]
    s = (x.reshape(12, 16) * w).sum(1, keepdim=True)
    expect = (x.reshape(12, 16) * w * s / (s + 1e-6 * torch.where(s >= 0, 1.0, -1.0)))
    ids, rel = shard_arrays(tmp_path / "out")
    assert rel.dtype == np.float64
    np.testing.assert_allclose(rel.reshape(12, 16), expect.numpy(), rtol=1e-9, atol=1e-12)
    index = read_index(tmp_path / "out")
    got = [t for sh in index["shards"] for t in (sh["targets"] or [None] * len(sh["ids"]))]
    if how == "callable":
        assert got == [None] * 12
    else:
        assert got == want.tolist()
    np.testing.assert_allclose([v for sh in index["shards"] for v in sh["scores"]],
                               s.reshape(-1).numpy(), rtol=1e-12)


def test_dataloader_sampler_is_ignored_and_several_inputs(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 3), nn.Linear(4, 3)

        def forward(self, u, v):
            return self.a(u) * torch.sigmoid(self.b(v)) + self.b(v)

    torch.manual_seed(4)
    model = Two().eval()
    u, v = torch.randn(20, 6), torch.randn(20, 4)
    y = torch.randint(0, 3, (20,))
    ds = [((u[i], v[i]), y[i]) for i in range(20)]
    loader = torch.utils.data.DataLoader(ds, batch_size=6, shuffle=True)
    s = explain_dataset(model, loader, out=tmp_path / "out", cache=False, progress=False)
    assert (s.shards, s.new_samples) == (4, 20)
    index = read_index(tmp_path / "out")
    ids = [i for sh in index["shards"] for i in sh["ids"]]
    assert ids == list(range(20))
    rel = [[np.load(tmp_path / "out" / f["file"]) for f in sh["files"]] for sh in index["shards"]]
    assert [f["file"] for f in index["shards"][0]["files"]] == \
        ["shard-000-000000.npy", "shard-000-000000.in1.npy"]
    for k, sh in enumerate(index["shards"]):
        lo, hi = sh["sample_range"]
        ref = lrpplan.explain(model, u[lo:hi], v[lo:hi], target=y[lo:hi], cache=False)
        for got, want in zip(rel[k], ref.relevance):
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-6, atol=1e-7)


def test_rejects_what_it_cannot_split(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(3)

    with pytest.raises(lrpplan.InvalidInputError, match="map-style"):
        run(cnn(), Stream(), tmp_path / "a")
    with pytest.raises(lrpplan.InvalidInputError, match="entries"):
        run(cnn(), torch.utils.data.TensorDataset(images(4)), tmp_path / "b", target=[1, 2])


# ---------------------------------------------------------------------------------------------
# resume


def test_second_run_over_finished_directory_does_nothing(tmp_path):
    model, data = cnn(), torch.utils.data.TensorDataset(images())
    out = tmp_path / "out"
    run(model, data, out, cache=tmp_path / "c")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = run(model, data, out, cache=tmp_path / "c")
    assert (s.new_samples, s.new_shards, s.skipped_samples, s.traces) == (0, 0, N, 0)
    assert s.first_call_cached == (None,)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert after == before


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the array data, after the .npy header
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped-bytes": _flip,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-16]),
    "missing": lambda p: p.unlink(),
    "garbage-sidecar": lambda p: p.with_suffix(".json").write_text("{not json"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_shard_is_detected_and_redone(tmp_path, kind):
    model, data = cnn(), torch.utils.data.TensorDataset(images())
    out = tmp_path / "out"
    run(model, data, out, cache=tmp_path / "c")
    good = files(out)
    CORRUPTIONS[kind](out / "shard-000-000002.npy")
    with pytest.warns(CorruptShardWarning, match="shard 2 "):
        s = run(model, data, out, cache=tmp_path / "c")
    assert (s.corrupt_shards, s.new_shards, s.new_samples, s.skipped_samples) == \
        (1, 1, BATCH, N - BATCH)
    assert files(out) == good


def test_leftovers_of_a_killed_write_are_cleaned_up(tmp_path):
    """An uncommitted .npy (no sidecar) and a temporary file: no warning, redone, removed."""
    model, data = cnn(), torch.utils.data.TensorDataset(images())
    out = tmp_path / "out"
    run(model, data, out, cache=tmp_path / "c")
    good = files(out)
    (out / "shard-000-000003.json").unlink()
    (out / "shard-000-000003.npy").write_bytes(b"half a shard")
    (out / ".tmp-shard-000-000004.npy.x1y2").write_bytes(b"partial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = run(model, data, out, cache=tmp_path / "c")
    assert (s.new_shards, s.corrupt_shards) == (1, 0)
    assert files(out) == good


def test_other_configuration_is_refused(tmp_path):
    model, data = cnn(), torch.utils.data.TensorDataset(images())
    out = tmp_path / "out"
    run(model, data, out, cache=False)
    with pytest.raises(DatasetMismatchError, match="rules"):
        run(model, data, out, cache=False, rules="zplus")
    with pytest.raises(DatasetMismatchError, match="shard_size"):
        run(model, data, out, cache=False, batch_size=4)
    other = cnn()
    with torch.no_grad():
        other[-1].bias.add_(1.0)
    with pytest.raises(DatasetMismatchError, match="model"):
        run(other, data, out, cache=False)


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_explain_dataset(tmp_path, capsys, monkeypatch):
    (tmp_path / "factories.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = ["explain-dataset", "factories.py:make_model", "factories.py:make_data", "--out",
            str(out), "--batch-size", "16", "--cache", str(tmp_path / "c"), "--no-progress"]
    assert main(argv) == 0
    assert "40 new samples" in capsys.readouterr().out
    data = FACT["make_data"]()
    ids, rel = shard_arrays(out)
    np.testing.assert_array_equal(ids, np.arange(40))
    torch.testing.assert_close(torch.from_numpy(rel), reference(cnn(), data.x, 16, data.y),
                               rtol=1e-6, atol=1e-7)
    assert main(argv) == 0
    assert "0 new samples (40 already done)" in capsys.readouterr().out
    assert main(argv[:-1] + ["--rules", "zplus"]) == 1
    assert "another run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# subprocesses: torchrun and kill/resume


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    d = tmp_path_factory.mktemp("dataset-scripts")
    (d / "factories.py").write_text(FACTORIES)
    (d / "runner.py").write_text(RUNNER)
    return d


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LRPPLAN_TEST_SLEEP"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _launch(scripts: Path, out: Path, cache: Path, nproc: int = 1, **env) -> subprocess.Popen:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(scripts / "runner.py"), str(out), str(cache), str(out) + "-report"]
    return subprocess.Popen(cmd, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, out: Path) -> list[dict]:
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log
    reports = sorted(out.parent.glob(out.name + "-report.*.json"))
    return [json.loads(p.read_text()) for p in reports]


@pytest.fixture(scope="module")
def uninterrupted(scripts, tmp_path_factory):
    """One single-process run of the factories' data set (batch 4: 10 shards)."""
    d = tmp_path_factory.mktemp("uninterrupted")
    (report,) = _finish(_launch(scripts, d / "out", d / "cache"), d / "out")
    assert (report["world"], report["new"], report["traces"]) == (1, 40, 1)
    return d / "out"


def test_torchrun_two_processes_match_single_process(scripts, uninterrupted, tmp_path):
    out = tmp_path / "out"
    reports = _finish(_launch(scripts, out, tmp_path / "cache", nproc=2), out)
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:  # every rank returns the same global summary
        assert (r["world"], r["new"], r["traces"]) == (2, 40, 1)
        # rank 0 traced and stored the plan; rank 1 started after it and loaded the plan
        assert r["first_call_cached"] == [False, True]
    index = read_index(out)
    assert sorted({sh["rank"] for sh in index["shards"]}) == [0, 1]
    assert [sh["index"] for sh in index["shards"]] == list(range(10))
    ids1, rel1 = shard_arrays(uninterrupted)
    ids2, rel2 = shard_arrays(out)
    np.testing.assert_array_equal(ids2, ids1)
    np.testing.assert_array_equal(rel2, rel1)  # exactly the single-process result
    single = read_index(uninterrupted)
    for a, b in zip(single["shards"], index["shards"]):
        assert (a["ids"], a["targets"], a["scores"]) == (b["ids"], b["targets"], b["scores"])
    assert {k: v for k, v in index.items() if k != "shards"} == \
        {k: v for k, v in single.items() if k != "shards"}


def test_killed_run_resumes_identically(scripts, uninterrupted, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = _launch(scripts, out, cache, LRPPLAN_TEST_SLEEP="0.02")  # ~0.1 s per shard
    deadline = time.monotonic() + 60
    while len(list(out.glob("shard-*.json"))) < 2:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)  # reaps it and closes the pipe
    assert proc.returncode == -signal.SIGKILL
    done = sorted(out.glob("shard-*.json"))
    assert 2 <= len(done) < 10 and not (out / "index.json").exists()
    for npy in out.glob("shard-*.npy"):  # whatever is visible under a final name is complete
        assert np.load(npy).shape == (4, 1, 8, 8)
    for side in done:
        for f in json.loads(side.read_text())["files"]:
            assert xxhash.xxh3_128((out / f["file"]).read_bytes()).hexdigest() == f["checksum"]

    (report,) = _finish(_launch(scripts, out, cache), out)
    assert report["new"] == 40 - 4 * len(done) and report["skipped"] == 4 * len(done)
    assert report["traces"] == 0  # the killed run had stored the plan
    assert files(out) == files(uninterrupted)


def test_example_script(tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "explain_dataset.py"
    proc = subprocess.run([sys.executable, str(script), "--samples", "64", "--out",
                           str(tmp_path / "out")], env=_env(LRPPLAN_CACHE=str(tmp_path / "c")),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "read 64 relevance maps of shape (1, 16, 16)" in proc.stdout
    share = float(proc.stdout.split("on the bar pixels: ")[1].split()[0])
    assert share > 0.9  # the line detectors' relevance lies on the bars
    assert "explained 64 of 64 samples" in proc.stderr  # the summary, on stderr
