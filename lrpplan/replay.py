"""Executes a plan against a live graph; nothing else.

One executor, one method per step kind (``rule``, ``fused``, ``collect``) and per value-op kind,
dispatched through a table. The tracer (:mod:`lrpplan.trace`) uses the same methods to run each
step as it records it.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional, Sequence

import torch

from .errors import LRPError, PlanError, RuleError, UnrecoverableValueError
from .graph import Graph
from .ledger import LedgerRows
from .plan import Plan, Step, ValueOp
from .promise import INVERSES, read_saved
from .rules.base import OPS, get_rule, sum_to


class BoundStep:
    """A rule step with its rule, merged parameters and forward function looked up once."""

    __slots__ = ("step", "run", "params", "fit", "absorbs")

    def __init__(self, step: Step) -> None:
        self.step = step
        rule = get_rule(step.rule)
        self.run = rule.run
        spec = OPS.get(step.params.get("node_type", ""))
        params = dict(step.params)
        params["forward"] = spec.forward if spec is not None else None
        self.params = params
        self.fit = bool(spec is not None and spec.broadcasts)
        #: the rule reports what it absorbs: one more item after the relevance per input
        self.absorbs = bool(rule.absorbs(step.params))


class CheckedStep(BoundStep):
    """A :class:`BoundStep` whose rule output is checked (the tracer runs these; a replay runs
    plain ones): one item per input (plus the absorbed 0-d tensor where the rule reports one),
    and relevance of its input's shape — summed back only for ops that broadcast — never a
    broadcast by accident. A mismatch is a :class:`~lrpplan.errors.RuleError` naming the node
    and the rule."""

    __slots__ = ()

    def __init__(self, step: Step, graph: Graph) -> None:
        super().__init__(step)
        run, absorbs, fit = self.run, self.absorbs, self.fit

        def checked(node, rel, vals, p):  # no reference to self: no cycle holding the graph
            return _check_output(step, absorbs, fit, graph, run(node, rel, vals, p))

        self.run = checked


def _check_output(s: Step, absorbs: bool, fit: bool, graph: Graph, out: Sequence[Any]
                  ) -> Sequence[Any]:
    where = f"{graph.types[s.node]} ({graph.describe(s.node)})"
    n_in = len(s.rel_out)
    want = n_in + (1 if absorbs else 0)
    if len(out) != want:
        raise RuleError(f"rule {s.rule!r} on {where} returned {len(out)} items, expected {want} "
                        f"(relevance per input{' and the absorbed relevance' if absorbs else ''})")
    if absorbs and not (isinstance(out[-1], torch.Tensor) and out[-1].dim() == 0):
        raise RuleError(f"rule {s.rule!r} on {where} must report what it absorbs as a 0-d "
                        f"tensor, got {type(out[-1]).__name__}")
    for pos, (slot, e) in enumerate(zip(s.rel_out, graph.edges[s.node])):
        t = out[pos]
        if slot < 0 or t is None or e is None:
            continue
        shape = tuple(graph.nodes[e[0]]._input_metadata[e[1]].shape)
        got = tuple(t.shape)
        if got == shape:
            continue
        if fit:  # summed back to the input's shape by the executor
            try:
                if torch.broadcast_shapes(shape, got) == torch.Size(got):
                    continue
            except RuntimeError:
                pass
        raise RuleError(
            f"rule {s.rule!r} on {where} gave relevance of shape {list(got)} for input {pos}, "
            f"whose shape is {list(shape)}: every rule's relevance must have its input's shape "
            "(a rule for a shape-changing node must map relevance back like its gradient, e.g. "
            "'route')")
    return out


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
        #: (node, sums of the relevance it received, sums of the relevance it sent, 0-d sums of
        #: what it absorbed as its rule reports it); read through :attr:`ledger_rows`
        self.rows: list[tuple[int, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = []
        #: per target: its relevance also flows on (an explained intermediate tensor)
        self.through: list[bool] = [False] * n_targets

    @property
    def ledger_rows(self) -> LedgerRows:
        """The ledger's rows, and one for each slot whose relevance no step read (an edge that
        leads nowhere: booked as dropped); the targets whose relevance flows on."""
        rows = LedgerRows(self.rows)
        for sums in self.rel_sum:
            if sums:
                rows.append((-1, list(sums), [], list(sums)))
        rows.through = list(self.through)
        return rows

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

    def op_rec(self, op: ValueOp) -> None:
        value = self.graph.recorded.get((op.node, int(op.attr)))
        if value is None:
            raise UnrecoverableValueError(
                f"this plan reads the value of {self.graph.types[op.node]} #{op.node} as "
                "recorded during the forward pass (autograd keeps it nowhere), and this forward "
                "was not recorded: explain with lrpplan.explain(model, ...) or an Explainer, "
                "which run and record the forward; lrpplan.attribute cannot")
        self.val[op.outs[0]] = value

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
        absorbed = [out[-1]] if b.absorbs else []
        out_sums: list[torch.Tensor] = []
        edges = self.graph.edges[s.node]
        for pos, slot in enumerate(s.rel_out):
            if slot < 0:
                if out[pos] is not None:  # relevance on an edge that leads nowhere: dropped
                    absorbed.append(out[pos].sum())
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
        self.rows.append((s.node, in_sums, out_sums, absorbed))

    def fused(self, step: Step, body: list[BoundStep]) -> None:
        for op in step.chain:
            self.value_op(op)
        for b in body:
            self.rule(b)

    def collect(self, s: Step) -> None:
        slot = s.rel_in[0]
        t = self.rel[slot]
        k = s.params["target"]
        if s.params.get("keep"):  # flows on into the producer, whose rule may work in place
            t = t.clone()
            self.through[k] = True
        else:
            self.rel[slot] = None
            self.rel_sum[slot] = []
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
              "unview": Executor.op_unview, "sub": Executor.op_sub, "fwd": Executor.op_fwd,
              "rec": Executor.op_rec}


def replay(plan: Plan, graph: Graph, seeds: Sequence[tuple[int, torch.Tensor]],
           bound: Optional[list[Any]] = None) -> Executor:
    """Run ``plan`` on ``graph`` with relevance ``seeds`` given as (slot, tensor) pairs."""
    ex = Executor(graph, plan.n_rel, plan.n_val, len(plan.targets))
    for slot, t in seeds:
        ex.deposit(slot, t)
    ex.run(bound if bound is not None else bind(plan.steps))
    return ex
