"""Property-based testing of LRP conservation with `hypothesis <https://hypothesis.works>`_.

LRP promises conservation: the relevance that enters at the explained output is redistributed to
the inputs, not created or lost, except where a rule absorbs it on purpose (a bias, a stabiliser,
a constant operand) — and lrpplan's ledger books every absorbed share. This module makes that
promise testable, for lrpplan's own rules and for any user model:

- a small description language for architectures (:class:`Architecture`, one frozen dataclass
  per :class:`Block` kind) whose ``repr`` is valid Python, so a failing example shrinks to a small
  model that prints, and pastes, as code; :func:`build` turns it into an ``nn.Module``;
- hypothesis strategies: :func:`architectures` (random but valid-by-construction models),
  :func:`inputs_for` and :func:`targets_for` (inputs and targets of a given model);
- checks usable with or without hypothesis: :func:`assert_conserves`,
  :func:`assert_replay_matches_trace`, :func:`conservation_report`;
- settings profiles: :func:`register_profiles` (``"ci"``: derandomised, a few dozen examples;
  ``"long"``: hundreds) and :func:`profile` (the one named by ``HYPOTHESIS_PROFILE``).

``import lrpplan`` does not import this module (nor hypothesis); import it explicitly.

Examples
--------
>>> import torch
>>> from hypothesis import given
>>> from lrpplan import testing
>>> model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
>>> @testing.profile("ci")
... @given(inputs=testing.inputs_for(model.eval(), shapes=[(6,)]))
... def test_conserves(inputs):
...     testing.assert_conserves(model, *inputs)
>>> test_conserves()
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any, ClassVar, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

import lrpplan
from lrpplan.api import Attribution

__all__ = [
    # architecture description
    "Architecture", "InputSpec", "Block", "Linear", "Conv2d", "Act", "LayerNorm", "RMSNorm",
    "BatchNorm", "GroupNorm", "GatedMLP", "Attention", "Residual", "Shared", "Embed",
    "Reshape", "Transpose", "Permute", "SplitCat", "Stack", "Slice", "IndexSelect", "Index",
    "Gather", "Expand", "Repeat", "MaxPool", "AvgPool", "Pool", "GeneratedModel",
    "build", "example_inputs",
    # strategies
    "FAMILIES", "ACTIVATIONS", "ZERO_PRESERVING", "architectures", "dtypes", "inputs_for",
    "targets_for",
    # checks
    "ReportRow", "ConservationReport", "assert_conserves", "assert_replay_matches_trace",
    "conservation_report",
    # settings
    "register_profiles", "profile",
]

#: the model families :func:`architectures` draws from (the rank of the first hidden tensor)
FAMILIES: tuple[str, ...] = ("mlp", "seq", "cnn")

ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "silu", "tanh", "sigmoid")
#: the activations with f(0) = 0 (sigmoid(0) = 1/2 acts like a bias: see :func:`architectures`)
ZERO_PRESERVING: tuple[str, ...] = ("relu", "gelu", "silu", "tanh")
_ACT_FN = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
           "sigmoid": torch.sigmoid}

#: largest feature size the generator creates (keeps every example cheap)
_MAX_DIM = 16

Shape = tuple[int, ...]


# =============================================================================================
# architecture description


@dataclass(frozen=True, repr=False)
class InputSpec:
    """One model input, per sample (without the batch dimension).

    Attributes
    ----------
    shape:
        per-sample shape: ``(D,)``, ``(T, D)`` or ``(C, H, W)`` for float inputs, ``(T,)`` for
        token ids.
    vocab:
        vocabulary size for integer token ids; ``0`` for a float input.
    """

    shape: Shape
    vocab: int = 0

    @property
    def tokens(self) -> bool:
        """Whether this input holds integer token ids."""
        return self.vocab > 0

    def structure(self) -> tuple:
        """What the autograd graph sees of this input (float or token ids, not its size)."""
        return ("tokens",) if self.tokens else ("float",)

    def __repr__(self) -> str:
        if self.tokens:
            return f"InputSpec(shape={self.shape!r}, vocab={self.vocab})"
        return f"InputSpec(shape={self.shape!r})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis / IPython printing
        p.text(repr(self))


class Block:
    """Base class of the layer descriptions; subclasses are frozen dataclasses.

    A block maps one hidden tensor of per-sample shape ``shape`` to one of shape
    :meth:`out_shape`, and builds the ``nn.Module`` doing so with :meth:`make`.
    :meth:`structure` is what of the block the autograd graph (and so the plan fingerprint) is
    guaranteed to see: the block kind and its structural flags, never sizes. Subclasses list
    their size fields in ``_sizes``.
    """

    _sizes: ClassVar[tuple[str, ...]] = ()

    def out_shape(self, shape: Shape) -> Shape:
        """Per-sample output shape for the per-sample input ``shape`` (default: unchanged)."""
        return shape

    def make(self) -> nn.Module:  # pragma: no cover - interface
        """A fresh module computing the block (weights are set by :func:`build`)."""
        raise NotImplementedError

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis / IPython printing
        p.text(repr(self))

    def structure(self) -> tuple:
        """Block kind and structural fields (no sizes)."""
        return (type(self).__name__,) + tuple(
            _structure_of(getattr(self, f.name)) for f in fields(self)  # type: ignore[arg-type]
            if f.name not in self._sizes)


def _structure_of(v: Any) -> Any:
    if isinstance(v, Block):
        return v.structure()
    if isinstance(v, tuple):
        return tuple(_structure_of(x) for x in v)
    return v


class _Fn(nn.Module):
    """A parameter-free block: ``forward`` calls ``spec.apply``."""

    def __init__(self, spec: "Block") -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.apply(x)  # type: ignore[attr-defined]

    def extra_repr(self) -> str:
        return repr(self.spec)


# ---------------------------------------------------------------------------------------------
# layers with weights


@dataclass(frozen=True)
class Linear(Block):
    """``nn.Linear(d_in, d_out, bias)`` on the last dimension."""

    d_in: int
    d_out: int
    bias: bool = True
    _sizes: ClassVar[tuple[str, ...]] = ("d_in", "d_out")

    def out_shape(self, shape: Shape) -> Shape:
        return shape[:-1] + (self.d_out,)

    def make(self) -> nn.Module:
        return nn.Linear(self.d_in, self.d_out, bias=self.bias)


@dataclass(frozen=True)
class Conv2d(Block):
    """``nn.Conv2d`` on ``(C, H, W)``."""

    c_in: int
    c_out: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    groups: int = 1
    bias: bool = True
    _sizes: ClassVar[tuple[str, ...]] = ("c_in", "c_out", "kernel", "padding")

    def out_shape(self, shape: Shape) -> Shape:
        _, h, w = shape
        k, s, p = self.kernel, self.stride, self.padding
        return (self.c_out, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)

    def make(self) -> nn.Module:
        return nn.Conv2d(self.c_in, self.c_out, self.kernel, self.stride, self.padding,
                         groups=self.groups, bias=self.bias)


@dataclass(frozen=True)
class Embed(Block):
    """``nn.Embedding(vocab, dim)``: token ids ``(T,)`` -> ``(T, dim)``."""

    vocab: int
    dim: int
    _sizes: ClassVar[tuple[str, ...]] = ("vocab", "dim")

    def out_shape(self, shape: Shape) -> Shape:
        return shape + (self.dim,)

    def make(self) -> nn.Module:
        return nn.Embedding(self.vocab, self.dim)


@dataclass(frozen=True)
class LayerNorm(Block):
    """``nn.LayerNorm(dim, bias=bias)`` over the last dimension."""

    dim: int
    bias: bool = True
    _sizes: ClassVar[tuple[str, ...]] = ("dim",)

    def make(self) -> nn.Module:
        return nn.LayerNorm(self.dim, bias=self.bias)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


@dataclass(frozen=True)
class RMSNorm(Block):
    """Hand-written RMSNorm: ``x * rsqrt(mean(x**2) + eps) * w`` (pow, mean, add, rsqrt, mul)."""

    dim: int
    _sizes: ClassVar[tuple[str, ...]] = ("dim",)

    def make(self) -> nn.Module:
        return _RMSNorm(self.dim, 1e-6)


class _BatchNorm(nn.Module):
    def __init__(self, spec: "BatchNorm") -> None:
        super().__init__()
        self.spec = spec
        self.bn = (nn.BatchNorm2d if spec.layout == "channels" else nn.BatchNorm1d)(spec.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.layout == "sequence":  # [B, T, D]: normalise D
            return self.bn(x.transpose(-1, -2)).transpose(-1, -2)
        return self.bn(x)

    def post_init(self, gen: torch.Generator) -> None:
        if not self.spec.bias:  # y = a x exactly: no shift that could absorb relevance
            with torch.no_grad():
                self.bn.bias.zero_()
                self.bn.running_mean.zero_()


@dataclass(frozen=True)
class BatchNorm(Block):
    """BatchNorm in eval mode with randomised running statistics.

    ``layout``: ``"features"`` (``(D,)``, BatchNorm1d), ``"sequence"`` (``(T, D)``, normalises D
    through two transposes) or ``"channels"`` (``(C, H, W)``, BatchNorm2d). ``bias=False`` sets
    the shift ``b − a·μ`` to exactly 0 (bias and running mean zero).
    """

    channels: int
    layout: str = "features"
    bias: bool = True
    _sizes: ClassVar[tuple[str, ...]] = ("channels", "bias")  # bias only changes values

    def make(self) -> nn.Module:
        return _BatchNorm(self)


class _GroupNorm(nn.GroupNorm):
    def __init__(self, spec: "GroupNorm") -> None:
        super().__init__(spec.groups, spec.channels)
        self.spec = spec

    def post_init(self, gen: torch.Generator) -> None:
        if not self.spec.bias:
            with torch.no_grad():
                self.bias.zero_()


@dataclass(frozen=True)
class GroupNorm(Block):
    """``nn.GroupNorm(groups, channels)`` on ``(C, H, W)``; ``bias=False``: zero shift."""

    groups: int
    channels: int
    bias: bool = True
    _sizes: ClassVar[tuple[str, ...]] = ("channels", "bias")

    def make(self) -> nn.Module:
        return _GroupNorm(self)


class _GatedMLP(nn.Module):
    def __init__(self, spec: "GatedMLP") -> None:
        super().__init__()
        self.gate = nn.Linear(spec.dim, spec.hidden, bias=spec.bias)
        self.up = nn.Linear(spec.dim, spec.hidden, bias=spec.bias)
        self.down = nn.Linear(spec.hidden, spec.dim, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


@dataclass(frozen=True)
class GatedMLP(Block):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""

    dim: int
    hidden: int
    bias: bool = True
    _sizes: ClassVar[tuple[str, ...]] = ("dim", "hidden")

    def make(self) -> nn.Module:
        return _GatedMLP(self)


def _bool_keep(t: int, s: int, device: torch.device) -> torch.Tensor:
    """A fixed non-causal boolean pattern (True = attend); the diagonal is always kept."""
    i = torch.arange(t, device=device).unsqueeze(-1)
    j = torch.arange(s, device=device)
    return ((i + j) % 3 != 1) | (i == j)


def _alibi(t: int, s: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An additive float mask (ALiBi-like distance penalty)."""
    i = torch.arange(t, device=device).unsqueeze(-1)
    j = torch.arange(s, device=device)
    return (-0.5 * (i - j).abs()).to(dtype)


