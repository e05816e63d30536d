"""Image heatmaps of relevance: a signed colour map in pure numpy, PNG output through Pillow.

Relevance is summed over channels and normalised symmetrically by ``max |R|``, so zero relevance
is white, positive relevance red and negative relevance blue (``"bwr"``, the signed colour map
Zennit users know from ``zennit.image.imgify``).

Text relevance uses the same colour map: :func:`tokens_html` writes an HTML page with each
token's background coloured, :func:`tokens_terminal` renders the tokens with 24-bit ANSI
background colours (or as plain text with the numbers when ``NO_COLOR`` is set).
:func:`grid` puts several image heatmaps side by side; :func:`matrix_png` draws a matrix
(token × token) with labels on both axes; :func:`heatmap_terminal` draws them with
coloured block characters (or plain characters) for a terminal.

Only :func:`heatmap`, :func:`overlay`, :func:`grid` and :func:`matrix_png` need Pillow, an optional dependency
(``pip install lrpplan[viz]``); :func:`colorize` and the token renderings are numpy only.

>>> import torch
>>> rgb = colorize(torch.tensor([[-1.0, 0.0, 1.0]]))
>>> rgb.tolist()
[[[0, 0, 255], [255, 255, 255], [255, 0, 0]]]
"""
from __future__ import annotations

import html
import os
from typing import Any, Optional, Sequence, Union

import numpy as np

__all__ = ["COLORMAPS", "colorize", "grid", "heatmap", "heatmap_terminal", "matrix_png",
           "normalize", "overlay", "tokens_html", "tokens_terminal"]

StrPath = Union[str, "os.PathLike[str]"]

#: colour map name -> anchors ``(position in [0, 1], (r, g, b) in [0, 1])``, interpolated linearly
COLORMAPS: dict[str, tuple[tuple[float, tuple[float, float, float]], ...]] = {
    # matplotlib's bwr: blue -> white -> red
    "bwr": ((0.0, (0.0, 0.0, 1.0)), (0.5, (1.0, 1.0, 1.0)), (1.0, (1.0, 0.0, 0.0))),
    # matplotlib's seismic: dark blue -> blue -> white -> red -> dark red
    "seismic": ((0.0, (0.0, 0.0, 0.3)), (0.25, (0.0, 0.0, 1.0)), (0.5, (1.0, 1.0, 1.0)),
                (0.75, (1.0, 0.0, 0.0)), (1.0, (0.5, 0.0, 0.0))),
    # black (most negative) -> white (most positive)
    "gray": ((0.0, (0.0, 0.0, 0.0)), (1.0, (1.0, 1.0, 1.0))),
}


def _pil() -> Any:
    """Import Pillow lazily, with an error that says how to install it."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(
            "lrpplan.viz needs Pillow to make images: pip install lrpplan[viz] "
            "(or pip install pillow)") from exc
    return Image


def _numpy(x: Any) -> np.ndarray:
    """A float64 numpy copy of a tensor or array-like."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        if not x.is_floating_point():
            x = x.double()
        x = x.double().numpy()
    return np.array(x, dtype=np.float64)


def _image_relevance(relevance: Any) -> np.ndarray:
    """``[H, W]`` from ``[H, W]``, ``[C, H, W]`` or ``[1, C, H, W]`` (summed over channels)."""
    r = _numpy(relevance)
    if r.ndim == 4 and r.shape[0] == 1:
        r = r[0]
    if r.ndim == 3:
        r = r.sum(axis=0)
    if r.ndim != 2:
        raise ValueError(
            f"expected image relevance of shape [H, W], [C, H, W] or [1, C, H, W], got "
            f"{list(np.shape(relevance))}; for a batch, pass one sample (relevance[i])")
    if not np.isfinite(r).all():
        raise ValueError("relevance holds NaN or infinity")
    return r


