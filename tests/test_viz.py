"""``lrpplan.viz`` token renderings (HTML, terminal) and the heatmap grid.

References are independent of the code under test: the HTML is parsed with the standard
library's ``html.parser``, expected colours come from the closed form of matplotlib's ``bwr`` map
(blue (0, 0, 255) -> white -> red (255, 0, 0), linear in ``R / max |R|``), the ANSI sequences
are the documented ``ESC[48;2;r;g;bm`` form, and grid sizes are counted by hand.
(The image heatmaps ``colorize``/``heatmap``/``overlay`` are tested in tests/test_cli.py.)
"""
from __future__ import annotations

import re
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from lrpplan import viz

BLUE, WHITE, RED = (0, 0, 255), (255, 255, 255), (255, 0, 0)
BACKGROUND = (224, 224, 224)  # the documented grid background
ANSI_BG = re.compile(r"\x1b\[48;2;(\d+);(\d+);(\d+)m\x1b\[38;2;\d+;\d+;\d+m(.*?)\x1b\[0m")


def bwr(value: float, peak: float) -> tuple[int, int, int]:
    """Closed-form bwr colour of ``value`` normalised by ``peak`` (round half to even)."""
    v = value / peak if peak > 0 else 0.0
    if v >= 0:
        c = round(255 * (1 - v))
        return (255, c, c)
    c = round(255 * (1 + v))
    return (c, c, 255)


class TokenSpans(HTMLParser):
    """Collects ``<span class="tok">`` elements: (text, style dict, title); checks nesting."""

    VOID = {"meta", "br", "link", "img", "hr", "input"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.spans: list[dict] = []
        self.stack: list[str] = []
        self.title = ""
        self._current = None

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)
        a = dict(attrs)
        if tag == "span" and a.get("class") == "tok":
            style = dict(kv.split(":", 1) for kv in a["style"].split(";") if kv.strip())
            self._current = {"text": "", "title": a.get("title"),
                             "style": {k.strip(): v.strip() for k, v in style.items()}}

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (self.stack, tag)
        self.stack.pop()
        if tag == "span" and self._current is not None:
            self.spans.append(self._current)
            self._current = None

    def handle_data(self, data):
        if self._current is not None:
            self._current["text"] += data
        if self.stack and self.stack[-1] == "title":
            self.title += data


def parse(doc: str) -> TokenSpans:
    p = TokenSpans()
    p.feed(doc)
    p.close()
    assert p.stack == [], f"unclosed tags: {p.stack}"
    return p


def hex_rgb(s: str) -> tuple[int, int, int]:
    assert re.fullmatch(r"#[0-9a-f]{6}", s), s
    return tuple(int(s[i:i + 2], 16) for i in (1, 3, 5))


# ------------------------------------------------------------------------------------ HTML


def test_tokens_html_is_valid_escaped_and_written(tmp_path):
    tokens = ["<b>", "a&b", '"q"', "plain"]
    doc = viz.tokens_html(tokens, torch.tensor([1.0, -0.5, 0.0, 0.25]), tmp_path / "t.html",
                          title="x < y")
    assert doc.startswith("<!DOCTYPE html>")
    assert (tmp_path / "t.html").read_text(encoding="utf-8") == doc
    parsed = parse(doc)
    assert [s["text"] for s in parsed.spans] == tokens  # escaped in the source, intact parsed
    assert "<b>" not in doc and "&lt;b&gt;" in doc and "a&amp;b" in doc
    assert parsed.title == "x < y"
    assert "legend" in doc


def test_tokens_html_colours_follow_sign_and_normalisation():
    rel = np.array([2.0, -1.0, 0.0, 0.5, -2.0, 1.0])
    doc = viz.tokens_html([f"t{i}" for i in range(6)], rel)
    got = [hex_rgb(s["style"]["background-color"]) for s in parse(doc).spans]
    assert got == [bwr(v, 2.0) for v in rel]
    assert got[0] == RED and got[4] == BLUE and got[2] == WHITE
    assert got[1] == (128, 128, 255)  # half of max |R|, negative: half-way to blue
    # scaling all relevance leaves the colours; a larger peak elsewhere pales them
    assert [hex_rgb(s["style"]["background-color"])
            for s in parse(viz.tokens_html([f"t{i}" for i in range(6)], 10 * rel)).spans] == got
    # the hover title carries the value
    assert [float(s["title"]) for s in parse(doc).spans] == pytest.approx(rel, rel=1e-3)


def test_tokens_html_rows_share_one_normalisation():
    rows = [["a", "b"], ["c", "d", "e"]]
    rels = [torch.tensor([1.0, -1.0]), torch.tensor([4.0, 0.0, -2.0])]
    doc = viz.tokens_html(rows, rels, labels=["first", "second"])
    spans = parse(doc).spans
    assert [s["text"] for s in spans] == ["a", "b", "c", "d", "e"]
    assert [hex_rgb(s["style"]["background-color"]) for s in spans] == [
        bwr(v, 4.0) for v in (1.0, -1.0, 4.0, 0.0, -2.0)]
    assert "first" in doc and "second" in doc


def test_tokens_html_all_zero_is_white_and_batch_of_one_accepted():
    spans = parse(viz.tokens_html(["a", "b"], torch.zeros(1, 2))).spans
    assert [hex_rgb(s["style"]["background-color"]) for s in spans] == [WHITE, WHITE]