class _Attention(nn.Module):
    def __init__(self, spec: "Attention") -> None:
        super().__init__()
        self.spec = spec
        self.qkv = nn.Linear(spec.dim, 3 * spec.dim, bias=spec.bias)
        self.out = nn.Linear(spec.dim, spec.dim, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        b, t, d = x.shape
        h = spec.heads
        hd = d // h
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, h, hd).transpose(1, 2) for z in (q, k, v))
        if spec.impl == "sdpa":
            if spec.mask == "causal":
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif spec.mask == "bool":
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=_bool_keep(t, t, x.device))
            elif spec.mask == "float":
                o = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=_alibi(t, t, x.dtype, x.device))
            else:
                o = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
            if spec.mask == "causal":
                keep = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
                scores = scores.masked_fill(~keep, float("-inf"))
            elif spec.mask == "bool":
                scores = scores.masked_fill(~_bool_keep(t, t, x.device), float("-inf"))
            elif spec.mask == "float":
                scores = scores + _alibi(t, t, x.dtype, x.device)
            o = torch.softmax(scores, dim=-1) @ v
        return self.out(o.transpose(1, 2).reshape(b, t, d))


@dataclass(frozen=True)
class Attention(Block):
    """Multi-head self-attention on ``(T, D)``: fused qkv projection, ``chunk``, heads, output
    projection.

    ``impl``: ``"sdpa"`` (``F.scaled_dot_product_attention``) or ``"explicit"``
    (``softmax(q kᵀ / √d [+ mask]) @ v``). ``mask``: ``"none"``, ``"causal"``, ``"bool"`` (a
    fixed non-causal pattern, diagonal kept) or ``"float"`` (an additive distance penalty).
    """

    dim: int
    heads: int = 1
    impl: str = "sdpa"
    mask: str = "none"
    bias: bool = True
    _sizes: ClassVar[tuple[str, ...]] = ("dim", "heads")

    def make(self) -> nn.Module:
        return _Attention(self)

    def structure(self) -> tuple:
        # The graph sees SDPA's mask only through ``is_causal`` (a mask tensor without grad is no
        # edge); the explicit form sees a masked_fill (bool or causal) or an add (float).
        if self.impl == "sdpa":
            mask = self.mask == "causal"
        else:
            mask = {"none": "none", "causal": "fill", "bool": "fill", "float": "add"}[self.mask]
        return ("Attention", self.impl, mask, self.bias)