def normalize(relevance: Any) -> np.ndarray:
    """Channel-summed relevance scaled into ``[-1, 1]`` by ``max |R|`` (all zeros stays zeros)."""
    r = _image_relevance(relevance)
    peak = float(np.abs(r).max()) if r.size else 0.0
    return r / peak if peak > 0 else np.zeros_like(r)


def colorize(relevance: Any, cmap: str = "bwr") -> np.ndarray:
    """Map relevance to ``uint8`` RGB of shape ``[H, W, 3]`` (symmetric: 0 is the map's middle).

    Parameters
    ----------
    relevance : tensor or array
        ``[H, W]``, ``[C, H, W]`` or ``[1, C, H, W]``; channels are summed.
    cmap : str
        A name in :data:`COLORMAPS` (``"bwr"``, ``"seismic"``, ``"gray"``).

    Returns
    -------
    numpy.ndarray
        ``uint8`` array ``[H, W, 3]``.
    """
    return _signed_rgb(normalize(relevance), cmap)


def _signed_rgb(normalized: np.ndarray, cmap: str) -> np.ndarray:
    """``uint8`` RGB (a trailing axis of 3) for values in ``[-1, 1]``; 0 is the map's middle."""
    if cmap not in COLORMAPS:
        raise ValueError(f"unknown colour map {cmap!r}; known: {sorted(COLORMAPS)}")
    pos = (np.asarray(normalized, dtype=np.float64) + 1.0) / 2.0  # [-1, 1] -> [0, 1]
    anchors = COLORMAPS[cmap]
    xs = np.array([a[0] for a in anchors])
    rgb = np.stack([np.interp(pos, xs, [a[1][c] for a in anchors]) for c in range(3)], axis=-1)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _upscale(rgb: np.ndarray, scale: int) -> np.ndarray:
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    return rgb.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else rgb


def heatmap(relevance: Any, path: Optional[StrPath] = None, cmap: str = "bwr",
            scale: int = 1) -> Any:
    """A heatmap image of image relevance, optionally saved as PNG.

    Parameters
    ----------
    relevance : tensor or array
        ``[H, W]``, ``[C, H, W]`` or ``[1, C, H, W]``; channels are summed and the result is
        normalised by ``max |R|``: white is zero, red positive, blue negative (``"bwr"``).
    path : str or os.PathLike, optional
        Where to save the image (PNG).
    cmap : str
        A name in :data:`COLORMAPS`.
    scale : int
        Integer nearest-neighbour upscaling factor (small inputs such as 32×32 are hard to see).

    Returns
    -------
    PIL.Image.Image
        An RGB image of size ``(W * scale, H * scale)``.

    Raises
    ------
    ImportError
        If Pillow is not installed (``pip install lrpplan[viz]``).
    """
    Image = _pil()
    img = Image.fromarray(_upscale(colorize(relevance, cmap), scale))
    if path is not None:
        img.save(os.fspath(path), format="PNG")
    return img


