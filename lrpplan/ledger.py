"""Conservation accounting: per node, relevance in, relevance out, relevance absorbed."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch


@dataclass(frozen=True)
class LedgerRow:
    """One propagated node: ``absorbed = inflow - outflow`` (bias, ε, constants, dropped)."""

    node: int
    node_type: str
    inflow: float
    outflow: float

    @property
    def absorbed(self) -> float:
        return self.inflow - self.outflow


class Ledger:
    """Σ start = Σ at attributed tensors + Σ absorbed, checked by :meth:`closes`.

    Sums are kept as tensors during the run and turned into floats only when read, so an
    explanation triggers no host-device synchronisation unless the ledger is inspected.
    """

    def __init__(self, seeds: Sequence[torch.Tensor], results: Sequence, rows, types) -> None:
        self._seeds = list(seeds)
        self._results = list(results)
        self._rows = rows
        self._types = types

    @cached_property
    def rows(self) -> list[LedgerRow]:
        # each row holds lists of 0-d sums (one per deposit); one stack, one transfer for all
        parts = [t for r in self._rows for t in (*r[1], *r[2])]
        if not parts:
            return [LedgerRow(r[0], self._types[r[0]], 0.0, 0.0) for r in self._rows]
        values = iter(torch.stack([t.to(torch.float64) for t in parts]).cpu().tolist())
        out = []
        for node, ins, outs in self._rows:
            inflow = sum(next(values) for _ in ins)
            outflow = sum(next(values) for _ in outs)
            out.append(LedgerRow(node, self._types[node], float(inflow), float(outflow)))
        return out

    @cached_property
    def start(self) -> float:
        return float(sum(s.double().sum() for s in self._seeds))

    @cached_property
    def at_inputs(self) -> float:
        return float(sum(r.double().sum() for r in self._results if r is not None))

    @cached_property
    def absorbed(self) -> float:
        return float(sum(r.absorbed for r in self.rows))

    @property
    def residual(self) -> float:
        """start − at_inputs − absorbed (0 up to float round-off when the books close)."""
        return self.start - self.at_inputs - self.absorbed

    def closes(self, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
        scale = max(abs(self.start), abs(self.at_inputs), abs(self.absorbed), 1.0)
        return abs(self.residual) <= atol + rtol * scale

    def by_type(self) -> dict[str, tuple[int, float]]:
        """node type -> (count, absorbed)."""
        out: dict[str, tuple[int, float]] = {}
        for r in self.rows:
            c, a = out.get(r.node_type, (0, 0.0))
            out[r.node_type] = (c + 1, a + r.absorbed)
        return out

    def __repr__(self) -> str:
        return (f"Ledger(start={self.start:.6g}, at_inputs={self.at_inputs:.6g}, "
                f"absorbed={self.absorbed:.6g}, residual={self.residual:.3g})")
