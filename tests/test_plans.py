"""Compiled plans: replay = trace, the msgpack codec, fingerprints, the disk cache under faults,
concurrency, and the checker.

Every replayed relevance is compared with a fresh traced run (``cache=False``) on the same inputs;
nothing here uses an expected value produced by the code under test in the same code path.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import torch
from torch import nn

import lrpplan
import lrpplan.fingerprint
import lrpplan.graph
import lrpplan.promise
import lrpplan.trace
from lrpplan import CacheWarning, PlanCache, PlanError, RuleSet
from lrpplan.fingerprint import PLAN_FORMAT_VERSION
from lrpplan.plan import Plan, Step, ValueOp, check_plan, decode, encode
from tests.models import ENGINE_BUGS, MODELS, SEQUENCE
from tests.conftest import read_only_dir, run_together

REPO_ROOT = Path(__file__).resolve().parents[1]

def xfail(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)


def params(registry=MODELS, extra: str | None = None):
    """One param per model; known engine bugs (and ``extra``) are strict xfails."""
    out = []
    for name in registry:
        reasons = [r for r in (ENGINE_BUGS.get(name), extra) if r]
        marks = [xfail("; ".join(reasons))] if reasons else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def rel_tuple(attr) -> tuple:
    return attr.relevance if isinstance(attr.relevance, tuple) else (attr.relevance,)


def cast(inputs, dtype):
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)


def assert_same_relevance(got, ref, tol: float) -> None:
    """max |got - ref| / max |ref| <= tol, per input."""
    got, ref = rel_tuple(got), rel_tuple(ref)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
        scale = r.abs().max().item() or 1.0
        err = (g - r).abs().max().item() / scale
        assert err <= tol, f"max relative error {err:.3g} > {tol:g}"


def entry_path(cache: PlanCache, key: str) -> Path:
    paths = {e.key: e.path for e in cache.entries()}
    assert key in paths, f"no cache entry for {key}: {sorted(paths)}"
    return paths[key]


def cache_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, CacheWarning)]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_python(code: str, *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], env=subprocess_env(),
                          cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# ---------------------------------------------------------------------------------------------
# replay = trace


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", params())
def test_replay_equals_trace(name, dtype, tmp_path):
    factory = MODELS[name]
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    model, x1 = factory(batch=2, seq=5)
    model = model.to(dtype)
    explainer = lrpplan.Explainer(model, cache=tmp_path)

    first = explainer(*cast(x1, dtype))
    assert first.cached is False

    # new inputs, same shapes: replay
    _, x2 = factory(batch=2, seq=5)
    second = explainer(*cast(x2, dtype))
    assert second.cached is True
    assert second.plan_key == first.plan_key
    fresh = lrpplan.explain(model, *cast(x2, dtype), cache=False)
    assert fresh.cached is False
    assert_same_relevance(second, fresh, tol)
    if isinstance(fresh.target, torch.Tensor):
        assert torch.equal(second.target, fresh.target)
    else:
        assert second.target == fresh.target

    # another batch size (and sequence length): same structure, same plan, replay
    _, x3 = factory(batch=3, seq=7)
    if name in SEQUENCE:
        assert x3[0].shape[1] == 7
    third = explainer(*cast(x3, dtype))
    assert third.cached is True
    assert third.plan_key == first.plan_key
    assert_same_relevance(third, lrpplan.explain(model, *cast(x3, dtype), cache=False), tol)
    for r, x in zip(rel_tuple(third), x3):
        assert r.shape == x.shape


@pytest.mark.parametrize("name", params())
def test_replay_from_disk_equals_trace(name, tmp_path):
    """A second explain() call (no in-memory plan) loads the plan from disk and replays it."""
    factory = MODELS[name]
    model, x1 = factory(batch=2, seq=5)
    first = lrpplan.explain(model, *x1, cache=tmp_path)
    assert first.cached is False
    _, x2 = factory(batch=3, seq=6)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        again = lrpplan.explain(model, *x2, cache=tmp_path)
    assert cache_warnings(record) == []
    assert again.cached is True
    assert_same_relevance(again, lrpplan.explain(model, *x2, cache=False), 1e-5)


class _SumMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_replay_of_full_reduction_output_via_attribute(reduce, tmp_path):
    model = _SumMLP().eval()
    cache = PlanCache(tmp_path)

    def run(batch, cache):
        x = torch.randn(batch, 5, requires_grad=True)
        out = getattr(model(x), reduce)()
        return lrpplan.attribute(out, x, cache=cache), out, x

    first, _, _ = run(2, cache)
    assert first.cached is False
    second, out, x = run(4, cache)
    assert second.cached is True
    ref = lrpplan.attribute(out, x, cache=False)
    assert_same_relevance(second, ref, 1e-5)


# ---------------------------------------------------------------------------------------------
# the codec


def _plan_of(name: str) -> Plan:
    model, inputs = MODELS[name]()
    return lrpplan.explain(model, *inputs, cache=False).plan


@pytest.mark.parametrize("name", params())
def test_plan_msgpack_round_trip_is_exact(name):
    plan = _plan_of(name)
    data = encode(plan)
    back = decode(data)
    for f in dataclasses.fields(Plan):
        assert getattr(back, f.name) == getattr(plan, f.name), f.name
    for s, t in zip(back.steps, plan.steps):
        assert s == t
    assert back == plan
    assert encode(back) == data


@pytest.mark.parametrize("name", params())
def test_plan_encoding_is_deterministic(name):
    """Same structure traced twice (other weights, inputs, batch size): identical bytes."""
    factory = MODELS[name]
    model, x = factory(batch=2, seq=5)
    a = lrpplan.explain(model, *x, cache=False).plan
    model, x = factory(batch=3, seq=7)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.3)
    b = lrpplan.explain(model, *x, cache=False).plan
    assert encode(a) == encode(b)
    # msgpack only: the bytes are one msgpack map with the documented header, no pickle
    doc = msgpack.unpackb(encode(a), raw=False)
    assert doc["magic"] == "lrpplan-plan"
    assert doc["header"]["format"] == PLAN_FORMAT_VERSION
    assert doc["key"] == a.key


# ---------------------------------------------------------------------------------------------
# fingerprints


def _perturbed(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.add_(torch.rand(b.shape, generator=gen))
    return model


@pytest.mark.parametrize("name", params())
def test_key_same_for_other_weights_and_inputs(name):
    factory = MODELS[name]
    m1, x1 = factory()
    m2, x2 = factory()
    m2 = _perturbed(m2)
    assert not torch.equal(next(m1.parameters()), next(m2.parameters()))
    k1 = lrpplan.explain(m1, *x1, cache=False).plan_key
    with torch.no_grad():  # a model returning one number has no class to pick
        target = None if m2(*x2).dim() == 0 else 0
    k2 = lrpplan.explain(m2, *x2, target=target, cache=False).plan_key
    assert k1 == k2
    assert len(k1) == 32 and int(k1, 16) >= 0


def test_equal_keys_mean_equal_plans():
    """The key determines the plan: models sharing a key (e.g. SDPA with and without masks,
    which read the mask at run time) compile to the same steps."""
    plans: dict[str, list[tuple[str, Plan]]] = {}
    for name, factory in MODELS.items():
        if name in ENGINE_BUGS:
            continue
        model, x = factory()
        attr = lrpplan.explain(model, *x, cache=False)
        plans.setdefault(attr.plan_key, []).append((name, attr.plan))
    assert len(plans) > len(MODELS) // 2
    for key, group in plans.items():
        (_, first), *rest = group
        for other_name, plan in rest:
            assert plan.steps == first.steps, (key, other_name)
            assert (plan.n_rel, plan.n_val, plan.targets) == \
                (first.n_rel, first.n_val, first.targets)


KEY_SCRIPT = r"""
import sys, torch, lrpplan
from tests.models import MODELS
torch.manual_seed(int(sys.argv[1]))
for name in sys.argv[2:]:
    model, x = MODELS[name](batch=3, seq=4)
    print(name, lrpplan.explain(model, *x, cache=False).plan_key)
