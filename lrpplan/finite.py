"""Relevance is finite wherever the explained output is finite: the check and the locator.

:func:`check_finite` costs one reduction per result and one over the ledger sums, and a single
host synchronisation, on every explanation (the explained output is checked with them). Only when it fails does it re-run the plan on the
same live graph with the same seeds under a :class:`CheckingExecutor`, which checks every
deposit as it is made: the first non-finite deposit comes from the first step that received
finite relevance (everything before it was checked) and sent a non-finite one, and the
:class:`~lrpplan.errors.NonFiniteError` names that node.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch

from .errors import NonFiniteError
from .graph import Graph
from .plan import Plan, Step
from .ledger import Book
from .replay import DetailedExecutor, RuleCall


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in a (nested) tuple or list, e.g. a ledger row's sums."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def _all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One 0-d boolean: every element of every tensor is finite (no host synchronisation)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.dim() > 0]
    scalars = [t for t in tensors if t.dim() == 0]
    if scalars:
        try:
            flags.append(torch.isfinite(torch.stack(scalars)).all())
        except RuntimeError:  # mixed dtypes or devices: one by one
            flags += [torch.isfinite(t) for t in scalars]
    if not flags:
        return torch.ones((), dtype=torch.bool)
    if len({f.device for f in flags}) > 1:
        flags = [f.cpu() for f in flags]
    return torch.stack(flags).all()


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Every element of every tensor is finite; one host synchronisation.

    A screen first: the sum of each tensor, all stacked, checked at once (a sum is finite only
    if every element is, so a finite screen proves it). Only when the screen fails (a NaN or an
    infinity, or a sum of finite values that overflowed) is every element checked."""
    if not tensors:
        return True
    sums = [t.reshape(()) if t.dim() == 0 else t.sum() for t in tensors]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in sums:
        groups.setdefault((t.dtype, t.device), []).append(t)
    flags = [torch.isfinite(torch.stack(g)).all() for g in groups.values()]
    if len(flags) == 1:
        if bool(flags[0]):
            return True
    elif bool(torch.stack([f.cpu() for f in flags]).all()):
        return True
    return bool(_all_finite(list(tensors)))


class CheckingExecutor(DetailedExecutor):
    """A :class:`~lrpplan.replay.DetailedExecutor` that checks every deposit a rule makes (and
    the rule's ledger sums) and raises :class:`~lrpplan.errors.NonFiniteError` at the first
    non-finite one, naming the node. Slow (a synchronisation per deposit): for locating only."""

    def __init__(self, graph: Graph, plan: Plan) -> None:
        super().__init__(graph, plan)
        self._step: Optional[Step] = None

    def _fail(self, s: Step, what: str) -> None:
        node_type = self.graph.types[s.node]
        raise NonFiniteError(
            f"relevance became non-finite at {node_type} ({self.graph.describe(s.node)}), "
            f"rule {s.rule!r}: the relevance it received was finite, {what} holds NaN or "
            "infinity, though the explained output is finite",
            node=s.node, node_type=node_type, rule=s.rule)

    def deposit(self, slot: int, t: torch.Tensor) -> None:
        super().deposit(slot, t)
        s = self._step
        if s is not None and not all_finite([t]):
            pos = s.rel_out.index(slot) if slot in s.rel_out else -1
            self._fail(s, f"the relevance it sent to input {pos}")

    def rule(self, s: Step, call: RuleCall) -> None:
        self._step = s
        try:
            super().rule(s, call)
        finally:
            self._step = None
        row = self.rows[-1] if self.rows else None  # the row this rule step just added
        if row is not None and row[0] == s.node and \
                not all_finite(list(_tensors(row[1:]))):
            self._fail(s, "its ledger sums (relevance in, out or absorbed)")


def check_finite(graph: Graph, plan: Plan, seed_sets: Sequence[Sequence[torch.Tensor]],
                 books: Sequence[Book],
                 seed_error: str = "the explained output holds NaN or infinity") -> None:
    """Raise :class:`~lrpplan.errors.NonFiniteError` if a seed (``seed_error``), a result in
    ``books`` (what running ``plan`` on ``graph`` from each seed set gave) or one of their
    ledger sums is not finite.

    The check is one reduction per tensor and a single host synchronisation (:func:`all_finite`)
    for every target together; only when it fails is the plan re-run, with every deposit
    checked, to name the first node that produced a non-finite value.
    """
    parts = [t for seeds, book in zip(seed_sets, books) for t in _book_tensors(seeds, book)]
    if all_finite(parts):
        return
    for seeds, book in zip(seed_sets, books):
        if all_finite(_book_tensors(seeds, book)):
            continue
        if not all_finite(list(seeds)):
            raise NonFiniteError(seed_error)
        CheckingExecutor(graph, plan).run(seeds)
        break
    raise NonFiniteError(
        "the relevance (or a ledger sum) holds NaN or infinity though the explained output is "
        "finite, and a checked re-run of the plan did not reproduce it at any node")


def _book_tensors(seeds: Sequence[torch.Tensor], book: Book) -> list[torch.Tensor]:
    parts = list(seeds) + [r for r in book.results if r is not None]
    parts += [t for _, t in book.absorbed]
    if book.rows is not None:
        parts += [t for row in book.rows for t in _tensors(row[1:3])]
    return parts
