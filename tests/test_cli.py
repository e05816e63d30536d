"""The command line (``lrpplan.cli``), ``python -m lrpplan``, ``lrpplan.viz`` and the examples.

References are independent of the code under test: the plan file is read with msgpack directly,
the cache layout is the documented one (cache/README.md), colours are the closed-form ``bwr`` map,
the model's mode is recorded by the model itself, and keys are compared with the library API.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

import lrpplan
from lrpplan import viz
from lrpplan.cli import CLIError, main, parse_example

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


FACTORIES = '''
import torch
from torch import nn

SEEN_MODES = []


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        SEEN_MODES.append(self.training)
        return self.l2(torch.relu(self.l1(x)))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(50, 8), nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.emb(ids))


def make_mlp():
    torch.manual_seed(0)
    return MLP().eval()


def make_mlp_train():
    torch.manual_seed(0)
    return MLP()


def make_tokens():
    torch.manual_seed(0)
    return Tokens().eval()


def make_not_a_model():
    return 42
'''


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """A private default cache, and sys.path restored after the CLI extends it."""
    monkeypatch.setenv("LRPPLAN_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """Name of a fresh module with model factories in the current directory (tmp_path)."""
    name = f"cli_factories_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def _env(cache: Path) -> dict:
    env = dict(os.environ, LRPPLAN_CACHE=str(cache), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def _run(args: list, cwd: Path, cache: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(cache), capture_output=True,
                          text=True, timeout=timeout)


def _plan_files(cache: Path) -> list[Path]:
    """Plan files of the documented layout <root>/plans-v1/<key[:2]>/<key>.lrpplan."""
    return sorted(p for p in cache.glob("plans-v1/*/*.lrpplan")
                  if re.fullmatch(r"[0-9a-f]{32}", p.stem) and p.parent.name == p.stem[:2])


def _field(out: str, name: str) -> str:
    m = re.search(rf"^{re.escape(name)}: (\S+)", out, re.M)
    assert m, f"no '{name}:' line in\n{out}"
    return m.group(1)


def _assert_png(path: Path, size: tuple[int, int] | None = None) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    Image = pytest.importorskip("PIL.Image")
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        if size is not None:
            assert img.size == size


# --------------------------------------------------------------------------------- parsing


def test_parse_example_float_and_token_inputs():
    x = parse_example("2x3x5")
    assert x.shape == (2, 3, 5) and x.dtype == torch.float32
    assert parse_example("4:float64").dtype == torch.float64
    assert parse_example("4:double").dtype == torch.float64
    ids = parse_example("64x10:int64")
    assert ids.dtype == torch.int64 and ids.shape == (64, 10)
    assert int(ids.min()) >= 0 and int(ids.max()) < 100 and int(ids.max()) > 50
    small = parse_example("200:long:7")
    assert small.dtype == torch.int64 and set(small.tolist()) <= set(range(7))
    assert parse_example("3:int32").dtype == torch.int32
    # seeded: the same spec and seed give the same tensor, another seed another one
    assert torch.equal(parse_example("3x3", seed=1), parse_example("3x3", seed=1))
    assert not torch.equal(parse_example("3x3", seed=1), parse_example("3x3", seed=2))


@pytest.mark.parametrize("spec", ["", "2x", "x3", "2x0", "2x3:complex7", "2:float32:5",
                                  "2:int64:x", "2:int64:0", "2:int64:3:4", "two"])
def test_parse_example_rejects_bad_specs(spec):
    with pytest.raises(CLIError):
        parse_example(spec)


def test_usage_errors_and_help(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "compile" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert main(["compile", "m:f"]) == 2  # --example is required
    assert main(["demo", "--rules", "no-such-preset"]) == 2


# --------------------------------------------------------------------------------- compile


def test_compile_stores_plan_and_writes_out_file(factories, tmp_path, capsys):
    cache = tmp_path / "c"
    out = tmp_path / "sub" / "mlp.lrpplan"
    rc = main(["compile", f"{factories}:make_mlp", "--example", "2x4", "--cache", str(cache),
               "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    key = _field(text, "key")
    assert re.fullmatch(r"[0-9a-f]{32}", key)
    # the same key as the library gives for the same model and input structure
    model = sys.modules[factories].make_mlp()
    assert lrpplan.explain(model, torch.randn(2, 4), cache=False).plan_key == key
    # stored in the documented layout, and the output says where
    stored = cache / "plans-v1" / key[:2] / f"{key}.lrpplan"
    assert _plan_files(cache) == [stored]
    assert str(stored) in text
    # --out: the same bytes, a msgpack document of the documented shape (read with msgpack)
    assert out.read_bytes() == stored.read_bytes()
    doc = msgpack.unpackb(out.read_bytes(), raw=False)
    assert doc["magic"] == "lrpplan-plan" and doc["schema"] == 2 and doc["key"] == key
    assert {"header", "n_rel", "n_val", "targets", "assumptions", "stats", "steps"} <= set(doc)
    assert doc["header"]["rules"]["name"] == "epsilon"
    assert re.search(rf"nodes: {doc['stats']['nodes']}\s+steps: {len(doc['steps'])}\b", text)
    assert f"Promises: {doc['stats']['promises']}" in text
    assert str(out) in text


def test_compile_uses_default_cache_and_file_path_factory(factories, tmp_path, capsys):
    rc = main(["compile", f"{tmp_path / (factories + '.py')}:make_mlp", "--example", "1x4",
               "--rules", "zplus", "--param", "epsilon=1e-9"])
    text = capsys.readouterr().out
    assert rc == 0, text
    key = _field(text, "key")
    assert [p.stem for p in _plan_files(tmp_path / "default-cache")] == [key]
    # the rule configuration is part of the key
    model = sys.modules[factories].make_mlp()
    eps = lrpplan.explain(model, torch.randn(1, 4), cache=False).plan_key
    zplus = lrpplan.explain(model, torch.randn(1, 4), cache=False,
                            rules=lrpplan.RuleSet.preset("zplus", epsilon=1e-9)).plan_key
    assert key == zplus != eps


def test_compile_does_not_change_the_model_mode(factories, tmp_path, capsys):
    rc = main(["compile", f"{factories}:make_mlp_train", "--example", "3x4",
               "--cache", str(tmp_path / "c")])
    text = capsys.readouterr().out
    assert rc == 0, text
    mod = sys.modules[factories]
    assert mod.SEEN_MODES and all(mod.SEEN_MODES)  # forward ran in training mode
    assert "train mode" in text
    mod.SEEN_MODES.clear()
    assert main(["compile", f"{factories}:make_mlp", "--example", "3x4",
                 "--cache", str(tmp_path / "c")]) == 0
    assert mod.SEEN_MODES and not any(mod.SEEN_MODES)
    assert "eval mode" in capsys.readouterr().out


def test_compile_token_ids(factories, tmp_path, capsys):
    rc = main(["compile", f"{factories}:make_tokens", "--example", "2x6:int64:50",
               "--cache", str(tmp_path / "c")])
    text = capsys.readouterr().out
    assert rc == 0, text
    model = sys.modules[factories].make_tokens()
    ids = torch.randint(0, 50, (2, 6))
    assert _field(text, "key") == lrpplan.explain(model, ids, cache=False).plan_key


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "MODULE:FACTORY"),
    ("no_such_module_xyz:make", "cannot import"),
    ("{m}:missing", "no attribute"),
    ("{m}:make_not_a_model", "torch.nn.Module"),
    ("missing_file.py:make", "no such file"),
])
def test_compile_errors_are_one_line(factories, tmp_path, capsys, spec, message):
    rc = main(["compile", spec.format(m=factories), "--example", "2x4",
               "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("lrpplan: error:") and message in err
    assert "Traceback" not in err
    assert _plan_files(tmp_path / "c") == []


def test_compile_bad_param(factories, tmp_path, capsys):
    assert main(["compile", f"{factories}:make_mlp", "--example", "2x4",
                 "--param", "epsilon"]) == 1
    assert main(["compile", f"{factories}:make_mlp", "--example", "2x4",
                 "--param", "nonsense=1"]) == 1
    assert "nonsense" in capsys.readouterr().err


# --------------------------------------------------------------------------------- inspect


def _compiled(factories: str, tmp_path: Path, capsys) -> tuple[str, Path, dict]:
    out = tmp_path / "plan.lrpplan"
    assert main(["compile", f"{factories}:make_mlp", "--example", "2x4",
                 "--cache", str(tmp_path / "c"), "--out", str(out)]) == 0
    key = _field(capsys.readouterr().out, "key")
    return key, out, msgpack.unpackb(out.read_bytes(), raw=False)


def test_compiled_plan_file_decodes(factories, tmp_path, capsys):
    key, out, doc = _compiled(factories, tmp_path, capsys)
    plan = lrpplan.plan.decode(out.read_bytes())
    assert plan.key == key
    assert len(plan.steps) == len(doc["steps"])


@pytest.mark.parametrize("by", ["file", "key", "prefix"])
def test_inspect_prints_stats(factories, tmp_path, capsys, by):
    key, out, doc = _compiled(factories, tmp_path, capsys)
    ref = {"file": str(out), "key": key, "prefix": key[:8]}[by]
    assert main(["inspect", ref, "--cache", str(tmp_path / "c"), "--steps"]) == 0
    text = capsys.readouterr().out
    s = doc["stats"]
    assert f"plan {key}" in text
    assert f"nodes: {s['nodes']}\n" in text
    assert f"steps: {len(doc['steps'])}\n" in text
    n_rule = sum(len(st[8]) if st[0] == "fused" else st[0] == "rule" for st in doc["steps"])
    assert f"rule steps: {n_rule}\n" in text
    assert f"Promises: {s['promises']}" in text
    assert f"fused internal nodes: {s['fused_internal_nodes']}\n" in text
    assert f"Promise density ρ: {s['promise_density']:.4f}\n" in text
    assert f"max Promise depth: {s['max_promise_depth']}\n" in text
    assert "assumptions:" in text
    # --steps: one line per step after the plan's header line
    listing = [ln for ln in text.splitlines() if re.match(r"\s+\d+  ", ln)]
    assert len(listing) == len(doc["steps"])


def test_inspect_errors(tmp_path, capsys):
    bad = tmp_path / "garbage.lrpplan"
    bad.write_bytes(b"\x00not msgpack at all")
    assert main(["inspect", str(bad)]) == 1
    assert "not a valid plan" in capsys.readouterr().err
    assert main(["inspect", "0123456789abcdef0123456789abcdef", "--cache", str(tmp_path)]) == 1
    assert "no plan" in capsys.readouterr().err
    assert main(["inspect", "not/a/file/nor/key"]) == 1
    assert "neither a plan file nor a cache key" in capsys.readouterr().err


# --------------------------------------------------------------------------------- cache


def test_cache_ls_verify_clear(factories, tmp_path, capsys):
    cache = tmp_path / "c"
    # empty (missing) cache
    assert main(["cache", "ls", "--cache", str(cache)]) == 0
    assert "0 plans" in capsys.readouterr().out
    assert main(["cache", "verify", "--cache", str(cache)]) == 0
    assert main(["cache", "clear", "--cache", str(cache)]) == 0
    assert "removed 0 plans" in capsys.readouterr().out

    key, _, _ = _compiled(factories, tmp_path, capsys)
    corrupt = "ab" + "0" * 30
    (cache / "plans-v1" / "ab").mkdir(parents=True, exist_ok=True)
    (cache / "plans-v1" / "ab" / f"{corrupt}.lrpplan").write_bytes(b"\xc1 corrupt")
    (cache / "plans-v1" / "ab" / "README.txt").write_text("not a plan")

    assert main(["cache", "ls", "--cache", str(cache)]) == 0
    text = capsys.readouterr().out
    assert key in text and corrupt in text and "2 plans" in text and "README" not in text

    assert main(["cache", "verify", "--cache", str(cache)]) == 1
    text = capsys.readouterr().out
    assert f"INVALID {corrupt}" in text and "2 plans checked" in text
    assert len(_plan_files(cache)) == 2  # verify deletes nothing

    assert main(["cache", "clear", "--cache", str(cache)]) == 0
    assert "removed 2 plans" in capsys.readouterr().out
    assert _plan_files(cache) == []
    assert (cache / "plans-v1" / "ab" / "README.txt").exists()  # only plans are removed


def test_cache_commands_use_the_default_cache(factories, tmp_path, capsys):
    assert main(["compile", f"{factories}:make_mlp", "--example", "2x4"]) == 0
    key = _field(capsys.readouterr().out, "key")
    assert main(["cache", "ls"]) == 0
    text = capsys.readouterr().out
    assert key in text and str(tmp_path / "default-cache") in text
    assert main(["cache", "clear"]) == 0
    assert _plan_files(tmp_path / "default-cache") == []


def test_cache_verify_accepts_compiled_plans(factories, tmp_path, capsys):
    _compiled(factories, tmp_path, capsys)
    assert main(["cache", "verify", "--cache", str(tmp_path / "c")]) == 0
    assert "0 invalid" in capsys.readouterr().out


# --------------------------------------------------------------------------------- demo


_TIMING = re.compile(r"^explanation (\d): (\d+(?:\.\d+)?) ms, cached=(True|False)", re.M)


def _demo_timings(text: str) -> list[tuple[float, bool]]:
    found = [(float(ms), cached == "True") for _, ms, cached in _TIMING.findall(text)]
    assert len(found) == 2, text
    return found


def test_demo_in_process(tmp_path, capsys):
    cache = tmp_path / "demo-cache"
    assert main(["demo", "--out", str(tmp_path / "out"), "--cache", str(cache)]) == 0
    text = capsys.readouterr().out
    (ms1, cached1), (ms2, cached2) = _demo_timings(text)
    assert (cached1, cached2) == (False, True)
    assert ms1 > 0 and ms2 > 0
    keys = sorted([_field(text, "plan key"), _field(text, "plan key (epsilon-gamma-box)")])
    assert [p.stem for p in _plan_files(cache)] == keys  # the epsilon and the gamma-box plan
    m = re.search(r"^ledger: start (\S+) = at inputs (\S+) \+ absorbed (\S+)", text, re.M)
    assert m, text
    start, at_inputs, absorbed = map(float, m.groups())
    assert abs(start - at_inputs - absorbed) <= 1e-4 * max(1.0, abs(start))
    from lrpplan.demo import figure_size
    _assert_png(tmp_path / "out" / "lrpplan-demo-digits.png", figure_size(8, 2))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``python -m lrpplan demo`` once, in a temporary cwd with LRPPLAN_CACHE in tmp."""
    cwd = tmp_path_factory.mktemp("demo-cwd")
    cache = tmp_path_factory.mktemp("demo-env-cache")
    return cwd, cache, _run(["-m", "lrpplan", "demo"], cwd, cache)