def _image_rgb(image: Any) -> np.ndarray:
    """An input image as float RGB in ``[0, 1]``, shape ``[H, W, 3]``."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    was_uint8 = str(getattr(image, "dtype", "")) in ("uint8", "torch.uint8")
    a = _numpy(image)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)  # [C, H, W] -> [H, W, C]
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"expected an image [H, W], [H, W, C] or [C, H, W] with 1 or 3 "
                         f"channels, got {list(np.shape(image))}")
    if was_uint8:
        a = a / 255.0
    else:  # float input (e.g. normalised for a model): min-max to [0, 1]
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return a


def overlay(image: Any, relevance: Any, path: Optional[StrPath] = None, cmap: str = "bwr",
            alpha: float = 0.7, scale: int = 1) -> Any:
    """Blend a relevance heatmap over the input image.

    Each pixel mixes ``(1 - a) * image + a * colour`` with ``a = alpha * |R| / max |R|``, so
    pixels without relevance show the image unchanged.

    Parameters
    ----------
    image : PIL image, tensor or array
        ``[C, H, W]``, ``[H, W, C]`` or ``[H, W]`` (a leading batch of 1 is dropped). ``uint8``
        and PIL images are taken as 0..255; float images are min-max scaled to ``[0, 1]``.
    relevance : tensor or array
        Image relevance of the same height and width (see :func:`heatmap`).
    path, cmap, scale :
        As for :func:`heatmap`.
    alpha : float
        Opacity of the heatmap where ``|R|`` is largest.

    Returns
    -------
    PIL.Image.Image
    """
    Image = _pil()
    base = _image_rgb(image)
    colour = colorize(relevance, cmap).astype(np.float64) / 255.0
    if base.shape[:2] != colour.shape[:2]:
        raise ValueError(f"image is {base.shape[0]}x{base.shape[1]} but relevance is "
                         f"{colour.shape[0]}x{colour.shape[1]}")
    a = float(alpha) * np.abs(normalize(relevance))[..., None]
    mixed = (1.0 - a) * base + a * colour
    rgb = np.clip(np.rint(mixed * 255.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(_upscale(rgb, scale))
    if path is not None:
        img.save(os.fspath(path), format="PNG")
    return img


# ------------------------------------------------------------------------------------- grid

#: background of :func:`grid` between the cells (light grey: white already means "no relevance")
GRID_BACKGROUND = (224, 224, 224)
#: height in pixels of the title band under each cell of :func:`grid` (when titles are given)
GRID_TITLE_HEIGHT = 14


def grid(relevances: Any, path: Optional[StrPath] = None,
         titles: Optional[Sequence[str]] = None, ncols: int = 4, cmap: str = "bwr",
         scale: int = 1, pad: int = 2) -> Any:
    """Several image heatmaps in one picture, row by row, each normalised by its own ``max |R|``.

    Parameters
    ----------
    relevances : sequence of tensors or arrays, or a tensor
        Image relevances as for :func:`heatmap` (``[H, W]``, ``[C, H, W]``); a tensor's first
        dimension indexes the explanations (``[N, C, H, W]`` or ``[N, H, W]``). Cells of
        different sizes are placed at the top left of a cell as large as the largest.
    path : str or os.PathLike, optional
        Where to save the picture (PNG).
    titles : sequence of str, optional
        One caption per heatmap, drawn under it in a band :data:`GRID_TITLE_HEIGHT` pixels high
        (clipped to the cell width).
    ncols : int
        Heatmaps per row (fewer when there are fewer heatmaps).
    cmap, scale :
        As for :func:`heatmap`; ``scale`` upscales every heatmap.
    pad : int
        Pixels of :data:`GRID_BACKGROUND` around and between the cells.

    Returns
    -------
    PIL.Image.Image
        An RGB image of width ``c * w + (c + 1) * pad`` and height
        ``r * (h + t) + (r + 1) * pad``, where ``c = min(ncols, N)``, ``r = ceil(N / c)``,
        ``h, w`` the largest upscaled heatmap and ``t`` the title band (0 without titles).

    Raises
    ------
    ImportError
        If Pillow is not installed (``pip install lrpplan[viz]``).
    ValueError
        If there are no heatmaps, ``ncols`` or ``pad`` is out of range, or ``titles`` has
        another length.
    """
    Image = _pil()
    cells = [_upscale(colorize(r, cmap), scale) for r in relevances]
    _check_grid_args(len(cells), titles, ncols, pad)
    cols = min(int(ncols), len(cells))
    rows = -(-len(cells) // cols)
    cell_h = max(c.shape[0] for c in cells)
    cell_w = max(c.shape[1] for c in cells)
    band = GRID_TITLE_HEIGHT if titles is not None else 0
    canvas = np.empty((rows * (cell_h + band) + (rows + 1) * pad,
                       cols * cell_w + (cols + 1) * pad, 3), dtype=np.uint8)
    canvas[...] = GRID_BACKGROUND
    for i, cell in enumerate(cells):
        y, x = _grid_origin(i, cols, cell_h + band, cell_w, pad)
        canvas[y:y + cell.shape[0], x:x + cell.shape[1]] = cell
    img = Image.fromarray(canvas)
    if titles is not None:
        _draw_titles(img, titles, cols, cell_h, cell_w, band, pad)
    if path is not None:
        img.save(os.fspath(path), format="PNG")
    return img


def _check_grid_args(n: int, titles: Optional[Sequence[str]], ncols: int, pad: int) -> None:
    if n == 0:
        raise ValueError("grid needs at least one heatmap")
    if int(ncols) < 1:
        raise ValueError(f"ncols must be a positive integer, got {ncols}")
    if int(pad) < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if titles is not None and len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} heatmaps")


def _grid_origin(i: int, cols: int, cell_h: int, cell_w: int, pad: int) -> tuple[int, int]:
    """Top-left pixel ``(y, x)`` of cell ``i`` (cells filled row by row)."""
    r, c = divmod(i, cols)
    return pad + r * (cell_h + pad), pad + c * (cell_w + pad)


def _draw_titles(img: Any, titles: Sequence[str], cols: int, cell_h: int, cell_w: int,
                 band: int, pad: int) -> None:
    """Write each title in the band under its cell, clipped to the cell width."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    for i, title in enumerate(titles):
        y, x = _grid_origin(i, cols, cell_h + band, cell_w, pad)
        text = str(title)
        while text and draw.textlength(text) > cell_w:
            text = text[:-1]
        draw.text((x, y + cell_h + 1), text, fill=(0, 0, 0))


