"""The architecture description: one frozen dataclass per block kind, each building its\n``nn.Module``; ``repr`` is valid Python so a shrunk example pastes as code."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

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


@dataclass(frozen=True)
class Excite(Block):
    """A squeeze-excitation scale: ``x ⊙ fn(mean(x))`` with the mean over the sequence of a
    ``(T, D)`` hidden tensor or over the feature map of a ``(C, H, W)`` one (``keepdim``), so
    the scale is broadcast along those dims; at sequence length 1 or a 1×1 map the two factors
    have the same shape. Not drawn by :func:`architectures`; insert it into an architecture."""

    fn: str = "sigmoid"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4):
            raise ValueError(f"Excite needs a (T, D) or (C, H, W) hidden tensor, not "
                             f"{tuple(x.shape[1:])}")
        dims = (-2, -1) if x.dim() == 4 else (-2,)
        return x * _ACT_FN[self.fn](x.mean(dims, keepdim=True))

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