def test_demo_subprocess(demo_run):
    cwd, cache, done = demo_run
    assert done.returncode == 0, done.stdout + done.stderr
    (_, cached1), (_, cached2) = _demo_timings(done.stdout)
    assert (cached1, cached2) == (False, True)
    assert "Traceback" not in done.stderr
    _assert_png(cwd / "lrpplan-demo-digits.png")
    # the default cache is LRPPLAN_CACHE: the plan went there, nothing into the cwd
    assert [p.stem for p in _plan_files(cache)] == sorted(
        [_field(done.stdout, "plan key"), _field(done.stdout, "plan key (epsilon-gamma-box)")])
    assert sorted(p.name for p in cwd.iterdir()) == ["lrpplan-demo-digits.png"]


def test_demo_second_process_replays_from_disk(demo_run):
    cwd, cache, _ = demo_run
    again = _run(["-m", "lrpplan", "demo"], cwd, cache)
    assert again.returncode == 0, again.stderr
    assert [c for _, c in _demo_timings(again.stdout)] == [True, True]
    assert "CacheWarning" not in again.stderr


# --------------------------------------------------------------------------------- viz


BLUE, WHITE, RED = (0, 0, 255), (255, 255, 255), (255, 0, 0)


def _px(rgb: np.ndarray) -> list:
    return [tuple(int(c) for c in p) for p in rgb.reshape(-1, 3)]