# ----------------------------------------------------------------------------------- tokens


def _token_rows(tokens: Sequence[Any], relevance: Any) -> tuple[list[list[str]], list[np.ndarray]]:
    """Tokens and relevance as rows: one sequence of str (``[T]`` relevance, a leading 1 is
    dropped) or several sequences (a list of ``[T_i]`` or a ``[N, T]`` tensor)."""
    if len(tokens) and not isinstance(tokens[0], str):
        rows = [[str(t) for t in row] for row in tokens]
        rels = [_numpy(r) for r in relevance]
    else:
        rows = [[str(t) for t in tokens]]
        r = _numpy(relevance)
        rels = [r[0] if r.ndim == 2 and r.shape[0] == 1 else r]
    if len(rels) != len(rows):
        raise ValueError(f"{len(rows)} rows of tokens but {len(rels)} rows of relevance")
    for toks, rel in zip(rows, rels):
        if rel.ndim != 1 or rel.shape[0] != len(toks):
            raise ValueError(f"{len(toks)} tokens but relevance of shape {list(rel.shape)}; "
                             "expected one value per token")
        if not np.isfinite(rel).all():
            raise ValueError("relevance holds NaN or infinity")
    return rows, rels


def _peak(rels: Sequence[np.ndarray]) -> float:
    """``max |R|`` over all rows (one normalisation for everything shown together)."""
    return max((float(np.abs(r).max()) for r in rels if r.size), default=0.0)


