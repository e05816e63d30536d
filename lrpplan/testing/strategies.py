"""Hypothesis strategies: random valid architectures, inputs and targets."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from hypothesis import strategies as st

from .architecture import Architecture, GeneratedModel, _random_input
from .blocks import ACTIVATIONS, Act, Attention, AvgPool, BatchNorm, Block, Conv2d, Embed, Expand, FAMILIES, GatedMLP, Gather, GroupNorm, Index, IndexSelect, InputSpec, LayerNorm, Linear, MaxPool, POOL_IMAGE, POOL_SEQUENCE, Permute, Pool, RMSNorm, Repeat, Reshape, Residual, Shape, Shared, Slice, SplitCat, Stack, Transpose, _MAX_DIM


# =============================================================================================
# strategies


def dtypes() -> st.SearchStrategy[torch.dtype]:
    """``torch.float32`` or ``torch.float64`` (shrinks towards float32)."""
    return st.sampled_from([torch.float32, torch.float64])


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n) if n % d == 0]


class _Gen:
    """State of one architecture draw: options and the draw function."""

    def __init__(self, draw: Any, bias: Optional[bool], exclude: frozenset[str],
                 activations: Sequence[str]) -> None:
        self.draw = draw
        self.bias_opt = bias
        self.exclude = exclude
        self.activations = list(activations)

    def bias(self) -> bool:
        return self.draw(st.booleans()) if self.bias_opt is None else self.bias_opt

    def allowed(self, kind: str) -> bool:
        return kind not in self.exclude

    # -- blocks --------------------------------------------------------------------------------

    def kinds(self, shape: Shape, preserving: bool, depth: int) -> list[str]:
        """Block kinds valid on ``shape`` (``preserving``: only those keeping the shape)."""
        r, d = len(shape), shape[-1]
        k: list[str] = ["Linear", "Act"]
        if d >= 2:
            k += ["LayerNorm", "RMSNorm"]
        k += ["GatedMLP", "BatchNorm"]
        if r == 3:
            k += ["Conv2d"] * 2  # family-typical blocks are drawn more often
            if self.group_counts(shape):
                k.append("GroupNorm")
        if r == 2 and d <= _MAX_DIM:
            k += ["Attention"] * 3
        if depth == 0:
            k += ["Residual", "Shared"]
        if _divisors(d):
            k += ["Reshape", "Stack"]
        if any(s >= 2 for s in shape):
            k.append("SplitCat")
        if not preserving:
            if r >= 2:
                k.append("Transpose")
            if r == 3:
                k.append("Permute")
            if any(s >= 2 for s in shape):
                k.append("Slice")
            k += ["IndexSelect", "Index", "Gather"]
            if 2 * d <= _MAX_DIM:
                k += ["Expand", "Repeat"]
            if r == 3 and min(shape[1:]) >= 2:
                k += ["MaxPool", "AvgPool"]
            if r >= 2:
                k.append("Pool")
        return [x for x in k if self.allowed(x)]

    def block(self, shape: Shape, preserving: bool = False, depth: int = 0) -> Block:
        draw = self.draw
        kind = draw(st.sampled_from(self.kinds(shape, preserving, depth)))
        r, d = len(shape), shape[-1]
        if kind == "Linear":
            out = d if preserving else draw(st.integers(1, 12))
            return Linear(d, out, self.bias())
        if kind == "Act":
            return Act(draw(st.sampled_from(self.activations)))
        if kind == "LayerNorm":
            return LayerNorm(d, self.bias())
        if kind == "RMSNorm":
            return RMSNorm(d)
        if kind == "GatedMLP":
            return GatedMLP(d, draw(st.integers(1, 12)), self.bias())
        if kind == "BatchNorm":
            layout = {1: "features", 2: "sequence", 3: "channels"}[r]
            return BatchNorm(shape[0] if r == 3 else d, layout, self.bias())
        if kind == "GroupNorm":
            return GroupNorm(draw(st.sampled_from(self.group_counts(shape))), shape[0],
                             self.bias())
        if kind == "Conv2d":
            return self.conv(shape, preserving)
        if kind == "Attention":
            heads = draw(st.sampled_from([1] + _divisors(d) + ([d] if d > 1 else [])))
            masks = ["none", "causal", "bool"] + (["float"] if self.bias_opt is not False else [])
            return Attention(d, heads, draw(st.sampled_from(["sdpa", "explicit"])),
                             draw(st.sampled_from(masks)), self.bias())
        if kind in ("Residual", "Shared"):
            n = draw(st.integers(1, 2))
            body = tuple(self.block(shape, preserving=True, depth=depth + 1) for _ in range(n))
            return Residual(body) if kind == "Residual" else Shared(body)
        if kind == "Reshape":
            a = draw(st.sampled_from(_divisors(d)))
            return Reshape(a, d // a, draw(st.sampled_from(["transpose", "permute"])))
        if kind == "Stack":
            parts = draw(st.sampled_from(_divisors(d)))
            reduce = "flatten" if preserving else draw(st.sampled_from(["flatten", "mean", "sum"]))
            return Stack(parts, reduce)
        if kind == "SplitCat":
            dims = [-i for i in range(1, r + 1) if shape[-i] >= 2]
            dim = draw(st.sampled_from(dims))
            n = shape[dim]
            how = draw(st.sampled_from(["chunk", "split"]))
            if how == "chunk":
                parts = draw(st.sampled_from([p for p in range(2, n + 1) if n % p == 0]))
            else:
                parts = draw(st.integers(2, n))
            return SplitCat(dim, parts, how, draw(st.sampled_from(self.activations)))
        if kind == "Transpose":
            return Transpose()
        if kind == "Permute":
            return Permute(draw(st.sampled_from([(0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1),
                                                 (2, 1, 0)])))
        if kind == "Slice":
            dims = [-i for i in range(1, r + 1) if shape[-i] >= 2]
            dim = draw(st.sampled_from(dims))
            n = shape[dim]
            start = draw(st.integers(0, n - 1))
            stop = draw(st.integers(start + 1, n))
            step = draw(st.sampled_from([1, 2]))
            if (start, stop, step) == (0, n, 1):  # a full slice may be elided: keep it real
                stop = n - 1
            return Slice(dim, start, stop, step)
        if kind in ("IndexSelect", "Index", "Gather"):
            index = tuple(draw(st.lists(st.integers(0, d - 1), min_size=1, max_size=8)))
            if kind == "IndexSelect":
                return IndexSelect(-1, index)
            return Index(index) if kind == "Index" else Gather(index)
        if kind in ("Expand", "Repeat"):
            n = draw(st.integers(2, max(2, _MAX_DIM // d)))
            return Expand(n) if kind == "Expand" else Repeat(n)
        if kind == "MaxPool":
            return MaxPool(2)
        if kind == "AvgPool":
            return AvgPool(2)
        if kind == "Pool":
            return Pool(draw(st.sampled_from(self.pools(shape))))
        raise AssertionError(kind)  # pragma: no cover

    @staticmethod
    def group_counts(shape: Shape) -> list[int]:
        """GroupNorm group counts for ``(C, H, W)`` normalising more than one value per group."""
        c, h, w = shape
        return [g for g in range(1, c + 1) if c % g == 0 and (c // g) * h * w >= 2]

    def pools(self, shape: Shape) -> list[str]:
        if len(shape) == 2:
            return list(POOL_SEQUENCE)
        ops = [p for p in POOL_IMAGE if p != "flatten" or math.prod(shape) <= 48]
        return ops

    def conv(self, shape: Shape, preserving: bool) -> Conv2d:
        draw = self.draw
        c, h, w = shape
        if preserving:
            k = draw(st.sampled_from([1, 3]))
            groups = draw(st.sampled_from([1] + _divisors(c) + ([c] if c > 1 else [])))
            return Conv2d(c, c, k, 1, k // 2, groups, self.bias())
        k = draw(st.integers(1, min(3, h, w)))
        stride = draw(st.integers(1, 2))
        padding = draw(st.integers(0, k // 2))
        c_out = draw(st.integers(1, 8))
        common = [g for g in range(1, c + 1) if c % g == 0 and c_out % g == 0]
        groups = draw(st.sampled_from(common))
        return Conv2d(c, c_out, k, stride, padding, groups, self.bias())

    # -- inputs ----------------------------------------------------------------------------------

    def start(self, family: str, max_inputs: int) -> tuple:
        draw = self.draw
        n = draw(st.integers(1, max_inputs))
        merge = "single" if n == 1 else draw(st.sampled_from(["cat", "add"]))
        if family == "mlp":
            feats = [draw(st.integers(1, 8)) for _ in range(n)]
            inputs = tuple(InputSpec((f,)) for f in feats)
            if merge == "add":
                d = draw(st.integers(1, 8))
                stems = tuple(Linear(f, d, self.bias()) for f in feats)
                return inputs, stems, merge, (d,)
            return inputs, (None,) * n, merge, (sum(feats),)
        if family == "seq":
            t = draw(st.integers(1, 5))
            specs, stems, widths = [], [], []
            d_add = draw(st.integers(2, 8))
            for _ in range(n):
                if self.allowed("Embed") and draw(st.booleans()):
                    vocab = draw(st.integers(2, 10))
                    width = d_add if merge == "add" else draw(st.integers(2, 8))
                    specs.append(InputSpec((t,), vocab))
                    stems.append(Embed(vocab, width))
                else:
                    f = draw(st.integers(2, 8))
                    specs.append(InputSpec((t, f)))
                    if merge == "add":
                        stems.append(Linear(f, d_add, self.bias()))
                        width = d_add
                    else:
                        stems.append(None)
                        width = f
                widths.append(width)
            d = d_add if merge == "add" else sum(widths)
            return tuple(specs), tuple(stems), merge, (t, d)
        # cnn
        h = draw(st.integers(2, 6))
        w = draw(st.integers(2, 6))
        chans = [draw(st.integers(1, 3)) for _ in range(n)]
        inputs = tuple(InputSpec((c, h, w)) for c in chans)
        if merge == "add":
            c_out = draw(st.integers(1, 4))
            stems = tuple(Conv2d(c, c_out, 1, 1, 0, 1, self.bias()) for c in chans)
            return inputs, stems, merge, (c_out, h, w)
        return inputs, (None,) * n, merge, (sum(chans), h, w)


@st.composite
def architectures(draw: Any, families: Sequence[str] = FAMILIES, bias: Optional[bool] = None,
                  max_blocks: int = 5, max_inputs: int = 2, exclude: Sequence[str] = (),
                  activations: Sequence[str] = ACTIVATIONS) -> Architecture:
    """Random valid architectures (a hypothesis strategy).

    Every drawn architecture is valid by construction: the generator tracks the per-sample
    shape and only offers blocks that accept it. Shrinking goes towards fewer blocks, one input,
    ``Linear`` and ``relu``.

    Parameters
    ----------
    families:
        a subset of :data:`FAMILIES`: ``"mlp"`` (inputs ``(D,)``), ``"seq"`` (``(T, D)`` or
        token ids ``(T,)``; attention, norms, gated MLPs) and ``"cnn"`` (``(C, H, W)``;
        convolutions, BatchNorm / GroupNorm, pooling).
    bias:
        ``True``: every layer has a bias; ``False``: bias-free everywhere (no linear/conv bias,
        LayerNorm without bias, zero BatchNorm/GroupNorm shift, no additive attention masks) —
        the setting where conservative rules must put all relevance on the inputs (together
        with ``activations=ZERO_PRESERVING``: sigmoid(0) = 1/2 is a constant the identity rule
        passes on to a pre-activation that may be exactly 0, where the ε-rule absorbs it);
        ``None``: drawn per layer.
    max_blocks:
        most blocks in the body (nested :class:`Residual` / :class:`Shared` bodies add up to two
        each).
    max_inputs:
        most positional inputs (several are merged by ``cat`` or ``add``).
    exclude:
        block class names never to generate (e.g. ``("Attention",)``; ``"Embed"`` disables
        token inputs).
    activations:
        the element-wise activations to draw from (default :data:`ACTIVATIONS`).

    Returns
    -------
    hypothesis.strategies.SearchStrategy[Architecture]
    """
    bad = set(families) - set(FAMILIES)
    if bad:
        raise ValueError(f"unknown families {sorted(bad)}; known: {FAMILIES}")
    bad = set(activations) - set(ACTIVATIONS)
    if bad or not activations:
        raise ValueError(f"activations must be a non-empty subset of {ACTIVATIONS}")
    gen = _Gen(draw, bias, frozenset(exclude), activations)
    family = draw(st.sampled_from(list(families)))
    inputs, stems, merge, shape = gen.start(family, max_inputs)
    blocks: list[Block] = []
    for _ in range(draw(st.integers(0, max_blocks))):
        blk = gen.block(shape)
        blocks.append(blk)
        shape = blk.out_shape(shape)
    if len(shape) == 3:  # the head needs features
        blk = Pool(draw(st.sampled_from(gen.pools(shape))))
        blocks.append(blk)
        shape = blk.out_shape(shape)
    head = Linear(shape[-1], draw(st.integers(2, 5)), gen.bias())
    return Architecture(family, inputs, stems, merge, tuple(blocks), head)


def _specs_of(model_or_arch: Any, shapes: Optional[Sequence[Any]]) -> tuple[InputSpec, ...]:
    if shapes is not None:
        return tuple(s if isinstance(s, InputSpec) else InputSpec(tuple(s)) for s in shapes)
    if isinstance(model_or_arch, Architecture):
        return model_or_arch.inputs
    if isinstance(model_or_arch, GeneratedModel):
        return model_or_arch.arch.inputs
    raise TypeError("pass shapes=[per-sample shape or InputSpec, ...] for a model that was not "
                    "built by lrpplan.testing.build")


def _dtype_of(model_or_arch: Any) -> torch.dtype:
    if isinstance(model_or_arch, nn.Module):
        for p in model_or_arch.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


@st.composite
def inputs_for(draw: Any, model_or_arch: Union[nn.Module, Architecture], *,
               shapes: Optional[Sequence[Union[Shape, InputSpec]]] = None,
               batch: Optional[int] = None, min_batch: int = 1, max_batch: int = 4,
               dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, ...]:
    """Inputs for a model (a hypothesis strategy drawing a tuple of tensors).

    Values come from a drawn seed (normal, positive or sparse = ReLU'd normal, at a drawn scale),
    so examples are cheap and reproducible; token ids are uniform over the vocabulary.

    Parameters
    ----------
    model_or_arch:
        a :class:`GeneratedModel`, an :class:`Architecture`, or any module together with
        ``shapes``.
    shapes:
        per input, its per-sample shape (float input) or an :class:`InputSpec` (token ids:
        ``InputSpec((T,), vocab=V)``). Required for models not built by :func:`build`.
    batch:
        fixed batch size; default: drawn from ``min_batch..max_batch``.
    min_batch, max_batch:
        range of the drawn batch size. (PyTorch may record a different graph for a batch of
        one, e.g. a ``reshape`` that becomes an alias, so tests comparing plans across batch
        sizes draw ``min_batch=2``.)
    dtype:
        float dtype; default: the dtype of the model's parameters (float32 for an architecture).

    Returns
    -------
    hypothesis.strategies.SearchStrategy[tuple[torch.Tensor, ...]]
    """
    specs = _specs_of(model_or_arch, shapes)
    dtype = dtype or _dtype_of(model_or_arch)
    b = batch if batch is not None else draw(st.integers(min_batch, max_batch))
    seed = draw(st.integers(0, 2**32 - 1))
    dist = draw(st.sampled_from(["normal", "positive", "sparse"]))
    scale = draw(st.sampled_from([1.0, 0.1, 4.0]))
    gen = torch.Generator().manual_seed(seed)
    return tuple(_random_input(s, b, dtype, gen, scale, dist) for s in specs)


def targets_for(model_or_arch: Union[nn.Module, Architecture], batch: Optional[int] = None,
                classes: Optional[int] = None) -> st.SearchStrategy[Any]:
    """Targets for :func:`lrpplan.explain` (a hypothesis strategy).

    Draws ``None`` (argmax per sample), a class index, or (when ``batch`` is given) one class
    index per sample.

    Parameters
    ----------
    model_or_arch:
        a :class:`GeneratedModel` or :class:`Architecture` (the class count is its head's), or
        any module together with ``classes``.
    batch:
        the batch size, to also draw per-sample targets.
    classes:
        number of output classes (required for models not built by :func:`build`).

    Returns
    -------
    hypothesis.strategies.SearchStrategy
    """
    if classes is None:
        arch = model_or_arch.arch if isinstance(model_or_arch, GeneratedModel) else model_or_arch
        if not isinstance(arch, Architecture):
            raise TypeError("pass classes= for a model that was not built by "
                            "lrpplan.testing.build")
        classes = arch.classes
    options = [st.none(), st.integers(0, classes - 1)]
    if batch is not None:
        options.append(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch))
    return st.one_of(*options)