"""

FRESH_PROCESS_MODELS = ["vgg_cnn", "resnet_block", "sdpa_attention_causal",
                        "explicit_attention_additive_mask", "embedding_tokens", "rmsnorm_block"]


def test_key_same_in_fresh_process():
    here = {}
    for name in FRESH_PROCESS_MODELS:
        model, x = MODELS[name]()
        here[name] = lrpplan.explain(model, *x, cache=False).plan_key
    out = run_python(KEY_SCRIPT, "7", *FRESH_PROCESS_MODELS)
    there = dict(line.split() for line in out.strip().splitlines())
    assert there == here


def _mlp(act: nn.Module, depth: int = 2, bias: bool = True) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(5, 6, bias=bias)]
    for _ in range(depth - 1):
        layers += [act, nn.Linear(6, 6, bias=bias)]
    layers += [nn.ReLU(), nn.Linear(6, 3, bias=bias)]
    return nn.Sequential(*layers).eval()


def test_key_changes_with_structure():
    x = torch.randn(2, 5)
    variants = {
        "relu": _mlp(nn.ReLU()),
        "extra layer": _mlp(nn.ReLU(), depth=3),
        "gelu": _mlp(nn.GELU()),
        "gelu tanh": _mlp(nn.GELU(approximate="tanh")),
        "tanh": _mlp(nn.Tanh()),
        "no bias": _mlp(nn.ReLU(), bias=False),
    }
    keys = {name: lrpplan.explain(m, x, cache=False).plan_key for name, m in variants.items()}
    assert len(set(keys.values())) == len(keys), keys
    # the explained tensor is part of the key: an intermediate gives another plan
    m = variants["relu"]
    xx = x.clone().requires_grad_(True)
    h = m[0](xx)
    out = m[1:](h)
    assert lrpplan.attribute(out, xx, cache=False).plan_key != \
        lrpplan.attribute(out, h, cache=False).plan_key
    # ... but the target class is not (it changes values, not structure)
    assert lrpplan.explain(m, x, target=0, cache=False).plan_key == \
        lrpplan.explain(m, x, target=2, cache=False).plan_key


def test_key_changes_with_rules():
    model, (x,) = MODELS["vgg_cnn"]()
    rule_sets = {
        "default": None,
        "epsilon 1e-9": RuleSet.preset("epsilon", epsilon=1e-9),
        "epsilon 0.1": RuleSet.preset("epsilon", epsilon=0.1),
        "epsilon-plus": RuleSet.preset("epsilon-plus"),
        "zplus": RuleSet.preset("zplus"),
        "epsilon-gamma": RuleSet.preset("epsilon-gamma"),
        "epsilon-gamma 0.5": RuleSet.preset("epsilon-gamma", gamma=0.5),
        "override": RuleSet.preset("epsilon").override("ReluBackward0", "route"),
    }
    keys = {n: lrpplan.explain(model, x, rules=r, cache=False).plan_key
            for n, r in rule_sets.items()}
    assert len(set(keys.values())) == len(keys), keys
    # the same rule set built twice gives the same key
    assert lrpplan.explain(model, x, rules=RuleSet.preset("epsilon-gamma", gamma=0.5),
                           cache=False).plan_key == keys["epsilon-gamma 0.5"]


def test_key_changes_with_plan_format_version(monkeypatch):
    model, (x,) = MODELS["split_chunk"]()
    before = lrpplan.explain(model, x, cache=False).plan_key
    monkeypatch.setattr(lrpplan.fingerprint, "PLAN_FORMAT_VERSION", PLAN_FORMAT_VERSION + 1)
    after = lrpplan.explain(model, x, cache=False).plan_key
    assert after != before
    monkeypatch.undo()
    assert lrpplan.explain(model, x, cache=False).plan_key == before


# ---------------------------------------------------------------------------------------------
# the disk cache across processes

REPLAY_SCRIPT = r"""
import sys, warnings, torch, lrpplan
from tests.models import MODELS
cache_dir, inputs, out, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
xs = torch.load(inputs)
results = {}
for name in names:
    model, _ = MODELS[name]()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        attr = lrpplan.explain(model, *xs[name], cache=cache_dir)
    results[name] = {"cached": attr.cached, "key": attr.plan_key, "relevance": attr.relevance,
                     "warnings": [str(w.message) for w in record]}
