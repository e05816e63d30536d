"""Conservation accounting: per node, relevance in, relevance out, relevance absorbed.

Each rule reports what its node absorbs from its own terms (a bias share, an ε share, an unsent
operand's or a constant's share, an absorbing fallback's inflow; :meth:`lrpplan.rules.Rule.absorbs`),
never as inflow − outflow. The ledger compares the two: a node whose inflow − outflow differs
from what its rule reports created or destroyed relevance (a leak), so :meth:`Ledger.closes` is a
check that can fail.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Sequence

import torch

from .errors import LRPError

#: node id of the rows that book relevance left on an edge that leads nowhere
DROPPED = -1
_DROPPED_TYPE = "(dropped: edge leads nowhere)"


@dataclass
class Book:
    """What an executor hands the ledger: the results per target, per target whether its
    relevance also flows on (an explained intermediate tensor, not counted at the inputs),
    ``(node, 0-d tensor)`` for everything a step absorbed, and the per-node rows
    ``(node, received sums, sent sums, absorbed sums)`` when the detail was kept (else None)."""

    results: list
    through: list
    absorbed: list
    rows: Optional[list]


@dataclass(frozen=True)
class LedgerRow:
    """One propagated node.

    Attributes
    ----------
    node, node_type:
        the node (``node == -1``: relevance left on an edge that leads nowhere, booked as dropped).
    inflow, outflow:
        Σ relevance received, Σ relevance sent on.
    absorbed:
        what the node's rule reports it absorbs (bias, ε, constants, dropped branches), from its
        own terms: 0 for a conserving rule.
    """

    node: int
    node_type: str
    inflow: float
    outflow: float
    absorbed: float

    @property
    def residual(self) -> float:
        """inflow − outflow − absorbed: relevance created (< 0) or lost (> 0) at this node."""
        return self.inflow - self.outflow - self.absorbed

    def leaks(self, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
        """|residual| > atol + rtol · max(|inflow|, |outflow|, |absorbed|)."""
        scale = max(abs(self.inflow), abs(self.outflow), abs(self.absorbed))
        return abs(self.residual) > atol + rtol * scale


class Ledger:
    """Σ start = Σ at attributed tensors + Σ absorbed, and per node inflow − outflow = absorbed,
    checked by :meth:`closes`.

    The totals are exact on every explanation. The per-node rows (:attr:`rows`, :meth:`leaks`)
    exist where the run kept them: the first explanation of a graph, and replays asked for
    ``ledger="nodes"`` (a replay's default keeps the totals only: no reduction per deposit).

    Sums are kept as 0-d tensors during the run and turned into floats only when read (one
    stack, one transfer), so an explanation triggers no host-device synchronisation unless the
    ledger is inspected.
    """

    def __init__(self, seeds: Sequence[torch.Tensor], book: Book, types) -> None:
        self._seeds = list(seeds)
        self._results = list(book.results)
        self._through = list(book.through)
        self._absorbed = list(book.absorbed)
        self._rows = book.rows
        self._types = types

    @property
    def detail(self) -> bool:
        """The per-node rows were kept (first explanation, or ``ledger="nodes"``)."""
        return self._rows is not None

    @cached_property
    def rows(self) -> list[LedgerRow]:
        """One row per propagated node (in plan order), then one per edge whose relevance was
        left where it leads nowhere. Only where the run kept the detail (:attr:`detail`)."""
        if self._rows is None:
            raise LRPError(
                "this ledger keeps totals only: a cached plan replayed without "
                "ledger='nodes', or several targets summed. Pass ledger='nodes' "
                "(lrpplan.explain, Explainer, attribute) for one row per node (inflow, "
                "outflow, absorbed) and Ledger.leaks(); with several targets, read the first "
                "explanation's Attribution.ledgers[0]")
        parts = [t for r in self._rows for t in (*r[1], *r[2], *_absorbed_parts(r))]
        values = iter(torch.stack([t.detach().reshape(()).to(torch.float64) for t in parts])
                      .cpu().tolist() if parts else [])
        out = []
        for r in self._rows:
            node, ins, outs = r[0], r[1], r[2]
            inflow = sum(next(values) for _ in ins)
            outflow = sum(next(values) for _ in outs)
            absorbed = sum(next(values) for _ in _absorbed_parts(r))
            node_type = _DROPPED_TYPE if node == DROPPED else self._types[node]
            out.append(LedgerRow(node, node_type, float(inflow), float(outflow), float(absorbed)))
        return out

    @cached_property
    def start(self) -> float:
        """Σ of the seed relevance at the explained outputs."""
        return float(sum(s.double().sum() for s in self._seeds))

    @cached_property
    def at_inputs(self) -> float:
        """Σ relevance at the explained tensors where it stops (an explained intermediate
        tensor whose relevance flows on further is not counted: it would count twice)."""
        return float(sum(r.double().sum() for k, r in enumerate(self._results)
                         if r is not None and not (k < len(self._through) and self._through[k])))

    @cached_property
    def absorbed(self) -> float:
        """Σ of what the rules report their nodes absorb (and relevance dropped on edges that
        lead nowhere)."""
        if not self._absorbed:
            return 0.0
        parts = torch.stack([t.detach().reshape(()).to(torch.float64) for _, t in self._absorbed])
        return float(parts.sum())

    @property
    def residual(self) -> float:
        """start − at_inputs − absorbed (0 up to float round-off when the books close)."""
        return self.start - self.at_inputs - self.absorbed

    def leaks(self, rtol: float = 1e-4, atol: float = 1e-6) -> list[LedgerRow]:
        """The rows where relevance was created or lost: ``|inflow − outflow − absorbed| >
        atol + rtol · max(|inflow|, |outflow|, |absorbed|)`` (float round-off of the row's own
        sums stays far below ``rtol``; a rule or fallback that scales, drops or duplicates
        relevance does not)."""
        return [r for r in self.rows if r.leaks(rtol, atol)]

    def closes(self, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
        """True when the books balance and no node leaks. Checks exactly:

        1. globally, ``|start − at_inputs − absorbed| ≤ atol + rtol · max(|start|, |at_inputs|,
           |absorbed|, 1)``, where ``absorbed`` is the sum of what the rules report (never
           inflow − outflow);
        2. where the run kept the detail (:attr:`detail`), per node, :meth:`leaks` with the same
           ``rtol`` and ``atol`` is empty: every node's inflow − outflow equals what its rule
           reports it absorbs.
        """
        scale = max(abs(self.start), abs(self.at_inputs), abs(self.absorbed), 1.0)
        if abs(self.residual) > atol + rtol * scale:
            return False
        return not self.detail or not self.leaks(rtol, atol)

    def by_type(self) -> dict[str, tuple[int, float]]:
        """node type -> (count of absorbing steps, absorbed); with the detail, every
        propagated node counts."""
        out: dict[str, tuple[int, float]] = {}
        if self.detail:
            for r in self.rows:
                c, a = out.get(r.node_type, (0, 0.0))
                out[r.node_type] = (c + 1, a + r.absorbed)
            return out
        for node, t in self._absorbed:
            name = _DROPPED_TYPE if node == DROPPED else self._types[node]
            c, a = out.get(name, (0, 0.0))
            out[name] = (c + 1, a + float(t))
        return out

    def __repr__(self) -> str:
        leaks = self.leaks() if self.detail else []
        text = (f"Ledger(start={self.start:.6g}, at_inputs={self.at_inputs:.6g}, "
                f"absorbed={self.absorbed:.6g}, residual={self.residual:.3g}")
        if leaks:
            worst = max(leaks, key=lambda r: abs(r.residual))
            text += (f", leaks={len(leaks)}: worst {worst.node_type} #{worst.node} "
                     f"residual {worst.residual:.3g}")
        return text + ")"


def _absorbed_parts(row) -> Sequence[torch.Tensor]:
    return row[3] if len(row) > 3 else ()


def combined_ledger(seed_sets: Sequence[Sequence[torch.Tensor]], books: Sequence[Book],
                    types) -> Ledger:
    """The ledger of several targets explained together (their totals summed; no per-node
    rows): start, at the inputs and absorbed are each the sum over the targets."""
    seeds = [torch.stack(list(per_root)).sum(0) for per_root in zip(*seed_sets)]
    results = []
    for per_target in zip(*(book.results for book in books)):
        present = [r for r in per_target if r is not None]
        results.append(torch.stack(present).sum(0) if present else None)
    absorbed = [part for book in books for part in book.absorbed]
    return Ledger(seeds, Book(results, list(books[0].through), absorbed, None), types)
