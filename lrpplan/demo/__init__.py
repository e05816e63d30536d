"""The model and digits of ``lrpplan demo``: a small CNN trained on scikit-learn's 8×8 digits.

Everything ships in ``digits.npz`` next to this file (about 0.1 MB), read with
``numpy.load(..., allow_pickle=False)``: no pickle, no ``torch.load``, no scikit-learn and no
download at run time. ``benchmarks/train_demo_digits.py`` writes the file reproducibly (fixed
seed) and records the test accuracy in it.

Arrays in ``digits.npz``:

- ``param.<name>``: float32 weights by ``state_dict`` name of :func:`make_model`;
- ``test_images``: uint8 ``[450, 8, 8]``, the held-out split of ``load_digits`` (intensities
  0..16, the model sees them divided by 16);
- ``test_labels``: int64 ``[450]``, their true digits; ``test_predicted``: int64 ``[450]``,
  what the exported model predicted at export time;
- ``shown``: int64 indices into the test images that ``lrpplan demo`` explains (correctly
  classified digits first, then misclassified ones);
- ``meta``: a JSON string (seed, epochs, test accuracy, torch version of the export).

>>> model, digits = load()
>>> digits.images.shape, digits.images.dtype
(torch.Size([450, 1, 8, 8]), torch.float32)
>>> float(digits.accuracy_recorded) > 0.9
True
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DATA_FILE", "DemoDigits", "INK", "figure", "figure_size", "load", "make_model",
           "stroke_share"]

#: the shipped weights and images
DATA_FILE = Path(__file__).with_name("digits.npz")
#: the raw intensity range of ``load_digits`` (0..16); the model sees ``x / INTENSITY_MAX``
INTENSITY_MAX = 16.0
#: a pixel is on a stroke when its scaled intensity exceeds this
INK = 0.5


def make_model() -> Any:
    """The untrained demo CNN, for ``[N, 1, 8, 8]`` inputs in ``[0, 1]``: logits of 10 digits.

    conv(1→16, 3×3) → ReLU → conv(16→32, 3×3) → ReLU → max-pool 2 → flatten →
    linear(512→64) → ReLU → linear(64→10), as ``benchmarks/digits.py`` builds it.
    """
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


@dataclass(frozen=True)
class DemoDigits:
    """The shipped held-out digits.

    Attributes
    ----------
    images : torch.Tensor
        ``[450, 1, 8, 8]`` float32 in ``[0, 1]``.
    labels : torch.Tensor
        ``[450]`` int64, the true digits.
    predicted : torch.Tensor
        ``[450]`` int64, the exported model's predictions, recorded at export time.
    shown : torch.Tensor
        Indices of the digits the demo explains (correct ones first, then misclassified ones).
    meta : dict
        Seed, epochs, ``test_accuracy`` and the torch version of the export.
    """

    images: Any
    labels: Any
    predicted: Any
    shown: Any
    meta: dict

    @property
    def accuracy_recorded(self) -> float:
        """The test accuracy recorded at export time (on all 450 held-out digits)."""
        return float(self.meta["test_accuracy"])


def load(path: Any = None) -> tuple[Any, DemoDigits]:
    """The trained demo CNN (eval mode) and the shipped digits, from ``digits.npz``.

    Parameters
    ----------
    path : str or os.PathLike, optional
        Another file of the same format (default: :data:`DATA_FILE`).

    Returns
    -------
    (torch.nn.Module, DemoDigits)
    """
    import torch

    with np.load(DATA_FILE if path is None else path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    model = make_model()
    state = {name[len("param."):]: torch.from_numpy(a.astype(np.float32))
             for name, a in arrays.items() if name.startswith("param.")}
    model.load_state_dict(state, strict=True)
    images = torch.from_numpy(arrays["test_images"].astype(np.float32) / INTENSITY_MAX)
    digits = DemoDigits(
        images=images.unsqueeze(1),
        labels=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        predicted=torch.from_numpy(arrays["test_predicted"].astype(np.int64)),
        shown=torch.from_numpy(arrays["shown"].astype(np.int64)),
        meta=json.loads(str(arrays["meta"])),
    )
    return model.eval(), digits


def stroke_share(relevance: Any, images: Any, ink: float = INK) -> Any:
    """Per sample, the share of positive relevance that lies on stroke pixels (``x > ink``).

    Parameters
    ----------
    relevance, images : torch.Tensor
        ``[N, 1, H, W]`` (or ``[N, H, W]``) each.
    ink : float
        The intensity above which a pixel counts as a stroke.

    Returns
    -------
    torch.Tensor
        ``[N]`` values in ``[0, 1]`` (0 where a sample has no positive relevance).
    """
    pos = relevance.detach().reshape(relevance.shape[0], -1).clamp(min=0)
    on = (images.reshape(images.shape[0], -1) > ink).to(pos.dtype)
    total = pos.sum(1)
    return (pos * on).sum(1) / total.clamp(min=1e-30) * (total > 0)


#: pixels per digit pixel in :func:`figure` (8×8 digits become 96×96 cells)
FIGURE_SCALE = 12
#: layout of :func:`figure`: the row-label column, the title band, the legend band, the padding
FIGURE_LABEL_W, FIGURE_TITLE_H, FIGURE_LEGEND_H, FIGURE_PAD = 76, 16, 18, 4
_BACKGROUND = (255, 255, 255)
_GRID = (200, 200, 200)


def figure_size(n: int, rows: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of :func:`figure` for ``n`` digits and ``rows`` heatmap rows
    (plus the input row)."""
    cell = 8 * FIGURE_SCALE
    width = FIGURE_LABEL_W + n * (cell + FIGURE_PAD) + FIGURE_PAD
    height = FIGURE_TITLE_H + (rows + 1) * (cell + FIGURE_PAD) + FIGURE_PAD + FIGURE_LEGEND_H
    return width, height