torch.save(results, out)
"""

DISK_MODELS = ["resnet_block", "explicit_attention_causal", "embedding_tokens"]


def test_fresh_process_replays_from_disk(tmp_path):
    cache_dir = tmp_path / "cache"
    keys, xs, refs = {}, {}, {}
    for name in DISK_MODELS:
        model, x = MODELS[name]()
        first = lrpplan.explain(model, *x, cache=cache_dir)
        assert first.cached is False
        keys[name] = first.plan_key
        _, xs[name] = MODELS[name](batch=3, seq=6)
        refs[name] = lrpplan.explain(model, *xs[name], cache=False).relevance
    assert sorted(e.key for e in PlanCache(cache_dir).entries()) == sorted(keys.values())
    torch.save(xs, tmp_path / "x.pt")
    run_python(REPLAY_SCRIPT, str(cache_dir), str(tmp_path / "x.pt"), str(tmp_path / "out.pt"),
               *DISK_MODELS)
    got = torch.load(tmp_path / "out.pt")
    for name in DISK_MODELS:
        assert got[name]["warnings"] == [], name
        assert got[name]["cached"] is True, name
        assert got[name]["key"] == keys[name]
        assert torch.allclose(got[name]["relevance"], refs[name], rtol=1e-6, atol=1e-9), name


WORKER = r"""
import json, sys, time, warnings, torch, lrpplan
from pathlib import Path
from tests.models import MODELS
name, cache_dir, inputs, sync, wid = sys.argv[1:6]
sync = Path(sync)
model, _ = MODELS[name]()
x = torch.load(inputs)
(sync / f"ready-{wid}").touch()
deadline = time.monotonic() + 60
while not (sync / "go").exists():
    if time.monotonic() > deadline:
        sys.exit("no go signal")
    time.sleep(0.001)