def test_tokens_html_text_stays_readable():
    spans = parse(viz.tokens_html(["hi", "lo", "mid"], [1.0, -1.0, 0.0])).spans
    text = [hex_rgb(s["style"]["color"]) for s in spans]
    assert text[0] == WHITE and text[1] == WHITE and text[2] == (0, 0, 0)


def test_tokens_errors():
    with pytest.raises(ValueError, match="one value per token"):
        viz.tokens_html(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        viz.tokens_terminal(["a"], [float("nan")])
    with pytest.raises(ValueError, match="rows"):
        viz.tokens_html([["a"], ["b"]], [[1.0]])
    with pytest.raises(ValueError, match="colour map"):
        viz.tokens_html(["a"], [1.0], cmap="jet")


# -------------------------------------------------------------------------------- terminal


def test_tokens_terminal_colour(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    rel = [3.0, -1.5, 0.0]
    out = viz.tokens_terminal(["up", "down", "zero"], torch.tensor(rel))
    found = ANSI_BG.findall(out)
    assert [f[3] for f in found] == ["up", "down", "zero"]
    assert [tuple(int(c) for c in f[:3]) for f in found] == [bwr(v, 3.0) for v in rel]
    assert ANSI_BG.sub("", out).strip() == ""  # nothing but the coloured tokens and spaces
    assert "\n" not in out


def test_tokens_terminal_plain_with_no_color_or_argument(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    out = viz.tokens_terminal(["a", "b"], [0.5, -0.25])
    assert "\x1b" not in out
    pairs = re.findall(r"(\S+)\(([-+][0-9.e+-]+)\)", out)
    assert [(t, float(v)) for t, v in pairs] == [("a", 0.5), ("b", -0.25)]
    monkeypatch.delenv("NO_COLOR")
    assert viz.tokens_terminal(["a", "b"], [0.5, -0.25], color=False) == out
    assert "\x1b[48;2;" in viz.tokens_terminal(["a"], [1.0])
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[48;2;" in viz.tokens_terminal(["a"], [1.0], color=True)


def test_tokens_terminal_rows_and_no_injected_escapes():
    out = viz.tokens_terminal([["a", "b"], ["\x1b[2Jc"]], [[1.0, -1.0], [2.0]], color=True)
    lines = out.split("\n")
    assert len(lines) == 2
    bgs = [tuple(int(c) for c in f[:3]) for f in ANSI_BG.findall(out)]
    assert bgs == [bwr(v, 2.0) for v in (1.0, -1.0, 2.0)]  # one scale for both rows
    assert "\x1b[2J" not in out


# ------------------------------------------------------------------------------------ grid


def test_grid_size_layout_and_png(tmp_path):
    PIL = pytest.importorskip("PIL")
    from PIL import Image
    rels = [torch.randn(3, 8, 6) for _ in range(5)]
    img = viz.grid(rels, tmp_path / "g.png", ncols=3, scale=2, pad=2)
    # 3 columns of 12 px, 2 rows of 16 px, 2 px padding around and between
    w, h = 3 * 12 + 4 * 2, 2 * 16 + 3 * 2
    assert img.size == (w, h) and img.mode == "RGB"
    with Image.open(tmp_path / "g.png") as png:
        assert png.format == "PNG" and png.size == (w, h)
    assert img.getpixel((0, 0)) == BACKGROUND
    # the empty sixth cell stays background
    assert img.getpixel((2 + 2 * 14 + 5, 2 + 18 + 5)) == BACKGROUND
    # cell 4 (row 1, column 1): its own normalisation, independent closed form per pixel
    r = rels[4].double().sum(0)
    peak = float(r.abs().max())
    y0, x0 = 2 + 18, 2 + 14
    for y, x in [(0, 0), (3, 5), (7, 2)]:
        assert img.getpixel((x0 + 2 * x + 1, y0 + 2 * y + 1)) == bwr(float(r[y, x]), peak)
    assert PIL is not None


def test_grid_titles_batch_tensor_and_errors():
    pytest.importorskip("PIL")
    batch = torch.zeros(2, 1, 4, 4)
    batch[0, 0, 0, 0], batch[1, 0, 0, 0] = 1.0, -5.0
    img = viz.grid(batch, titles=["eps", "z+"], ncols=4, pad=1)
    # ncols capped at the number of maps; a title band of GRID_TITLE_HEIGHT under each row
    assert img.size == (2 * 4 + 3 * 1, 4 + viz.GRID_TITLE_HEIGHT + 2 * 1)
    assert img.getpixel((1, 1)) == RED and img.getpixel((6, 1)) == BLUE  # each its own max
    wide = viz.grid(batch, titles=["eps", "z+"], scale=8, pad=1)  # 32 px: room for a title
    assert wide.size == (2 * 32 + 3, 32 + viz.GRID_TITLE_HEIGHT + 2)
    band = [wide.getpixel((x, y)) for x in range(1, 33) for y in range(33, 33 + 14)]
    assert any(p != BACKGROUND for p in band)  # something was written under the first cell
    assert viz.grid(batch).size == (2 * 4 + 3 * 2, 4 + 2 * 2)  # no titles: no band
    with pytest.raises(ValueError, match="titles"):
        viz.grid(batch, titles=["one"])
    with pytest.raises(ValueError, match="at least one"):
        viz.grid([])
    with pytest.raises(ValueError, match="ncols"):
        viz.grid(batch, ncols=0)


def test_grid_without_pillow_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match=re.escape("pip install lrpplan[viz]")):
        viz.grid([torch.ones(2, 2)])
    assert "<span" in viz.tokens_html(["a"], [1.0])  # the token renderings need no Pillow