def figure(images: Any, heatmaps: dict, titles: Any, wrong: Any, path: Any) -> Any:
    """One PNG: a column per digit, rows input then one heatmap per entry of ``heatmaps``.

    Parameters
    ----------
    images : torch.Tensor
        ``[N, 1, 8, 8]`` in ``[0, 1]`` (black 0, white 1).
    heatmaps : dict
        Row label -> relevance ``[N, 1, 8, 8]``; each heatmap is scaled by its own ``max |R|``
        (white 0, red positive, blue negative).
    titles : sequence of str
        One caption per digit, above its column.
    wrong : sequence of bool
        Digits whose caption is drawn in red (misclassified).
    path : str or os.PathLike
        Where to save the PNG.

    Returns
    -------
    PIL.Image.Image
        Of size :func:`figure_size` ``(N, len(heatmaps))``.
    """
    from PIL import ImageDraw

    from ..viz import _pil, colorize

    Image = _pil()
    n = len(images)
    cell = 8 * FIGURE_SCALE
    width, height = figure_size(n, len(heatmaps))
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[...] = _BACKGROUND
    rows = [("input", [np.stack([np.clip(np.rint(im[0].numpy() * 255), 0, 255)
                                 .astype(np.uint8)] * 3, axis=-1) for im in images])]
    rows += [(label, [colorize(r) for r in rel]) for label, rel in heatmaps.items()]
    for i, (_, cells) in enumerate(rows):
        y = FIGURE_TITLE_H + FIGURE_PAD + i * (cell + FIGURE_PAD)
        for j, c in enumerate(cells):
            x = FIGURE_LABEL_W + FIGURE_PAD + j * (cell + FIGURE_PAD)
            canvas[y - 1:y + cell + 1, x - 1:x + cell + 1] = _GRID  # a thin frame
            canvas[y:y + cell, x:x + cell] = c.repeat(FIGURE_SCALE, 0).repeat(FIGURE_SCALE, 1)
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for j, (title, bad) in enumerate(zip(titles, wrong)):
        x = FIGURE_LABEL_W + FIGURE_PAD + j * (cell + FIGURE_PAD)
        draw.text((x + 2, 2), str(title), fill=(200, 0, 0) if bad else (0, 0, 0))
    for i, (label, _) in enumerate(rows):
        y = FIGURE_TITLE_H + FIGURE_PAD + i * (cell + FIGURE_PAD) + cell // 2 - 6
        draw.text((4, y), label, fill=(0, 0, 0))
    draw.text((4, height - FIGURE_LEGEND_H + 3),
              "LRP of the predicted class: red = evidence for it, blue = against it, white = 0 "
              "(each heatmap scaled by its own max |R|); red captions: misclassified",
              fill=(60, 60, 60))
    img.save(str(path), format="PNG")
    return img