with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    attr = lrpplan.explain(model, *x, cache=cache_dir)
print(json.dumps({"key": attr.plan_key, "cached": attr.cached,
                  "rel": [float(v).hex() for v in attr.relevance.flatten().tolist()],
                  "warnings": [str(w.message) for w in record]}))
"""


def test_four_processes_compile_the_same_key(tmp_path):
    name = "layernorm_block"
    model, x = MODELS[name]()
    torch.save(x, tmp_path / "x.pt")
    cache_dir = tmp_path / "cache"
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, name, str(cache_dir),
                               str(tmp_path / "x.pt"), str(sync), str(wid)],
                              env=subprocess_env(), cwd=str(REPO_ROOT), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for wid in range(4)]
    results = run_together(procs, sync, timeout=90)
    ref = lrpplan.explain(model, *x, cache=False)
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        got = json.loads(out.strip().splitlines()[-1])
        assert got["key"] == ref.plan_key
        assert got["warnings"] == []  # a warning would mean a worker read a partial file
        rel = torch.tensor([float.fromhex(v) for v in got["rel"]]).reshape(ref.relevance.shape)
        torch.testing.assert_close(rel, ref.relevance, rtol=1e-6, atol=1e-9)
    cache = PlanCache(cache_dir)
    entries = cache.entries()
    assert [e.key for e in entries] == [ref.plan_key]
    # the one entry holds the complete plan (byte-identical to a fresh compile) and decodes
    assert entries[0].path.read_bytes() == encode(ref.plan)
    assert cache.verify(decode) == []
    leftovers = [p for p in cache_dir.rglob("*") if p.is_file() and p != entries[0].path]
    assert leftovers == []


# ---------------------------------------------------------------------------------------------
# faults: a bad file is a warned miss, recompiled, never a wrong answer

FAULT_MODEL = "resnet_block"


def _corrupt(kind: str, data: bytes, foreign: bytes) -> bytes:
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "bit-flipped":
        b = bytearray(data)
        mid = len(b) // 2
        for i in range(mid - 8, mid + 8):
            b[i] ^= 0xFF
        return bytes(b)
    if kind == "empty":
        return b""
    if kind == "wrong-schema":
        doc = msgpack.unpackb(data, raw=False)
        doc["schema"] = doc["schema"] + 1
        return msgpack.packb(doc, use_bin_type=True)
    if kind == "wrong-format-version":
        doc = msgpack.unpackb(data, raw=False)
        doc["header"]["format"] = PLAN_FORMAT_VERSION + 1
        return msgpack.packb(doc, use_bin_type=True)
    if kind == "not-msgpack":
        return b"\x00garbage that is not msgpack at all" * 3
    if kind == "wrong-key":
        return foreign
    raise AssertionError(kind)


FAULTS = ["truncated", "bit-flipped", "empty", "wrong-schema", "wrong-format-version",
          "not-msgpack", "wrong-key"]


@pytest.mark.parametrize("kind", FAULTS)
def test_bad_plan_file_is_one_warning_and_recompiled(kind, tmp_path):
    cache = PlanCache(tmp_path)
    model, x = MODELS[FAULT_MODEL]()
    first = lrpplan.explain(model, *x, cache=cache)
    other_model, other_x = MODELS["vgg_cnn"]()
    other = lrpplan.explain(other_model, *other_x, cache=cache)
    assert other.plan_key != first.plan_key
    path = entry_path(cache, first.plan_key)
    good = path.read_bytes()
    bad = _corrupt(kind, good, entry_path(cache, other.plan_key).read_bytes())
    assert bad != good
    path.write_bytes(bad)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = lrpplan.explain(model, *x, cache=cache)
    ws = cache_warnings(record)
    assert len(ws) == 1, [str(w.message) for w in record]
    assert first.plan_key in str(ws[0].message)
    assert got.cached is False
    ref = lrpplan.explain(model, *x, cache=False)
    assert torch.equal(got.relevance, ref.relevance)
    assert got.plan_key == ref.plan_key
    # the recompiled plan replaced the bad file; the other model's entry is untouched
    assert entry_path(cache, first.plan_key).read_bytes() == good
    assert sorted(e.key for e in cache.entries()) == sorted([first.plan_key, other.plan_key])


def test_every_single_byte_flip_is_caught_or_harmless(tmp_path):
    """Flip each byte of a stored plan: every run must still give the right relevance with no
    exception; a flip that changes the plan must be reported (one CacheWarning)."""
    cache = PlanCache(tmp_path)
    model, (x,) = MODELS["const_scale"]()
    lrpplan.explain(model, x, cache=cache)
    ref = lrpplan.explain(model, x, cache=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert lrpplan.explain(model, x, cache=cache).cached is True  # the file is usable
    assert cache_warnings(record) == []
    path = entry_path(cache, ref.plan_key)
    good = path.read_bytes()
    failures = Counter()
    for pos in range(0, len(good), 2):
        b = bytearray(good)
        b[pos] ^= 0xFF
        path.write_bytes(bytes(b))
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            try:
                got = lrpplan.explain(model, x, cache=cache)
            except Exception as exc:  # noqa: BLE001 - any crash is a failure
                failures[f"crash {type(exc).__name__}"] += 1
                continue
        if not torch.allclose(got.relevance, ref.relevance, rtol=1e-6, atol=1e-9):
            failures["wrong relevance"] += 1
        elif got.cached and len(cache_warnings(record)) == 0:
            failures["modified plan accepted silently"] += 1
        path.write_bytes(good)
    assert not failures, f"{dict(failures)} of {len(good) // 2} single-byte flips"


# ---------------------------------------------------------------------------------------------
# a read-only cache


@pytest.fixture
def readonly_cache(tmp_path, monkeypatch):
    """A cache dir holding the plan of ``resnet_block``, then made read-only.

    chmod 0o555 stops writes for ordinary users; under root a probe write still succeeds, and
    then every mutating call on a path under the cache root fails with PermissionError instead
    (the approach of tests/test_cache.py).
    """
    root = tmp_path / "ro"
    model, x = MODELS["resnet_block"]()
    key = lrpplan.explain(model, *x, cache=root).plan_key
    with read_only_dir(root, monkeypatch):
        yield root, key


def test_readonly_cache_miss_works_with_one_warning(readonly_cache):
    root, _ = readonly_cache
    before = sorted(p.name for p in root.rglob("*"))
    model, x = MODELS["layernorm_block"]()
    explainer = lrpplan.Explainer(model, cache=root)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = explainer(*x)
        _, x2 = MODELS["layernorm_block"](batch=3, seq=4)
        second = explainer(*x2)
    assert len(cache_warnings(record)) == 1, [str(w.message) for w in record]
    assert first.cached is False and second.cached is True  # kept in memory
    assert_same_relevance(first, lrpplan.explain(model, *x, cache=False), 1e-6)
    assert_same_relevance(second, lrpplan.explain(model, *x2, cache=False), 1e-6)
    assert sorted(p.name for p in root.rglob("*")) == before


def test_readonly_cache_hit_replays_without_warning(readonly_cache):
    root, key = readonly_cache
    model, x = MODELS["resnet_block"]()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        attr = lrpplan.explain(model, *x, cache=root)
    assert cache_warnings(record) == []
    assert attr.cached is True and attr.plan_key == key
    assert_same_relevance(attr, lrpplan.explain(model, *x, cache=False), 1e-6)


# ---------------------------------------------------------------------------------------------
# a replay walks the graph once and does nothing else structural


@pytest.fixture
def counters(monkeypatch):
    counts: Counter = Counter()
    seen: list = []

    def wrap(owner, attr, key):
        orig = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            counts[key] += 1
            return orig(*args, **kwargs)
        monkeypatch.setattr(owner, attr, wrapper)

    wrap(lrpplan.trace.PlanCompiler, "compile", "trace")
    wrap(lrpplan.promise.ValueResolver, "recipe", "recipe")
    orig_next = lrpplan.graph._next

    def counting_next(node, cache):
        seen.append(node)
        return orig_next(node, cache)
    monkeypatch.setattr(lrpplan.graph, "_next", counting_next)
    return counts, seen


@pytest.mark.parametrize("name", params())
def test_replay_does_no_traversal_beyond_the_fingerprint_walk(name, counters):
    counts, seen = counters
    factory = MODELS[name]
    model, x1 = factory()
    explainer = lrpplan.Explainer(model, cache=False)
    first = explainer(*x1)
    assert counts["trace"] == 1  # the counters see the engine's calls
    n_nodes = first.plan.stats["nodes"]
    assert len(seen) == n_nodes
    counts.clear()
    seen.clear()
    _, x2 = factory()
    second = explainer(*x2)
    assert second.cached is True
    assert counts["trace"] == 0
    assert counts["recipe"] == 0
    assert len(seen) == n_nodes  # next_functions read exactly once per node
    assert len(set(seen)) == n_nodes
    assert_same_relevance(second, lrpplan.explain(model, *x2, cache=False), 1e-5)


# ---------------------------------------------------------------------------------------------
# check_plan


def _synthetic_plan(**changes) -> Plan:
    """A minimal valid plan: seed r0 at node 0 -> identity -> r1 -> collect into target 0."""
    steps = (
        Step("rule", 0, "identity", rel_in=(-1,), rel_out=(0,), params={"send": [True]}),
        Step("rule", 1, "identity", rel_in=(0,), rel_out=(1,), params={"send": [True]}),
        Step("collect", 2, rel_in=(1,), params={"target": 0}),
    )
    plan = Plan(key="0" * 32, header={"format": PLAN_FORMAT_VERSION, "roots": []},
                steps=steps, n_rel=2, n_val=0,
                targets=({"edge": [2, 0], "kind": "tensor", "index": 0},))
    return dataclasses.replace(plan, **changes)


def _replace_step(plan: Plan, i: int, **changes) -> Plan:
    steps = list(plan.steps)
    steps[i] = dataclasses.replace(steps[i], **changes)
    return dataclasses.replace(plan, steps=tuple(steps))


def test_check_plan_accepts_the_synthetic_plan():
    check_plan(_synthetic_plan(), n_nodes=3, key="0" * 32)


@pytest.mark.parametrize("mutate, n_nodes, match", [
    (lambda p: _replace_step(p, 1, rule="no_such_rule"), None, "unknown rule 'no_such_rule'"),
    (lambda p: _replace_step(p, 1, node=3), 3, "node id 3 out of range"),
    (lambda p: _replace_step(p, 1, node=-1), None, "node id -1 out of range"),
    (lambda p: _replace_step(p, 1, rel_in=(1,)), None, "relevance slot 1 read before"),
    (lambda p: _replace_step(p, 1, rel_out=(5,)), None, "relevance slot 5 out of range"),
    (lambda p: _replace_step(p, 1, vals=((0, 0),)), None, "value slot 0 read before"),
    (lambda p: _replace_step(p, 1, chain=(ValueOp("fwd", 0, "", (0,), (),
                                                  {"node_type": "ViewBackward0"}),)), None,
     "value slot 0 read before"),
    (lambda p: _replace_step(p, 1, chain=(ValueOp("fwd", 0, "", (), (),
                                                  {"node_type": "NoSuchBackward0"}),)), None,
     "unknown node type 'NoSuchBackward0'"),
    (lambda p: _replace_step(p, 1, chain=(ValueOp("saved", 0, "__class__", (), (0,)),)), None,
     "not a node attribute name"),
    (lambda p: _replace_step(p, 1, chain=(ValueOp("meta", 0, "strides", (), (0,)),)), None,
     "meta read 'strides'"),
    (lambda p: _replace_step(p, 1, kind="jump"), None, "unknown step kind"),
    (lambda p: _replace_step(p, 2, params={"target": 1}), None, "collect target 1"),
    (lambda p: dataclasses.replace(p, header={"format": PLAN_FORMAT_VERSION + 1}), None,
     "plan format"),
], ids=["unknown-rule", "node-id-too-large", "negative-node-id", "rel-slot-read-early",
        "rel-slot-out-of-range", "val-slot-read-early", "fwd-input-read-early",
        "fwd-unknown-op", "dunder-attr", "unknown-meta", "unknown-kind", "collect-target",
        "format-version"])
def test_check_plan_rejects_synthetic(mutate, n_nodes, match):
    with pytest.raises(PlanError, match=match):
        check_plan(mutate(_synthetic_plan()), n_nodes=n_nodes)


def test_check_plan_rejects_wrong_key():
    with pytest.raises(PlanError, match="does not match"):
        check_plan(_synthetic_plan(), key="1" * 32)


def _top_level_rule_index(plan: Plan) -> int:
    return next(i for i, s in enumerate(plan.steps) if s.kind == "rule")


def _read_before_write(plan: Plan) -> Plan:
    """Make the first rule step read a relevance slot that only a later step writes."""
    i = _top_level_rule_index(plan)
    later = [r for s in plan.steps[i + 1:] for b in (s.body or (s,)) for r in b.rel_out if r >= 0]
    roots = set(plan.header["roots"])
    earlier = {r for s in plan.steps[:i + 1] for b in (s.body or (s,)) for r in b.rel_out}
    slot = next(r for r in later if r not in roots and r not in earlier)
    return _replace_step(plan, i, rel_in=(slot,))


@pytest.mark.parametrize("mutate, match", [
    (lambda p: _replace_step(p, _top_level_rule_index(p), rule="no_such_rule"),
     "unknown rule 'no_such_rule'"),
    (lambda p: _replace_step(p, _top_level_rule_index(p), node=p.stats["nodes"] + 5),
     "out of range"),
    (_read_before_write, "read before it is written"),
], ids=["unknown-rule", "node-id-out-of-range", "slot-read-before-written"])
def test_check_plan_on_real_plans(mutate, match):
    plan = _plan_of("resnet_block")
    n = plan.stats["nodes"]
    check_plan(plan, n_nodes=n, key=plan.key)  # the compiled plan itself is valid
    bad = mutate(plan)
    with pytest.raises(PlanError, match=match):
        check_plan(bad, n_nodes=n, key=plan.key)
    # and decode() runs the same checks on bytes from disk
    with pytest.raises(PlanError):
        check_plan(decode(encode(bad)), n_nodes=n, key=plan.key)