# ---------------------------------------------------------------------------------------------
# composition


class _Residual(nn.Module):
    def __init__(self, body: Sequence[Block]) -> None:
        super().__init__()
        self.body = nn.Sequential(*[b.make() for b in body])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@dataclass(frozen=True)
class Residual(Block):
    """``x + body(x)``; every block of ``body`` keeps the shape."""

    body: tuple[Block, ...]

    def make(self) -> nn.Module:
        return _Residual(self.body)


class _Shared(nn.Module):
    def __init__(self, body: Sequence[Block]) -> None:
        super().__init__()
        self.body = nn.Sequential(*[b.make() for b in body])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.body(x))


@dataclass(frozen=True)
class Shared(Block):
    """Weight sharing: the same ``body`` modules applied twice, ``body(body(x))``."""

    body: tuple[Block, ...]

    def make(self) -> nn.Module:
        return _Shared(self.body)


@dataclass(frozen=True)
class Act(Block):
    """An element-wise activation: one of :data:`ACTIVATIONS`."""

    fn: str = "relu"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return _ACT_FN[self.fn](x)

    def make(self) -> nn.Module:
        return _Fn(self)


# ---------------------------------------------------------------------------------------------
# shape and routing ops (parameter-free)


@dataclass(frozen=True)
class Reshape(Block):
    """Split the last dimension ``a*b`` into ``(a, b)``, swap them (``transpose`` or
    ``permute``), and flatten back: a fixed permutation of the features."""

    a: int
    b: int
    op: str = "transpose"
    _sizes: ClassVar[tuple[str, ...]] = ("a", "b")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = x.view(*lead, self.a, self.b)
        if self.op == "transpose":
            y = y.transpose(-1, -2)
        else:
            n = y.dim()
            y = y.permute(*range(n - 2), n - 1, n - 2)
        return y.reshape(*lead, self.a * self.b)

    def make(self) -> nn.Module:
        return _Fn(self)