def test_colorize_signed_symmetric_bwr():
    assert _px(viz.colorize(torch.tensor([[-1.0, 0.0, 1.0]]))) == [BLUE, WHITE, RED]
    # symmetric normalisation by max |R|: -1 against a max of 2 is half-way from white to blue
    assert _px(viz.colorize(np.array([[2.0, -1.0, 1.0]]))) == [RED, (128, 128, 255),
                                                               (255, 128, 128)]
    # negative maximum: the most negative value is full blue
    assert _px(viz.colorize(np.array([[-4.0, 2.0]]))) == [BLUE, (255, 128, 128)]
    # all zero: white, not NaN
    assert _px(viz.colorize(np.zeros((2, 2)))) == [WHITE] * 4


def test_colorize_sums_channels_and_accepts_batch_of_one():
    r = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    r[0, 0, 0, 0], r[0, 1, 0, 0] = 5.0, -5.0      # cancels: white
    r[0, 2, 1, 1] = 3.0                           # the maximum: red
    r[0, 0, 0, 1], r[0, 1, 0, 1] = -1.0, -0.5     # -1.5 = half of max: half blue
    assert _px(viz.colorize(r)) == [WHITE, (128, 128, 255), WHITE, RED]
    assert _px(viz.colorize(r[0])) == _px(viz.colorize(r))


