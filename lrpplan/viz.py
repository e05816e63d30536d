"""Image heatmaps of relevance: a signed colour map in pure numpy, PNG output through Pillow.

Relevance is summed over channels and normalised symmetrically by ``max |R|``, so zero relevance
is white, positive relevance red and negative relevance blue (``"bwr"``, the signed colour map
Zennit users know from ``zennit.image.imgify``).

Only :func:`heatmap` and :func:`overlay` need Pillow, an optional dependency
(``pip install lrpplan[viz]``); :func:`colorize` is numpy only.

>>> import torch
>>> rgb = colorize(torch.tensor([[-1.0, 0.0, 1.0]]))
>>> rgb.tolist()
[[[0, 0, 255], [255, 255, 255], [255, 0, 0]]]
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import numpy as np

__all__ = ["COLORMAPS", "colorize", "heatmap", "normalize", "overlay"]

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
    if cmap not in COLORMAPS:
        raise ValueError(f"unknown colour map {cmap!r}; known: {sorted(COLORMAPS)}")
    pos = (normalize(relevance) + 1.0) / 2.0  # [-1, 1] -> [0, 1]
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