@dataclass(frozen=True)
class Transpose(Block):
    """Swap the last two per-sample dimensions (``x.transpose(-1, -2)``)."""

    def out_shape(self, shape: Shape) -> Shape:
        return shape[:-2] + (shape[-1], shape[-2])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-1, -2)

    def make(self) -> nn.Module:
        return _Fn(self)


@dataclass(frozen=True)
class Permute(Block):
    """Permute the three per-sample dimensions of ``(C, H, W)`` (batch stays first)."""

    dims: tuple[int, int, int] = (1, 2, 0)

    def out_shape(self, shape: Shape) -> Shape:
        return tuple(shape[d] for d in self.dims)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, *(d + 1 for d in self.dims))

    def make(self) -> nn.Module:
        return _Fn(self)


@dataclass(frozen=True)
class SplitCat(Block):
    """Cut along ``dim`` into ``parts`` pieces (``chunk`` or ``split`` with uneven sizes), apply
    ``Act(fn)`` to the first piece, and ``cat`` them back in reverse order."""

    dim: int
    parts: int
    how: str = "chunk"
    fn: str = "relu"

    def _pieces(self, x: torch.Tensor) -> Sequence[torch.Tensor]:
        if self.how == "chunk":
            return x.chunk(self.parts, dim=self.dim)
        n = x.shape[self.dim]
        sizes = [1] * (self.parts - 1) + [n - self.parts + 1]
        return x.split(sizes, dim=self.dim)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        pieces = list(self._pieces(x))
        pieces[0] = _ACT_FN[self.fn](pieces[0])
        return torch.cat(pieces[::-1], dim=self.dim)

    def make(self) -> nn.Module:
        return _Fn(self)


