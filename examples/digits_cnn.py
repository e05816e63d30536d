"""Train a small CNN on scikit-learn's 8×8 digits, explain test digits with two presets, and save
a heatmap grid.

Run from anywhere (needs scikit-learn and Pillow; about 10-20 s on 2 CPU cores)::

    python examples/digits_cnn.py [output.png]

The grid (default ``digits-heatmaps.png`` in the current directory) has three rows of 8 test
digits: the input (black = 0, white = 1), then the relevance of the predicted class under the
``epsilon`` preset and under ``epsilon-gamma-box`` (z-box bounds low/high = the data's min/max).
Red is positive relevance, blue negative, white zero; each heatmap is scaled by its own max |R|.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import lrpplan
from lrpplan import viz

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import digits  # noqa: E402  (benchmarks/digits.py: data, model, training)

#: plans go to the repository's cache/ directory unless LRPPLAN_CACHE is set
CACHE_DIR = Path(os.environ.get("LRPPLAN_CACHE") or Path(__file__).resolve().parents[1] / "cache")

N_SHOW = 8
SCALE = 16  # 8×8 → 128×128 pixels per cell
PAD = 4


def _gray(image: torch.Tensor) -> np.ndarray:
    """A [1, 8, 8] image in [0, 1] as an upscaled RGB uint8 array."""
    g = np.clip(np.rint(image[0].numpy() * 255), 0, 255).astype(np.uint8)
    g = g.repeat(SCALE, 0).repeat(SCALE, 1)
    return np.stack([g] * 3, axis=-1)


def save_grid(rows: list[list[np.ndarray]], path: Path) -> None:
    """Paste equally sized RGB cells into one PNG (Pillow), rows top to bottom."""
    from PIL import Image

    h, w = rows[0][0].shape[:2]
    ncols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (ncols * (w + PAD) + PAD, len(rows) * (h + PAD) + PAD),
                       (128, 128, 128))
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            canvas.paste(Image.fromarray(cell), (PAD + j * (w + PAD), PAD + i * (h + PAD)))
    canvas.save(path, format="PNG")


def main(out: str = "digits-heatmaps.png") -> Path:
    t0 = time.perf_counter()
    model, data, acc = digits.trained_model(seed=0)
    print(f"trained the digits CNN in {time.perf_counter() - t0:.1f} s: "
          f"test accuracy {acc:.3f} on {len(data.y_test)} held-out images")

    x, y = data.x_test[:N_SHOW], data.y_test[:N_SHOW]
    presets = {
        "epsilon": lrpplan.RuleSet.preset("epsilon"),
        "epsilon-gamma-box": lrpplan.RuleSet.preset("epsilon-gamma-box", low=data.low,
                                                    high=data.high),
    }
    rows = [[_gray(img) for img in x]]
    for name, rules in presets.items():
        attr = lrpplan.explain(model, x, rules=rules, cache=CACHE_DIR)  # predicted class
        rel = attr.relevance.detach()
        print(f"{name:>18}: predicted {attr.target.tolist()} (labels {y.tolist()}); "
              f"ledger closes: {attr.ledger.closes()}; relevance sums "
              f"{[round(v, 2) for v in rel.sum((1, 2, 3)).tolist()]}")
        rows.append([np.asarray(viz.heatmap(r, scale=SCALE)) for r in rel])
    path = Path(out)
    save_grid(rows, path)
    print(f"saved {path} (rows: input, epsilon, epsilon-gamma-box; red +, blue -) in "
          f"{time.perf_counter() - t0:.1f} s total")
    return path


if __name__ == "__main__":
    main(*sys.argv[1:2])