def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def _text_rgb(background: Sequence[int]) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones (relative luminance below 0.5)."""
    r, g, b = (int(c) / 255.0 for c in background)
    return (255, 255, 255) if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5 else (0, 0, 0)


_HTML_STYLE = """body { font-family: sans-serif; margin: 2em; line-height: 2.2; }
.row { margin: 0.4em 0; }
.label { color: #555; margin-right: 0.6em; }
.tok { padding: 0.15em 0.2em; border-radius: 3px; white-space: pre-wrap; }
.legend { margin-top: 1.5em; font-size: 0.9em; line-height: 1.4; }
.bar { display: inline-block; width: 16em; height: 1em; vertical-align: middle;
       margin: 0 0.5em; border: 1px solid #999; }"""


def tokens_html(tokens: Sequence[Any], relevance: Any, path: Optional[StrPath] = None,
                title: Optional[str] = None, cmap: str = "bwr",
                labels: Optional[Sequence[str]] = None) -> str:
    """An HTML page with each token's background coloured by its relevance.

    Relevance is normalised symmetrically by ``max |R|`` over everything shown, so with
    ``"bwr"`` zero is white, positive relevance red and negative relevance blue, as in
    :func:`heatmap`. Each token shows its value on hover; a legend gives the scale.

    Parameters
    ----------
    tokens : sequence of str, or sequence of sequences of str
        One row of tokens (e.g. ``tokenizer.convert_ids_to_tokens(ids)``), or several rows
        (several sentences) that share one normalisation. Tokens are HTML-escaped.
    relevance : tensor, array or sequence
        One value per token: ``[T]`` (or ``[1, T]``) for one row, a sequence of ``[T_i]`` (or an
        ``[N, T]`` tensor) for several rows.
    path : str or os.PathLike, optional
        Where to write the page (UTF-8).
    title : str, optional
        Page title and heading.
    cmap : str
        A name in :data:`COLORMAPS`.
    labels : sequence of str, optional
        A label in front of each row.

    Returns
    -------
    str
        The HTML document.

    Raises
    ------
    ValueError
        If the number of values does not match the tokens, or relevance is not finite.
    """
    rows, rels = _token_rows(tokens, relevance)
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
    peak = _peak(rels)
    body = [_html_row(toks, rel, peak, cmap, None if labels is None else labels[i])
            for i, (toks, rel) in enumerate(zip(rows, rels))]
    heading = html.escape(title if title is not None else "Token relevance")
    doc = "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{heading}</title>", f"<style>\n{_HTML_STYLE}\n</style>", "</head>", "<body>",
        f"<h1>{heading}</h1>", *body, _html_legend(peak, cmap), "</body>", "</html>", ""])
    if path is not None:
        with open(os.fspath(path), "w", encoding="utf-8") as f:
            f.write(doc)
    return doc


def _html_row(tokens: list[str], rel: np.ndarray, peak: float, cmap: str,
              label: Optional[str]) -> str:
    colours = _signed_rgb(rel / peak if peak > 0 else np.zeros_like(rel), cmap)
    spans = []
    for tok, value, bg in zip(tokens, rel, colours):
        style = f"background-color: {_hex(bg)}; color: {_hex(_text_rgb(bg))}"
        spans.append(f'<span class="tok" style="{style}" title="{value:+.4g}" '
                     f'data-relevance="{value:.8g}">{html.escape(tok)}</span>')
    head = f'<span class="label">{html.escape(label)}</span>' if label is not None else ""
    return f'<div class="row">{head}{" ".join(spans)}</div>'


def _html_legend(peak: float, cmap: str) -> str:
    stops = ", ".join(f"{_hex(_signed_rgb(np.array(a[0] * 2 - 1), cmap))} {a[0] * 100:g}%"
                      for a in COLORMAPS[cmap])
    return (f'<div class="legend">{-peak:+.3g}<span class="bar" style="background: '
            f'linear-gradient(to right, {stops})"></span>{peak:+.3g}'
            f"<br>colour: relevance / max |R| (max |R| = {peak:.4g}); "
            f"red supports the explained score, blue speaks against it, white is 0</div>")


def tokens_terminal(tokens: Sequence[Any], relevance: Any, color: Optional[bool] = None,
                    cmap: str = "bwr") -> str:
    """Tokens with 24-bit ANSI background colours by relevance, or plain text with the numbers.

    Parameters
    ----------
    tokens, relevance :
        As for :func:`tokens_html` (one row, or several rows on separate lines).
    color : bool, optional
        ``True`` colours, ``False`` writes plain ``token(+0.123)`` text; ``None`` colours unless
        the ``NO_COLOR`` environment variable is set to a non-empty value (https://no-color.org).
    cmap : str
        A name in :data:`COLORMAPS`.

    Returns
    -------
    str
        One line per row, tokens separated by spaces; coloured tokens end with a reset
        (``ESC[0m``).
    """
    rows, rels = _token_rows(tokens, relevance)
    if color is None:
        color = not os.environ.get("NO_COLOR")
    peak = _peak(rels)
    lines = []
    for toks, rel in zip(rows, rels):
        if not color:
            lines.append(" ".join(f"{t}({v:+.3g})" for t, v in zip(toks, rel)))
            continue
        colours = _signed_rgb(rel / peak if peak > 0 else np.zeros_like(rel), cmap)
        lines.append(" ".join(_ansi(t, bg) for t, bg in zip(toks, colours)))
    return "\n".join(lines)