def test_colorize_errors():
    with pytest.raises(ValueError, match="shape"):
        viz.colorize(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        viz.colorize(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="colour map"):
        viz.colorize(torch.ones(2, 2), cmap="jet")


def test_heatmap_and_overlay_png(tmp_path):
    pytest.importorskip("PIL")
    rel = torch.tensor([[[-1.0, 0.0], [0.5, 1.0]]])
    img = viz.heatmap(rel, tmp_path / "h.png", scale=3)
    assert img.size == (6, 6) and img.mode == "RGB"
    _assert_png(tmp_path / "h.png", (6, 6))
    assert img.getpixel((0, 0)) == BLUE and img.getpixel((5, 5)) == RED
    assert img.getpixel((3, 0)) == WHITE and img.getpixel((0, 3)) == (255, 128, 128)

    image = np.array([[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [100, 110, 120]]], np.uint8)
    ov = viz.overlay(image, rel, tmp_path / "o.png", alpha=1.0)
    _assert_png(tmp_path / "o.png", (2, 2))
    assert ov.getpixel((1, 0)) == (40, 50, 60)       # zero relevance: the image unchanged
    assert ov.getpixel((0, 0)) == BLUE               # |R| = max, alpha 1: the colour
    assert ov.getpixel((1, 1)) == RED
    # half relevance: half image, half colour (255, 128, 128)
    assert ov.getpixel((0, 1)) == tuple(round(0.5 * a + 0.5 * b)
                                        for a, b in zip((70, 80, 90), (255, 128, 128)))
    with pytest.raises(ValueError):
        viz.overlay(np.zeros((3, 3, 3), np.uint8), rel)


def test_viz_without_pillow_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match=re.escape("pip install lrpplan[viz]")):
        viz.heatmap(torch.ones(2, 2))
    with pytest.raises(ImportError, match="pip install pillow"):
        viz.overlay(torch.ones(2, 2), torch.ones(2, 2))
    assert viz.colorize(torch.ones(2, 2)).shape == (2, 2, 3)  # numpy only