@dataclass(frozen=True)
class Stack(Block):
    """``chunk`` the last dimension into ``parts`` equal pieces, ``stack`` them on a new
    dimension, then ``reduce``: ``"flatten"`` (back to the same size), ``"mean"`` or ``"sum"``
    (size ``D / parts``)."""

    parts: int
    reduce: str = "flatten"

    def out_shape(self, shape: Shape) -> Shape:
        if self.reduce == "flatten":
            return shape
        return shape[:-1] + (shape[-1] // self.parts,)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.stack(x.chunk(self.parts, dim=-1), dim=-2)
        if self.reduce == "flatten":
            return y.flatten(-2)
        return y.mean(-2) if self.reduce == "mean" else y.sum(-2)

    def make(self) -> nn.Module:
        return _Fn(self)


@dataclass(frozen=True)
class Slice(Block):
    """``x[..., start:stop:step]`` along per-sample dimension ``dim`` (negative)."""

    dim: int
    start: int
    stop: int
    step: int = 1
    _sizes: ClassVar[tuple[str, ...]] = ("start", "stop")

    def out_shape(self, shape: Shape) -> Shape:
        n = len(range(self.start, self.stop, self.step))
        out = list(shape)
        out[self.dim] = n
        return tuple(out)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        index = [slice(None)] * x.dim()
        index[self.dim] = slice(self.start, self.stop, self.step)
        return x[tuple(index)]

    def make(self) -> nn.Module:
        return _Fn(self)


class _Indexed(nn.Module):
    def __init__(self, spec: Block, index: Sequence[int]) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("index", torch.tensor(list(index), dtype=torch.long),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.apply(x, self.index)  # type: ignore[attr-defined]

    def extra_repr(self) -> str:
        return repr(self.spec)


@dataclass(frozen=True)
class IndexSelect(Block):
    """``x.index_select(dim, index)`` (indices may repeat)."""

    dim: int
    index: tuple[int, ...]
    _sizes: ClassVar[tuple[str, ...]] = ("index",)

    def out_shape(self, shape: Shape) -> Shape:
        out = list(shape)
        out[self.dim] = len(self.index)
        return tuple(out)

    def apply(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.index_select(self.dim, index)

    def make(self) -> nn.Module:
        return _Indexed(self, self.index)


@dataclass(frozen=True)
class Index(Block):
    """Advanced indexing on the last dimension: ``x[..., index]``."""

    index: tuple[int, ...]
    _sizes: ClassVar[tuple[str, ...]] = ("index",)

    def out_shape(self, shape: Shape) -> Shape:
        return shape[:-1] + (len(self.index),)

    def apply(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x[..., index]

    def make(self) -> nn.Module:
        return _Indexed(self, self.index)


@dataclass(frozen=True)
class Gather(Block):
    """``x.gather(-1, index)`` with the same ``index`` row at every position."""

    index: tuple[int, ...]
    _sizes: ClassVar[tuple[str, ...]] = ("index",)

    def out_shape(self, shape: Shape) -> Shape:
        return shape[:-1] + (len(self.index),)

    def apply(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.gather(-1, index.expand(*x.shape[:-1], len(self.index)))

    def make(self) -> nn.Module:
        return _Indexed(self, self.index)


@dataclass(frozen=True)
class Expand(Block):
    """``x.unsqueeze(-2).expand(..., n, D)`` flattened: ``n`` copies of the last dimension."""

    n: int
    _sizes: ClassVar[tuple[str, ...]] = ("n",)

    def out_shape(self, shape: Shape) -> Shape:
        return shape[:-1] + (shape[-1] * self.n,)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = x.unsqueeze(-2).expand(*x.shape[:-1], self.n, x.shape[-1])
        return y.reshape(*x.shape[:-1], self.n * x.shape[-1])

    def make(self) -> nn.Module:
        return _Fn(self)


@dataclass(frozen=True)
class Repeat(Block):
    """``x.repeat(1, ..., n)``: ``n`` copies along the last dimension."""

    n: int
    _sizes: ClassVar[tuple[str, ...]] = ("n",)

    def out_shape(self, shape: Shape) -> Shape:
        return shape[:-1] + (shape[-1] * self.n,)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(*([1] * (x.dim() - 1)), self.n)

    def make(self) -> nn.Module:
        return _Fn(self)


# ---------------------------------------------------------------------------------------------
# pooling


@dataclass(frozen=True)
class MaxPool(Block):
    """``F.max_pool2d(x, kernel)`` on ``(C, H, W)``."""

    kernel: int = 2

    def out_shape(self, shape: Shape) -> Shape:
        c, h, w = shape
        return (c, h // self.kernel, w // self.kernel)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, self.kernel)

    def make(self) -> nn.Module:
        return _Fn(self)


@dataclass(frozen=True)
class AvgPool(Block):
    """``F.avg_pool2d(x, kernel)`` on ``(C, H, W)``."""

    kernel: int = 2

    def out_shape(self, shape: Shape) -> Shape:
        c, h, w = shape
        return (c, h // self.kernel, w // self.kernel)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.kernel)

    def make(self) -> nn.Module:
        return _Fn(self)


#: Pool ops reducing ``(C, H, W)`` to ``(C,)`` (``flatten``: to ``(C*H*W,)``)
POOL_IMAGE: tuple[str, ...] = ("adaptive_avg", "mean_hw", "amax_hw", "flatten")
#: Pool ops reducing ``(T, D)`` to ``(D,)``
POOL_SEQUENCE: tuple[str, ...] = ("mean_t", "sum_t", "last", "amax_t")


@dataclass(frozen=True)
class Pool(Block):
    """A rank-reducing pooling: one of :data:`POOL_IMAGE` or :data:`POOL_SEQUENCE`."""

    op: str = "mean_t"

    def out_shape(self, shape: Shape) -> Shape:
        if self.op == "flatten":
            return (math.prod(shape),)
        return shape[-1:] if self.op in POOL_SEQUENCE else shape[:1]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        op = self.op
        if op == "adaptive_avg":
            return F.adaptive_avg_pool2d(x, 1).flatten(-3)
        if op == "mean_hw":
            return x.mean((-2, -1))
        if op == "amax_hw":
            return x.amax((-2, -1))
        if op == "flatten":
            return x.flatten(-3)
        if op == "mean_t":
            return x.mean(-2)
        if op == "sum_t":
            return x.sum(-2)
        if op == "last":
            return x[..., -1, :]
        return x.amax(-2)

    def make(self) -> nn.Module:
        return _Fn(self)


# ---------------------------------------------------------------------------------------------
# the whole model


@dataclass(frozen=True, repr=False)
class Architecture:
    """A generated model: inputs, a stem per input, how the stems merge, blocks, a head.

    Attributes
    ----------
    family:
        ``"mlp"`` (``(D,)``), ``"seq"`` (``(T, D)``) or ``"cnn"`` (``(C, H, W)``): the rank of the
        first hidden tensor (informative; blocks may change the rank, e.g. :class:`Pool`).
    inputs:
        one :class:`InputSpec` per positional model input.
    stems:
        per input: a block applied to it first (``None``: the input itself); token inputs
        always start with an :class:`Embed`.
    merge:
        ``"single"`` (one input), ``"cat"`` (concatenate on the feature / channel dimension) or
        ``"add"`` (stems project every input to the same shape; summed).
    blocks:
        the body, applied in order.
    head:
        the final :class:`Linear` to ``classes`` outputs (on ``(T, D)`` it gives ``[B, T, C]``,
        of which :func:`lrpplan.explain` explains the last position).

    The ``repr`` is valid Python (``from lrpplan.testing import *; import torch``), one block per
    line, so a shrunk failing example can be pasted into a test.
    """

    family: str
    inputs: tuple[InputSpec, ...]
    stems: tuple[Optional[Block], ...]
    merge: str
    blocks: tuple[Block, ...]
    head: Linear

    @property
    def classes(self) -> int:
        """Number of model outputs per position."""
        return self.head.d_out

    def shapes(self) -> list[Shape]:
        """Per-sample hidden shapes: before each block, then the input of the head."""
        hs = [spec.shape if stem is None else stem.out_shape(spec.shape)
              for spec, stem in zip(self.inputs, self.stems)]
        shape = hs[0]
        if self.merge == "cat":
            dim = -3 if len(shape) == 3 else -1
            out = list(shape)
            out[dim] = sum(h[dim] for h in hs)
            shape = tuple(out)
        shapes = [shape]
        for b in self.blocks:
            shape = b.out_shape(shape)
            shapes.append(shape)
        return shapes

    def structure(self) -> tuple:
        """What of the architecture the plan fingerprint is guaranteed to see (no sizes, no
        dtype, no weights): two architectures whose structures differ must get different keys.
        """
        return (tuple(i.structure() for i in self.inputs),
                tuple(None if s is None else s.structure() for s in self.stems),
                self.merge if len(self.inputs) > 1 else "single",
                tuple(b.structure() for b in self.blocks), self.head.structure())

    def __repr__(self) -> str:
        def tup(items: Sequence[Any]) -> str:
            if not items:
                return "()"
            inner = "".join(f"        {x!r},\n" for x in items)
            return "(\n" + inner + "    )"
        return (f"Architecture(\n    family={self.family!r},\n    inputs={tup(self.inputs)},\n"
                f"    stems={tup(self.stems)},\n    merge={self.merge!r},\n"
                f"    blocks={tup(self.blocks)},\n    head={self.head!r},\n)")

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis / IPython printing
        p.text(repr(self))


class GeneratedModel(nn.Module):
    """The ``nn.Module`` :func:`build` makes from an :class:`Architecture` (kept as ``.arch``)."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        self.stems = nn.ModuleList([nn.Identity() if s is None else s.make() for s in arch.stems])
        self.blocks = nn.Sequential(*[b.make() for b in arch.blocks])
        self.head = arch.head.make()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.arch.inputs):
            raise TypeError(f"expected {len(self.arch.inputs)} inputs, got {len(inputs)}")
        hs = [stem(x) for stem, x in zip(self.stems, inputs)]
        if self.arch.merge == "cat":
            h = torch.cat(hs, dim=-3 if hs[0].dim() == 4 else -1)
        elif self.arch.merge == "add":
            h = hs[0]
            for other in hs[1:]:
                h = h + other
        else:
            h = hs[0]
        return self.head(self.blocks(h))


def _init_weights(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64)
                        / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
            else:  # norm weights
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen, dtype=torch.float64))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen, dtype=torch.float64))
    for m in model.modules():
        if hasattr(m, "post_init"):
            m.post_init(gen)


def build(arch: Architecture, dtype: torch.dtype = torch.float32, seed: int = 0) -> GeneratedModel:
    """Instantiate ``arch`` as an eval-mode module in ``dtype``.

    Parameters
    ----------
    arch:
        the architecture.
    dtype:
        parameter dtype (``torch.float32`` or ``torch.float64``).
    seed:
        seed of the private generator drawing the weights (and BatchNorm running statistics);
        the global RNG is not touched. Another seed gives the same architecture with other
        weights.

    Returns
    -------
    GeneratedModel
        in eval mode; ``model.arch`` is ``arch``.
    """
    model = GeneratedModel(arch)
    _init_weights(model, torch.Generator().manual_seed(seed))
    return model.to(dtype).eval()


def example_inputs(arch: Architecture, batch: int = 2, dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs for ``arch``: standard normal floats, uniform token ids.

    Parameters
    ----------
    arch:
        the architecture.
    batch:
        batch size.
    dtype:
        dtype of the float inputs (token ids are ``torch.long``).
    seed:
        seed of the private generator.

    Returns
    -------
    tuple of torch.Tensor
        one tensor per :attr:`Architecture.inputs` entry.
    """
    gen = torch.Generator().manual_seed(seed)
    return tuple(_random_input(spec, batch, dtype, gen) for spec in arch.inputs)


def _random_input(spec: InputSpec, batch: int, dtype: torch.dtype, gen: torch.Generator,
                  scale: float = 1.0, dist: str = "normal") -> torch.Tensor:
    shape = (batch,) + tuple(spec.shape)
    if spec.tokens:
        return torch.randint(spec.vocab, shape, generator=gen)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if dist == "positive":
        x = x.abs()
    elif dist == "sparse":
        x = torch.relu(x)
    return (scale * x).to(dtype)


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


# =============================================================================================
# checks


class ReportRow(NamedTuple):
    """One propagated autograd node of a :class:`ConservationReport`."""

    node: int
    node_type: str
    inflow: float
    outflow: float
    absorbed: float


class ConservationReport(list):
    """Per-node conservation rows (a ``list`` of :class:`ReportRow`) with the totals.

    Attributes
    ----------
    start, at_inputs, absorbed, residual:
        the ledger totals: ``start = at_inputs + absorbed + residual``.
    attribution:
        the :class:`lrpplan.Attribution` the report was made from.
    """

    def __init__(self, attribution: Attribution) -> None:
        led = attribution.ledger
        super().__init__(ReportRow(r.node, r.node_type, r.inflow, r.outflow, r.absorbed)
                         for r in led.rows)
        self.attribution = attribution
        self.start = led.start
        self.at_inputs = led.at_inputs
        self.absorbed = led.absorbed
        self.residual = led.residual

    def summary(self, top: int = 10) -> str:
        """Totals and the ``top`` nodes absorbing the most relevance (by magnitude)."""
        lines = [f"start {self.start:.6g} = at inputs {self.at_inputs:.6g} + absorbed "
                 f"{self.absorbed:.6g} + residual {self.residual:.3g}"]
        rows = sorted(self, key=lambda r: -abs(r.absorbed))[:top]
        if rows:
            lines.append(f"{'node':>6}  {'type':<44} {'in':>12} {'out':>12} {'absorbed':>12}")
            for r in rows:
                lines.append(f"{r.node:>6}  {r.node_type:<44} {r.inflow:>12.5g} "
                             f"{r.outflow:>12.5g} {r.absorbed:>12.5g}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def conservation_report(model: nn.Module, *inputs: Any, rules: Any = None, target: Any = None,
                        **kwargs: Any) -> ConservationReport:
    """Explain ``model(*inputs)`` (no plan cache) and return the per-node ledger.

    Parameters
    ----------
    model:
        the model.
    *inputs:
        its positional inputs.
    rules:
        a preset name or :class:`lrpplan.RuleSet` (default ``"epsilon"``).
    target:
        as for :func:`lrpplan.explain`.
    **kwargs:
        keyword arguments for the model.

    Returns
    -------
    ConservationReport
        a list of :class:`ReportRow` (node id, node type, in, out, absorbed); ``print()`` it for
        a summary.
    """
    attr = lrpplan.explain(model, *inputs, target=target, rules=rules, cache=False, **kwargs)
    return ConservationReport(attr)


def _relevances(attr: Attribution) -> list[torch.Tensor]:
    rel = attr.relevance
    items = list(rel) if isinstance(rel, tuple) else [rel]
    return [r for r in items if r is not None]


def assert_conserves(model: nn.Module, *inputs: Any, rules: Any = None, tolerance: float = 1e-4,
                     min_input_share: Optional[float] = None, target: Any = None,
                     **kwargs: Any) -> Attribution:
    """Assert that an explanation of ``model(*inputs)`` conserves relevance.

    Checks, on one explanation without plan cache:

    1. every relevance tensor is finite;
    2. the ledger closes: ``|start − at_inputs − absorbed| ≤ tolerance · (max(|start|,
       |at_inputs|, |absorbed|, 1) + 0.01)`` (:meth:`lrpplan.Ledger.closes` with
       ``rtol=tolerance, atol=tolerance / 100``);
    3. with ``min_input_share``: ``at_inputs / start ≥ min_input_share`` (a start relevance of
       exactly 0 fails: the share is undefined).

    Parameters
    ----------
    model:
        the model.
    *inputs:
        its positional inputs.
    rules:
        a preset name or :class:`lrpplan.RuleSet`.
    tolerance:
        relative tolerance of the ledger check.
    min_input_share:
        least share of the start relevance that must reach the inputs (e.g. ``0.999`` for a
        bias-free model under the ε-rule with a negligible ε).
    target:
        as for :func:`lrpplan.explain`.
    **kwargs:
        keyword arguments for the model.

    Returns
    -------
    lrpplan.Attribution
        the checked explanation.

    Raises
    ------
    AssertionError
        with the conservation report when a check fails.
    """
    attr = lrpplan.explain(model, *inputs, target=target, rules=rules, cache=False, **kwargs)
    for k, r in enumerate(_relevances(attr)):
        if not torch.isfinite(r).all():
            raise AssertionError(f"relevance of input {k} is not finite:\n"
                                 f"{ConservationReport(attr)}")
    led = attr.ledger
    if not led.closes(rtol=tolerance, atol=tolerance * 1e-2):
        raise AssertionError(f"the conservation ledger does not close (tolerance {tolerance}):\n"
                             f"{ConservationReport(attr)}")
    if min_input_share is not None:
        if led.start == 0.0:
            raise AssertionError("the start relevance is 0: the input share is undefined")
        share = led.at_inputs / led.start
        if not share >= min_input_share:
            raise AssertionError(f"only {share:.6g} of the start relevance reached the inputs "
                                 f"(required ≥ {min_input_share}):\n{ConservationReport(attr)}")
    return attr


def _fresh_like(x: Any, batch: int, gen: torch.Generator) -> Any:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    shape = (batch,) + tuple(x.shape[1:])
    if x.is_floating_point():
        std = float(x.detach().double().std()) if x.numel() > 1 else 1.0
        std = std if math.isfinite(std) and std > 0 else 1.0
        return (std * torch.randn(shape, generator=gen, dtype=torch.float64)).to(
            dtype=x.dtype, device=x.device)
    flat = x.reshape(-1)  # token ids: resample ids that occur in x (valid for the model)
    pick = torch.randint(flat.numel(), (math.prod(shape),), generator=gen)
    return flat[pick.to(flat.device)].reshape(shape)


def assert_replay_matches_trace(model: nn.Module, *inputs: Any, rules: Any = None,
                                rtol: Optional[float] = None, target: Any = None,
                                replay_inputs: Optional[Sequence[Any]] = None,
                                seed: int = 0) -> Attribution:
    """Assert that a replayed plan gives the relevance of a traced run.

    An :class:`lrpplan.Explainer` (no disk cache) traces ``model(*inputs)``, then explains fresh
    inputs of another batch size (``batch + 1``; or ``replay_inputs``), which must replay the
    compiled plan. That relevance is compared with a traced run (``cache=False``) on the same
    fresh inputs: ``max |replayed − traced| ≤ rtol · max |traced|`` per input, ``rtol`` by default
    ``1e-5`` for float32 and ``1e-10`` for float64 relevance.

    Parameters
    ----------
    model:
        the model.
    *inputs:
        inputs of the first (traced) call; their first dimension is the batch.
    rules:
        a preset name or :class:`lrpplan.RuleSet`.
    rtol:
        relative tolerance (see above).
    target:
        target for the replayed and the reference call (``None``: argmax, identical for both).
    replay_inputs:
        the inputs of the replayed call (default: fresh random inputs of batch size
        ``batch + 1``; floats with the spread of ``inputs``, token ids resampled from those
        in ``inputs``).
    seed:
        seed for the fresh inputs.

    Returns
    -------
    lrpplan.Attribution
        the replayed explanation.

    Raises
    ------
    AssertionError
        when the second call traced instead of replaying, or the relevances differ.
    """
    explainer = lrpplan.Explainer(model, rules=rules, cache=False)
    first = explainer(*inputs)
    if first.cached:
        raise AssertionError("the first call of a fresh Explainer replayed a plan")
    if replay_inputs is None:
        gen = torch.Generator().manual_seed(seed)
        batch = inputs[0].shape[0] + 1
        replay_inputs = tuple(_fresh_like(x, batch, gen) for x in inputs)
    replayed = explainer(*replay_inputs, target=target)
    if not replayed.cached:
        raise AssertionError(
            "the second call traced again instead of replaying the plan of the first: the "
            f"fingerprint changed ({first.plan_key} -> {replayed.plan_key})")
    traced = lrpplan.explain(model, *replay_inputs, target=target, rules=rules, cache=False)
    if traced.cached:
        raise AssertionError("explain(cache=False) replayed a plan")
    got, ref = _relevances(replayed), _relevances(traced)
    if len(got) != len(ref):
        raise AssertionError(f"{len(got)} replayed relevance tensors, {len(ref)} traced")
    for k, (a, b) in enumerate(zip(got, ref)):
        tol = rtol if rtol is not None else (1e-10 if b.dtype == torch.float64 else 1e-5)
        if a.shape != b.shape:
            raise AssertionError(f"input {k}: replayed shape {tuple(a.shape)} != traced "
                                 f"{tuple(b.shape)}")
        scale = float(b.double().abs().max()) if b.numel() else 0.0
        err = float((a.double() - b.double()).abs().max()) if b.numel() else 0.0
        if not err <= tol * max(scale, 1e-30):
            rel = err / max(scale, 1e-30)
            raise AssertionError(f"input {k}: replay differs from trace: max abs error {err:.3g}, "
                                 f"max |relevance| {scale:.3g}, relative {rel:.3g} > {tol:g}")
    return replayed


# =============================================================================================
# settings profiles


def register_profiles() -> None:
    """Register the hypothesis settings profiles ``"ci"`` and ``"long"``.

    ``"ci"``
        ``derandomize=True`` (a fixed seed: every run draws the same examples), no example
        database, 40 examples per property, no deadline, ``too_slow`` health check suppressed.
    ``"long"``
        500 examples per property, random seeds, no deadline; select it with
        ``HYPOTHESIS_PROFILE=long``.

    Idempotent; :func:`profile` calls it.
    """
    common = dict(deadline=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much])
    settings.register_profile("ci", derandomize=True, database=None, max_examples=40, **common)
    settings.register_profile("long", max_examples=500, database=None, **common)


def profile(name: Optional[str] = None) -> settings:
    """The settings of profile ``name`` (default: env ``HYPOTHESIS_PROFILE``, else ``"ci"``).

    Use it as a decorator above ``@given`` to apply the profile to one test only, without
    changing hypothesis's global settings::

        @testing.profile()
        @given(arch=testing.architectures())
        def test_something(arch): ...

    Parameters
    ----------
    name:
        a registered profile name.

    Returns
    -------
    hypothesis.settings
    """
    register_profiles()
    return settings.get_profile(name or os.environ.get("HYPOTHESIS_PROFILE", "ci"))