def _ansi(token: str, bg: Sequence[int]) -> str:
    fg = _text_rgb(bg)
    return ("\x1b[48;2;{};{};{}m\x1b[38;2;{};{};{}m".format(*(int(c) for c in bg), *fg)
            + token.replace("\x1b", "\\x1b") + "\x1b[0m")  # no escape sequences from tokens


# --------------------------------------------------------------------------------- terminal

#: plain characters for signed values: strongly negative, negative, about zero, positive,
#: strongly positive (``|v| < 0.1`` of the map's ``max |R|`` is "about zero", ``>= 0.4`` "strongly")
SIGNED_CHARS = "=- +#"
#: plain characters for unsigned values in [0, 1], darkest to brightest
UNSIGNED_CHARS = " .:-=+*#%@"


def heatmap_terminal(maps: Any, titles: Optional[Sequence[str]] = None,
                     color: Optional[bool] = None, cmap: str = "bwr", signed: bool = True,
                     columns: int = 80, gap: int = 2) -> str:
    """Several small heatmaps side by side as terminal text, wrapped at ``columns``.

    In colour each pixel is one half-block character (``▀``): its 24-bit ANSI foreground is the
    upper pixel, its background the lower one, so an ``H×W`` map takes ``ceil(H/2)`` lines of
    ``W`` characters and pixels stay square. Without colour each pixel is one character of
    :data:`SIGNED_CHARS` (``=`` strongly negative, ``-``, blank about zero, ``+``, ``#`` strongly
    positive)
    or, with ``signed=False``, of :data:`UNSIGNED_CHARS` (dark to bright), one line per row.

    Parameters
    ----------
    maps : sequence of tensors or arrays, or a tensor
        Image relevances as for :func:`heatmap` (``[H, W]``, ``[C, H, W]``; a tensor's first
        dimension indexes the maps). Each is normalised by its own ``max |R|``.
    titles : sequence of str, optional
        A caption above each map (clipped to the map's width).
    color : bool, optional
        ``None``: colour unless ``NO_COLOR`` is set to a non-empty value.
    cmap : str
        A name in :data:`COLORMAPS`.
    signed : bool
        ``True``: values in ``[-1, 1]``, zero in the middle of the map (relevance). ``False``:
        values in ``[0, 1]`` by ``max``, 0 at the map's start (an input image with ``"gray"``).
    columns : int
        Wrap to a new band of maps when the next would pass this width.
    gap : int
        Spaces between maps.

    Returns
    -------
    str
        The text, lines separated by ``\\n``; coloured lines end with a reset (``ESC[0m``).
    """
    cells = [_image_relevance(m) for m in maps]
    if not cells:
        raise ValueError("heatmap_terminal needs at least one map")
    if titles is not None and len(titles) != len(cells):
        raise ValueError(f"{len(titles)} titles for {len(cells)} maps")
    if color is None:
        color = not os.environ.get("NO_COLOR")
    blocks = [_terminal_block(c, bool(color), cmap, signed) for c in cells]
    width = max(c.shape[1] for c in cells)
    per_band = max(1, (int(columns) + gap) // (width + gap))
    lines: list[str] = []
    for start in range(0, len(blocks), per_band):
        band = blocks[start:start + per_band]
        if titles is not None:
            heads = [str(t)[:width].ljust(width) for t in titles[start:start + per_band]]
            lines.append((" " * gap).join(heads).rstrip())
        height = max(len(b) for b in band)
        for row in range(height):
            parts = [b[row] if row < len(b) else " " * width for b in band]
            lines.append((" " * gap).join(parts))
    return "\n".join(lines)


def _terminal_block(r: np.ndarray, color: bool, cmap: str, signed: bool) -> list[str]:
    """One map as lines of equal visible width ``W``."""
    if signed:
        peak = float(np.abs(r).max()) if r.size else 0.0
        v = r / peak if peak > 0 else np.zeros_like(r)
    else:
        lo, hi = float(r.min()), float(r.max())
        v = (r - lo) / (hi - lo) if hi > lo else np.zeros_like(r)
        v = v * 2.0 - 1.0  # [0, 1] -> [-1, 1]: the start of the colour map is the minimum
    if not color:
        if signed:
            level = np.where(np.abs(v) < 0.1, 0, np.where(np.abs(v) < 0.4, 1, 2))
            idx, chars = 2 + np.sign(v).astype(int) * level, SIGNED_CHARS
        else:
            chars = UNSIGNED_CHARS
            idx = np.clip(np.rint((v + 1.0) / 2.0 * (len(chars) - 1)), 0, len(chars) - 1)
        return ["".join(chars[int(i)] for i in row) for row in idx]
    rgb = _signed_rgb(v, cmap)
    out = []
    for top in range(0, rgb.shape[0], 2):
        line = []
        for x in range(rgb.shape[1]):
            up = rgb[top, x]
            if top + 1 < rgb.shape[0]:
                dn = rgb[top + 1, x]
                line.append("\x1b[38;2;{};{};{}m\x1b[48;2;{};{};{}m\u2580".format(*up, *dn))
            else:
                line.append("\x1b[0m\x1b[38;2;{};{};{}m\u2580".format(*up))
        out.append("".join(line) + "\x1b[0m")
    return out


def short_label(token: str, n: int = 12) -> str:
    """A token as a short axis label (sub-word space markers shown as spaces, at most ``n``
    characters)."""
    token = token.replace("\u0120", " ").replace("\u2581", " ").replace("\n", "\\n")
    return token if len(token) <= n else token[:n - 1] + "\u2026"


def matrix_png(matrix: Any, rows: Sequence[str], columns: Sequence[str],
               path: Optional[StrPath] = None, cmap: str = "bwr", cell: int = 22) -> Any:
    """A signed heatmap of a ``[R, C]`` matrix with ``rows`` down the left and ``columns`` along
    the top (rotated), normalised by ``max |m|``. Returns the PIL image; saves it to ``path``."""
    Image = _pil()
    from PIL import ImageDraw

    m = _numpy(matrix)
    if m.ndim != 2 or m.shape != (len(rows), len(columns)):
        raise ValueError(f"a {m.shape} matrix needs {m.shape[0] if m.ndim == 2 else '?'} row and "
                         f"column labels, got {len(rows)} and {len(columns)}")
    peak = float(np.abs(m).max()) if m.size else 0.0
    rgb = _signed_rgb(m / peak if peak > 0 else m * 0, cmap)
    left = 8 * max(len(short_label(t)) for t in rows) + 12 if len(rows) else 12
    top = 8 * max(len(short_label(t)) for t in columns) + 12 if len(columns) else 12
    img = Image.new("RGB", (left + cell * m.shape[1] + 4, top + cell * m.shape[0] + 4), "white")
    draw = ImageDraw.Draw(img)
    for k, label in enumerate(rows):
        draw.text((4, top + k * cell + cell // 4), short_label(label), fill="black")
    for j, label in enumerate(columns):
        lab = Image.new("RGB", (top, cell), "white")
        ImageDraw.Draw(lab).text((4, cell // 4), short_label(label), fill="black")
        img.paste(lab.rotate(90, expand=True), (left + j * cell, 0))
    for k in range(m.shape[0]):
        for j in range(m.shape[1]):
            x0, y0 = left + j * cell, top + k * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1],
                           fill=tuple(int(c) for c in rgb[k, j]), outline=(220, 220, 220))
    if path is not None:
        img.save(os.fspath(path))
    return img