# --------------------------------------------------------------------------------- examples


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("quickstart-cwd")
    cache = tmp_path_factory.mktemp("quickstart-cache")
    return cwd, cache, _run([str(REPO_ROOT / "examples" / "quickstart.py")], cwd, cache)


def test_example_quickstart_runs(quickstart_run):
    cwd, cache, done = quickstart_run
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(r"^explain #1: .* cached=False", done.stdout, re.M)
    assert re.search(r"^Explainer .* call 2: cached=True", done.stdout, re.M)
    _assert_png(cwd / "quickstart-heatmap.png")
    assert _plan_files(cache)  # LRPPLAN_CACHE honoured


def test_example_quickstart_replays_from_disk(quickstart_run):
    _, _, done = quickstart_run
    assert re.search(r"^explain #2: .* cached=True", done.stdout, re.M), done.stdout
    assert "CacheWarning" not in done.stderr


@pytest.fixture(scope="module")
def aot_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("aot-cwd")
    cache = tmp_path_factory.mktemp("aot-cache")
    return cwd, cache, _run([str(REPO_ROOT / "examples" / "aot_compile.py")], cwd, cache)


def test_example_aot_compile_compiles(aot_run):
    cwd, cache, done = aot_run
    assert "Traceback" not in done.stderr, done.stderr
    key = _field(done.stdout, "key")
    assert [p.stem for p in _plan_files(cache)] == [key]
    assert "[fresh process" in done.stdout and f"plan {key}" in done.stdout
    assert list(cwd.iterdir()) == []


def test_example_aot_compile_replays_in_fresh_process(aot_run):
    _, _, done = aot_run
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^\[fresh process \d+\] .* cached=True", done.stdout, re.M), done.stdout
