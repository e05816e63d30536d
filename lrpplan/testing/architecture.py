"""A whole generated model: :class:`Architecture`, :func:`build`, :func:`example_inputs`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .blocks import Block, InputSpec, Linear, Shape


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
                   seed: int = 0, size: Optional[int] = None) -> tuple[torch.Tensor, ...]:
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
    size:
        another sequence length (``(T, D)`` and token ``(T,)`` inputs) or spatial size
        (``(C, H, W)`` inputs get ``H = W = size``) than the architecture's; ``(D,)`` inputs
        keep their shape. The model accepts it where no block depends on that size (a
        :class:`Reshape` or a flattening :class:`Pool` may not): try a forward pass.

    Returns
    -------
    tuple of torch.Tensor
        one tensor per :attr:`Architecture.inputs` entry.
    """
    gen = torch.Generator().manual_seed(seed)
    specs = arch.inputs if size is None else tuple(resized(s, size) for s in arch.inputs)
    return tuple(_random_input(spec, batch, dtype, gen) for spec in specs)


def resized(spec: InputSpec, size: int) -> InputSpec:
    """``spec`` with sequence length ``size`` (``(T, D)``, token ``(T,)``) or spatial size
    ``size × size`` (``(C, H, W)``); a float ``(D,)`` input is returned unchanged."""
    shape = tuple(spec.shape)
    if spec.tokens:
        shape = (size,) + shape[1:]
    elif len(shape) == 2:
        shape = (size, shape[1])
    elif len(shape) == 3:
        shape = (shape[0], size, size)
    return InputSpec(shape, spec.vocab)


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


