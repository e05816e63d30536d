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
from typing import Sequence

import torch

#: node id of the rows that book relevance left on an edge that leads nowhere
DROPPED = -1


class LedgerRows(list):
    """The executor's rows ``(node, received sums, sent sums, absorbed sums)`` (0-d tensors),
    with ``through``: per target, whether its relevance also flows on (an explained
    intermediate tensor, not counted at the inputs)."""

    through: Sequence[bool] = ()


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

    Sums are kept as 0-d tensors during the run and turned into floats only when read (one
    stack, one transfer), so an explanation triggers no host-device synchronisation unless the
    ledger is inspected.
    """

    def __init__(self, seeds: Sequence[torch.Tensor], results: Sequence, rows, types) -> None:
        self._seeds = list(seeds)
        self._results = list(results)
        self._rows = rows
        self._through = list(getattr(rows, "through", ()) or ())
        self._types = types

    @cached_property
    def rows(self) -> list[LedgerRow]:
        """One row per propagated node (in plan order), then one per edge whose relevance was
        left where it leads nowhere."""
        parts = [t for r in self._rows for t in (*r[1], *r[2], *_absorbed_parts(r))]
        values = iter(torch.stack([t.detach().reshape(()).to(torch.float64) for t in parts])
                      .cpu().tolist() if parts else [])
        out = []
        for r in self._rows:
            node, ins, outs = r[0], r[1], r[2]
            inflow = sum(next(values) for _ in ins)
            outflow = sum(next(values) for _ in outs)
            absorbed = sum(next(values) for _ in _absorbed_parts(r))
            node_type = "(dropped: edge leads nowhere)" if node == DROPPED else self._types[node]
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
        """Σ of what the rules report their nodes absorb."""
        return float(sum(r.absorbed for r in self.rows))

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
        2. per node, :meth:`leaks` with the same ``rtol`` and ``atol`` is empty: every node's
           inflow − outflow equals what its rule reports it absorbs.
        """
        scale = max(abs(self.start), abs(self.at_inputs), abs(self.absorbed), 1.0)
        return abs(self.residual) <= atol + rtol * scale and not self.leaks(rtol, atol)

    def by_type(self) -> dict[str, tuple[int, float]]:
        """node type -> (count, absorbed)."""
        out: dict[str, tuple[int, float]] = {}
        for r in self.rows:
            c, a = out.get(r.node_type, (0, 0.0))
            out[r.node_type] = (c + 1, a + r.absorbed)
        return out

    def __repr__(self) -> str:
        leaks = self.leaks()
        text = (f"Ledger(start={self.start:.6g}, at_inputs={self.at_inputs:.6g}, "
                f"absorbed={self.absorbed:.6g}, residual={self.residual:.3g}")
        if leaks:
            worst = max(leaks, key=lambda r: abs(r.residual))
            text += (f", leaks={len(leaks)}: worst {worst.node_type} #{worst.node} "
                     f"residual {worst.residual:.3g}")
        return text + ")"


def _absorbed_parts(row) -> Sequence[torch.Tensor]:
    return row[3] if len(row) > 3 else ()
