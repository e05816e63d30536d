"""Executes a plan against a live graph; nothing else.

One executor, one method per step kind (``rule``, ``fused``, ``collect``) and per value-op kind,
dispatched through a table. The tracer (:mod:`lrpplan.trace`) uses the same methods to run each
step as it records it.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional, Sequence

import torch

from .errors import LRPError, PlanError
from .graph import Graph
from .plan import Plan, Step, ValueOp
from .promise import INVERSES, read_saved
from .rules.base import OPS, get_rule, sum_to


class BoundStep:
    """A rule step with its rule, merged parameters and forward function looked up once."""

    __slots__ = ("step", "run", "params", "fit")

    def __init__(self, step: Step) -> None:
        self.step = step
        self.run = get_rule(step.rule).run
        spec = OPS.get(step.params.get("node_type", ""))
        params = dict(step.params)
        params["forward"] = spec.forward if spec is not None else None
        self.params = params
        self.fit = bool(spec is not None and spec.broadcasts)


def bind(steps: Sequence[Step]) -> list[Any]:
    """Pre-bind every rule step (also inside fused steps) of a plan."""
    out: list[Any] = []
    for s in steps:
        if s.kind == "rule":
            out.append(BoundStep(s))
        elif s.kind == "fused":
            out.append((s, [BoundStep(b) for b in s.body]))
        else:
            out.append(s)
    return out


class Executor:
    """Holds the relevance and value slots of one run and executes steps.

    Parameters
    ----------
    graph:
        the live graph (node ids as in the plan).
    n_rel, n_val:
        number of relevance and value slots.
    n_targets:
        number of attribution targets.
    """

    def __init__(self, graph: Graph, n_rel: int, n_val: int, n_targets: int) -> None:
        self.graph = graph
        self.nodes = graph.nodes
        self.rel: list[Optional[torch.Tensor]] = [None] * n_rel
        #: Σ of each deposit into a slot, for the ledger (one reduction per deposit, no more)
        self.rel_sum: list[list[torch.Tensor]] = [[] for _ in range(n_rel)]
        self.val: list[Any] = [None] * n_val
        self.results: list[Optional[torch.Tensor]] = [None] * n_targets
        #: (node, sums of the relevance it received, sums of the relevance it sent)
        self.ledger_rows: list[tuple[int, list[torch.Tensor], list[torch.Tensor]]] = []

    # -- value ops ----------------------------------------------------------------------------

    def value_op(self, op: ValueOp) -> None:
        # a class-level table: bound methods stored on the instance would form a reference
        # cycle that keeps the whole autograd graph alive until the cyclic GC runs
        _VALUE_OPS[op.kind](self, op)

    def op_leaf(self, op: ValueOp) -> None:
        self.val[op.outs[0]] = self.nodes[op.node].variable

    def op_saved(self, op: ValueOp) -> None:
        self.val[op.outs[0]] = read_saved(self.nodes[op.node], op.attr)

    def op_base(self, op: ValueOp) -> None:
        base = read_saved(self.nodes[op.node], op.attr)._base
        if base is None:
            raise PlanError(f"#{op.node}.{op.attr} is no longer a view: stale plan")
        self.val[op.outs[0]] = base

    def op_unview(self, op: ValueOp) -> None:
        node = self.nodes[op.node]
        self.val[op.outs[0]] = INVERSES[type(node).__name__](node, self.val[op.ins[0]])

    def op_sub(self, op: ValueOp) -> None:
        self.val[op.outs[0]] = self.val[op.ins[0]] - self.val[op.ins[1]]

    def op_fwd(self, op: ValueOp) -> None:
        node = self.nodes[op.node]
        fwd = OPS[type(node).__name__].forward
        ins = [self.val[s] if s >= 0 else None for s in op.ins]
        outs = fwd(node, ins)
        for slot, v in zip(op.outs, outs):
            if slot >= 0:
                self.val[slot] = v

    # -- relevance ----------------------------------------------------------------------------

    def deposit(self, slot: int, t: torch.Tensor, sums: Optional[list] = None) -> None:
        """Aggregate relevance arriving on an edge (input aggregation, paper App. E);
        ``sums``: 0-d tensors adding up to ``t.sum()`` when the caller has them."""
        cur = self.rel[slot]
        self.rel[slot] = t if cur is None else cur + t
        self.rel_sum[slot] += [t.sum()] if sums is None else sums

    def rule(self, b: BoundStep) -> None:
        s = b.step
        node = self.nodes[s.node]
        rel = []
        in_sums: list[torch.Tensor] = []
        # relevance tensors passed on unchanged keep their sums (weak: a rule may free them)
        passed: list[tuple[weakref.ref, list[torch.Tensor]]] = []
        for slot in s.rel_in:
            if slot >= 0:
                rel.append(self.rel[slot])
                passed.append((weakref.ref(self.rel[slot]), self.rel_sum[slot]))
                in_sums += self.rel_sum[slot]
                self.rel[slot] = None  # each edge slot is read once, by its producer
                self.rel_sum[slot] = []
            else:
                rel.append(None)
        vals: list[Any] = [None] * (len(s.rel_out) + 1)  # last: the node's own output
        for pos, src in s.vals:
            vals[pos] = read_saved(node, src) if isinstance(src, str) else self.val[src]
        out = b.run(node, rel, vals, b.params)
        out_sums: list[torch.Tensor] = []
        edges = self.graph.edges[s.node]
        for pos, slot in enumerate(s.rel_out):
            if slot < 0:
                continue
            t = out[pos]
            if t is None:
                raise LRPError(f"rule {s.rule!r} gave no relevance for input {pos} of "
                               f"{type(node).__name__} #{s.node}")
            if b.fit:
                pid, nr = edges[pos]
                t = sum_to(t, self.nodes[pid]._input_metadata[nr].shape)
            sums = next((list(known) for ref, known in passed if ref() is t), None)
            if sums is None:
                sums = [t.sum()]
            out_sums += sums
            self.deposit(slot, t, sums)
        self.ledger_rows.append((s.node, in_sums, out_sums))

    def fused(self, step: Step, body: list[BoundStep]) -> None:
        for op in step.chain:
            self.value_op(op)
        for b in body:
            self.rule(b)

    def collect(self, s: Step) -> None:
        slot = s.rel_in[0]
        t = self.rel[slot]
        self.rel[slot] = None
        k = s.params["target"]
        cur = self.results[k]
        self.results[k] = t if cur is None else cur + t

    def free(self, s: Step) -> None:
        for v in s.free_val:
            self.val[v] = None

    # -- whole plans ----------------------------------------------------------------------------

    def run(self, bound: list[Any]) -> None:
        """Run pre-bound steps in order (see :func:`bind`)."""
        for i, item in enumerate(bound):
            try:
                if isinstance(item, BoundStep):
                    for op in item.step.chain:
                        self.value_op(op)
                    self.rule(item)
                    self.free(item.step)
                elif isinstance(item, tuple):
                    self.fused(item[0], item[1])
                    self.free(item[0])
                else:
                    self.collect(item)
            except LRPError:
                raise
            except Exception as exc:
                step = item.step if isinstance(item, BoundStep) else \
                    item[0] if isinstance(item, tuple) else item
                raise PlanError(
                    f"while executing plan step {i} ({step.format()}) on "
                    f"{self.graph.types[step.node]} #{step.node}: {exc}") from exc


_VALUE_OPS = {"leaf": Executor.op_leaf, "saved": Executor.op_saved, "base": Executor.op_base,
              "unview": Executor.op_unview, "sub": Executor.op_sub, "fwd": Executor.op_fwd}


def replay(plan: Plan, graph: Graph, seeds: Sequence[tuple[int, torch.Tensor]],
           bound: Optional[list[Any]] = None) -> Executor:
    """Run ``plan`` on ``graph`` with relevance ``seeds`` given as (slot, tensor) pairs."""
    ex = Executor(graph, plan.n_rel, plan.n_val, len(plan.targets))
    for slot, t in seeds:
        ex.deposit(slot, t)
    ex.run(bound if bound is not None else bind(plan.steps))
    return ex
