"""Second-order explanations of a similarity: BiLRP (Eberle et al., 2022).

A similarity model scores two inputs by the dot product of their embeddings,
``y(a, b) = Σ_d φ_d(a) φ_d(b)``. BiLRP gives the relevance of every *pair* of input units
``(i, j)``, one unit of ``a`` and one of ``b``::

    R[i, j] = Σ_d R_i(φ_d(a)) · R_j(φ_d(b))

where ``R_i(φ_d(a))`` is the first-order relevance of unit ``i`` for embedding dimension
``d``. Where each side conserves (``Σ_i R_i(φ_d(a)) = φ_d(a)``, as on bias-free networks), the
pair matrix sums to the similarity. The D maps of each side come from one multi-target replay
(one target per embedding dimension, ``chunk`` at a time), not from D backward passes.

>>> import torch, lrpplan
>>> net = torch.nn.Sequential(torch.nn.Linear(6, 8, bias=False), torch.nn.ReLU(),
...                           torch.nn.Linear(8, 4, bias=False))
>>> res = lrpplan.bilrp(net, torch.randn(1, 6), torch.randn(1, 6), cache=False)
>>> tuple(res.pairs.shape)
(1, 6, 6)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .api import Attribution, CacheArg, explain
from .errors import InvalidInputError
from .targets import output_tensor

__all__ = ["PairAttribution", "bilrp", "pair_matrix", "patches"]

#: the embedding dimensions explained together per replay when ``chunk`` is not given
DEFAULT_CHUNK = 64


@dataclass
class PairAttribution:
    """Relevance of pairs of input units for a similarity.

    Attributes
    ----------
    pairs:
        ``[B, *units_a, *units_b]``: relevance of each pair (unit of ``a``, unit of ``b``).
    similarity:
        ``[B]``: ``Σ_d φ_d(a) φ_d(b)``, what the pairs explain.
    left, right:
        the first-order attributions of each side, one map per embedding dimension
        (``relevance`` of shape ``[B, D, *input]``), with their ledgers.
    """

    pairs: torch.Tensor
    similarity: torch.Tensor
    left: Attribution = field(repr=False)
    right: Attribution = field(repr=False)

    @property
    def assumptions(self) -> tuple[str, ...]:
        """Assumptions recorded in either side's plan."""
        return tuple(dict.fromkeys(self.left.assumptions + self.right.assumptions))


def pair_matrix(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``[B, *units_a, *units_b]`` from per-dimension relevance ``[B, D, *units_a]`` and
    ``[B, D, *units_b]``: ``Σ_d left[:, d, i] · right[:, d, j]``."""
    if left.dim() < 2 or right.dim() < 2 or left.shape[:2] != right.shape[:2]:
        raise InvalidInputError(f"per-dimension relevance must share [B, D], got "
                                f"{tuple(left.shape)} and {tuple(right.shape)}")
    b, d = left.shape[:2]
    pairs = torch.einsum("bdi,bdj->bij", left.reshape(b, d, -1), right.reshape(b, d, -1))
    return pairs.reshape(b, *left.shape[2:], *right.shape[2:])


def patches(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``units`` function for images: relevance ``[B, D, C, H, W]`` summed over channels and
    over ``size × size`` patches, ``[B, D, H / size, W / size]``."""
    if size < 1:
        raise InvalidInputError(f"patch size must be positive, got {size}")

    def to_patches(rel: torch.Tensor) -> torch.Tensor:
        if rel.dim() != 5 or rel.shape[-1] % size or rel.shape[-2] % size:
            raise InvalidInputError(f"patches({size}) needs relevance [B, D, C, H, W] with H and W "
                                    f"multiples of {size}, got {tuple(rel.shape)}")
        b, d, _, h, w = rel.shape
        return rel.sum(2).reshape(b, d, h // size, size, w // size, size).sum((3, 5))

    return to_patches


def _embedding_target(embedding: Optional[Callable[[Any], torch.Tensor]]) -> Callable:
    def target(raw: Any) -> torch.Tensor:
        emb = embedding(raw) if embedding is not None else output_tensor(raw)
        if not isinstance(emb, torch.Tensor) or emb.dim() < 2:
            raise InvalidInputError("bilrp needs embeddings [B, D] (or [B, ...], flattened); "
                                    "pass embedding=callable(model output) -> [B, D]")
        return emb.reshape(emb.shape[0], -1)

    return target


def bilrp(model: torch.nn.Module, a: Any, b: Any, *, embedding: Optional[Callable] = None,
          units: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, rules: Any = None,
          cache: CacheArg = None, chunk: Optional[int] = DEFAULT_CHUNK,
          a_kwargs: Optional[dict] = None, b_kwargs: Optional[dict] = None) -> PairAttribution:
    """Relevance of every pair of input units for the similarity ``<φ(a), φ(b)>``.

    Parameters
    ----------
    model:
        the embedding model: ``model(a, **a_kwargs)`` returns ``φ(a)`` (``[B, D]``, or anything
        ``embedding`` maps to it). For a cosine similarity, normalise inside the model.
    a, b:
        the two inputs (the same batch size B; pairs are formed within each sample).
    embedding:
        callable on the model's output returning ``[B, D]`` (default: the output, flattened).
    units:
        callable mapping relevance ``[B, D, *input]`` to ``[B, D, *units]`` (e.g.
        :func:`patches` for images); default: every input feature is a unit (token ids: every
        token).
    rules, cache:
        as for :func:`lrpplan.explain`, for both sides.
    chunk:
        embedding dimensions per replay (memory grows with it); ``None``: all at once.
    a_kwargs, b_kwargs:
        keyword arguments for the model on each side (e.g. attention masks), unattributed.
    """
    target = _embedding_target(embedding)
    left = explain(model, a, target=target, rules=rules, cache=cache, chunk=chunk,
                   **(a_kwargs or {}))
    right = explain(model, b, target=target, rules=rules, cache=cache, chunk=chunk,
                    **(b_kwargs or {}))
    if left.output.shape != right.output.shape:
        raise InvalidInputError(f"the two sides have embeddings of shapes "
                                f"{tuple(left.output.shape)} and {tuple(right.output.shape)}")
    ra, rb = left.relevance, right.relevance
    if units is not None:
        ra, rb = units(ra), units(rb)
    pairs = pair_matrix(ra, rb)
    similarity = (left.output * right.output).sum(1)
    return PairAttribution(pairs, similarity.detach(), left, right)
