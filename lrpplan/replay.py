"""Executes a plan against a live graph; nothing else.

One executor, one method per step kind (``rule``, ``fused``, ``collect``) and per value-op kind,
dispatched by kind through class-level tables. A rule step reads its values from value slots and
calls ``rule.run(rel, x, params)``: the live graph is touched by graph-read value ops alone.

The ledger is kept at two levels of detail, by two executors:

- :class:`Executor` (a replay): the totals. Each rule reports what it absorbs (a 0-d tensor per
  step), relevance left on an edge that leads nowhere is booked as dropped; no reduction per
  deposit. Σ start = Σ at inputs + Σ absorbed is exact and checked by ``Ledger.closes()``.
- :class:`DetailedExecutor` (``ledger="nodes"``): also Σ relevance received and sent per node,
  one reduction per deposit, so ``Ledger.leaks()`` names the node that created or lost relevance.
- :class:`TracingExecutor` (the first explanation of a graph): the detail, and every rule's output
  checked against its node (relevance of its input's shape, the items it must return).
"""
from __future__ import annotations

import weakref
from typing import Any, Optional, Sequence

import torch

from .errors import LRPError, PlanError, RuleError, UnrecoverableValueError
from .graph import Graph
from .ledger import DROPPED, Book
from .plan import VALUE_KINDS, Plan, Step, ValueOp
from .promise import read_saved
from .rules.base import OPS, get_rule, sum_to


class RuleCall:
    """A rule step bound to its rule, looked up once per plan."""

    __slots__ = ("run", "params", "attrs", "absorbs", "fit")

    def __init__(self, step: Step) -> None:
        rule = get_rule(step.rule)
        spec = OPS.get(step.params.get("node_type", ""))
        self.run = rule.run
        self.params = step.params
        self.attrs = dict(step.params.get("attrs") or {})
        #: the rule reports what it absorbs: one more item after the relevance per input
        self.absorbs = bool(rule.absorbs(step.params))
        #: relevance for a broadcast input is summed back to its shape
        self.fit = bool(spec is not None and spec.broadcasts)


Program = list  # [(kind, step, RuleCall | [RuleCall] | None)]


def bind(plan: Plan) -> Program:
    """Pre-bind every rule step (also inside fused steps) of a plan."""
    out: Program = []
    for s in plan.steps:
        if s.kind == "rule":
            out.append(("rule", s, RuleCall(s)))
        elif s.kind == "fused":
            out.append(("fused", s, [RuleCall(b) for b in s.body]))
        else:
            out.append((s.kind, s, None))
    return out


def plain_value(v: Any) -> Any:
    """A saved attribute as a value: tensors as they are, sizes as tuples, ints signed."""
    if isinstance(v, torch.Tensor) or v is None:
        return v
    if isinstance(v, (tuple, list, torch.Size)):
        return tuple(plain_value(x) for x in v)
    if isinstance(v, int) and not isinstance(v, bool) and v >= (1 << 63):
        return v - (1 << 64)  # autograd exposes negative ints as unsigned 64-bit
    return v


class Executor:
    """Holds the relevance and value slots of one run and executes a plan's steps.

    Parameters
    ----------
    graph:
        the live graph (node ids as in the plan).
    plan:
        the plan to run.
    program:
        ``bind(plan)``, when the caller keeps it (a plan store binds once).
    """

    def __init__(self, graph: Graph, plan: Plan, program: Optional[Program] = None) -> None:
        self.graph = graph
        self.nodes = graph.nodes
        self.plan = plan
        self.program = program if program is not None else bind(plan)
        self.rel: dict[int, torch.Tensor] = {}
        self.val: dict[int, Any] = {}
        self.results: list[Optional[torch.Tensor]] = [None] * len(plan.targets)
        #: per target: its relevance also flows on (an explained intermediate tensor)
        self.through: list[bool] = [False] * len(plan.targets)
        #: (node, 0-d tensor): what each step reports it absorbs (DROPPED: an edge's relevance
        #: that nothing read)
        self.absorbed: list[tuple[int, torch.Tensor]] = []

    def run(self, seeds: Sequence[torch.Tensor]) -> "Executor":
        """Deposit one seed per root and run every step."""
        for slot, seed in zip(self.plan.header["roots"], seeds):
            self.deposit(slot, seed)
        for i, (kind, step, bound) in enumerate(self.program):
            try:
                getattr(self, kind)(step, bound)
                for v in step.free_val:
                    self.val.pop(v, None)
            except LRPError:
                raise
            except Exception as exc:
                raise PlanError(self._context(i, exc)) from exc
        self._drop_unread()
        return self

    def _context(self, i: int, exc: Exception) -> str:
        """What failed, with the neighbouring steps (like ``torch.fx.Interpreter``)."""
        steps = self.plan.steps
        step = steps[i]
        near = "\n".join(f"  {'>' if j == i else ' '} {j:5d}  {steps[j].format()}"
                         for j in range(max(0, i - 2), min(len(steps), i + 3)))
        return (f"while executing plan step {i} ({step.format()}) on "
                f"{self.graph.types[step.node]} #{step.node}: {type(exc).__name__}: {exc}\n"
                f"{near}")

    def book(self) -> Book:
        """The ledger's raw material: results, what flows on, what was absorbed."""
        return Book(list(self.results), list(self.through), list(self.absorbed), None)

    # -- value ops ----------------------------------------------------------------------------

    def value_op(self, op: ValueOp) -> None:
        # looked up per call: bound methods stored on the instance would form a reference
        # cycle that keeps the whole autograd graph alive until the cyclic GC runs
        getattr(self, _VALUE_OPS[op.kind])(op)

    def op_leaf(self, op: ValueOp) -> None:
        self.val[op.outs[0]] = self.nodes[op.node].variable

    def op_saved(self, op: ValueOp) -> None:
        self.val[op.outs[0]] = plain_value(read_saved(self.nodes[op.node], op.attr))

    def op_base(self, op: ValueOp) -> None:
        base = read_saved(self.nodes[op.node], op.attr)._base
        if base is None:
            raise PlanError(f"#{op.node}.{op.attr} is no longer a view: stale plan")
        self.val[op.outs[0]] = base

    def op_rec(self, op: ValueOp) -> None:
        value = self.graph.recorded.get((op.node, int(op.attr)))
        if value is None:
            raise UnrecoverableValueError(
                f"this plan reads the value of {self.graph.types[op.node]} #{op.node} as "
                "recorded during the forward pass (autograd keeps it nowhere), and this forward "
                "was not recorded: explain with lrpplan.explain(model, ...) or an Explainer, "
                "which run and record the forward; lrpplan.attribute cannot")
        self.val[op.outs[0]] = value

    def op_meta(self, op: ValueOp) -> None:
        if op.attr == "out_shapes":
            shapes = tuple(tuple(m.shape) for m in self.nodes[op.node]._input_metadata)
        else:
            shapes = tuple(None if e is None else
                           tuple(self.nodes[e[0]]._input_metadata[e[1]].shape)
                           for e in self.graph.edges[op.node])
        self.val[op.outs[0]] = shapes

    def op_backward(self, op: ValueOp) -> None:
        self.val[op.outs[0]] = self.nodes[op.node]

    def _attrs(self, op: ValueOp, n_reads: int) -> dict[str, Any]:
        a = dict(op.params.get("attrs") or {})
        reads = op.params.get("reads") or ()
        for name, slot in zip(reads, op.ins[len(op.ins) - n_reads:]):
            a[name] = self.val[slot]
        return a

    def op_fwd(self, op: ValueOp) -> None:
        n_reads = len(op.params.get("reads") or ())
        a = self._attrs(op, n_reads)
        ins = [self.val[s] if s >= 0 else None for s in op.ins[:len(op.ins) - n_reads]]
        for slot, v in zip(op.outs, OPS[op.params["node_type"]].forward(ins, a)):
            if slot >= 0:
                self.val[slot] = v

    def op_unview(self, op: ValueOp) -> None:
        a = self._attrs(op, len(op.ins) - 1)
        self.val[op.outs[0]] = OPS[op.params["node_type"]].inverse(self.val[op.ins[0]], a)

    def op_sub(self, op: ValueOp) -> None:
        self.val[op.outs[0]] = self.val[op.ins[0]] - self.val[op.ins[1]]

    # -- relevance ----------------------------------------------------------------------------

    def deposit(self, slot: int, t: torch.Tensor) -> None:
        """Aggregate relevance arriving on an edge (input aggregation, paper App. E)."""
        cur = self.rel.get(slot)
        self.rel[slot] = t if cur is None else cur + t

    def rule(self, s: Step, call: RuleCall) -> None:
        for op in s.chain:
            self.value_op(op)
        # each edge slot is read once, by its producer
        rel = [self.rel.pop(slot, None) if slot >= 0 else None for slot in s.rel_in]
        self._received(s, rel)
        x = dict(call.attrs)
        val = self.val
        for key, slot in s.vals:
            x[key] = val[slot]
        out = call.run(rel, x, call.params)
        self._check(s, call, out)
        absorbed = [out[-1]] if call.absorbs else []
        for pos, slot in enumerate(s.rel_out):
            t = out[pos]
            if slot < 0:
                if t is not None:  # relevance on an edge that leads nowhere: dropped
                    absorbed.append(t.sum())
                continue
            if t is None:
                raise LRPError(f"rule {s.rule!r} gave no relevance for input {pos} of "
                               f"{self.graph.types[s.node]} #{s.node}")
            if call.fit:
                t = sum_to(t, x["in_shapes"][pos])
            self.deposit(slot, t)
        self._booked(s.node, absorbed)

    def fused(self, step: Step, calls: list[RuleCall]) -> None:
        for op in step.chain:
            self.value_op(op)
        for b, call in zip(step.body, calls):
            self.rule(b, call)

    def collect(self, s: Step, _: Any = None) -> None:
        slot = s.rel_in[0]
        k = s.params["target"]
        if s.params.get("keep"):  # flows on into the producer, whose rule may work in place
            t = self.rel[slot].clone()
            self.through[k] = True
        else:
            t = self._take(slot)
        cur = self.results[k]
        self.results[k] = t if cur is None else cur + t

    # -- ledger hooks (the totals here; the detail in DetailedExecutor) -------------------------

    def _take(self, slot: int) -> torch.Tensor:
        return self.rel.pop(slot)

    def _received(self, s: Step, rel: list) -> None:
        """Relevance a step took (the detail books its sums)."""

    def _check(self, s: Step, call: RuleCall, out: Sequence[Any]) -> None:
        """A rule's output (the tracing executor checks it)."""

    def _booked(self, node: int, absorbed: list[torch.Tensor]) -> None:
        self.absorbed += [(node, a) for a in absorbed]

    def _drop_unread(self) -> None:
        """Relevance deposited on an edge no step read: booked as dropped."""
        for slot in list(self.rel):
            self.absorbed.append((DROPPED, self.rel.pop(slot).sum()))


class DetailedExecutor(Executor):
    """An :class:`Executor` that also books Σ relevance received and sent per node (one
    reduction per deposit; relevance a rule passes on unchanged keeps the sums it came with),
    so the ledger can name a node that creates or loses relevance."""

    def __init__(self, graph: Graph, plan: Plan, program: Optional[Program] = None) -> None:
        super().__init__(graph, plan, program)
        #: Σ of each deposit into a slot
        self.rel_sum: dict[int, list[torch.Tensor]] = {}
        #: (node, sums received, sums sent, sums absorbed)
        self.rows: list[tuple[int, list, list, list]] = []
        self._in_sums: list[torch.Tensor] = []
        self._out_sums: list[torch.Tensor] = []
        # relevance tensors received, passed on unchanged keep their sums (weak: a rule may
        # free them)
        self._passed: list[tuple[weakref.ref, list[torch.Tensor]]] = []

    def deposit(self, slot: int, t: torch.Tensor) -> None:
        super().deposit(slot, t)
        sums = next((list(known) for ref, known in self._passed if ref() is t), None)
        if sums is None:
            sums = [t.sum()]
        self.rel_sum.setdefault(slot, []).extend(sums)
        self._out_sums += sums

    def _take(self, slot: int) -> torch.Tensor:
        self.rel_sum.pop(slot, None)
        return super()._take(slot)

    def _received(self, s: Step, rel: list) -> None:
        self._in_sums, self._out_sums, self._passed = [], [], []
        for slot, t in zip(s.rel_in, rel):
            if slot >= 0 and t is not None:
                sums = self.rel_sum.pop(slot, [])
                self._in_sums += sums
                self._passed.append((weakref.ref(t), sums))

    def _booked(self, node: int, absorbed: list[torch.Tensor]) -> None:
        super()._booked(node, absorbed)
        self.rows.append((node, self._in_sums, self._out_sums, absorbed))
        self._in_sums, self._out_sums, self._passed = [], [], []

    def _drop_unread(self) -> None:
        for slot in list(self.rel):
            self.rel.pop(slot)
            sums = self.rel_sum.pop(slot, [])
            self.rows.append((DROPPED, list(sums), [], list(sums)))
            self.absorbed += [(DROPPED, t) for t in sums]

    def book(self) -> Book:
        return Book(list(self.results), list(self.through), list(self.absorbed), self.rows)


class TracingExecutor(DetailedExecutor):
    """The first explanation of a graph: the ledger's detail, and every rule's output checked:
    one item per input (plus the absorbed 0-d tensor where the rule reports one), and relevance
    of its input's shape (summed back only for ops that broadcast), never a broadcast by
    accident. A mismatch is a :class:`~lrpplan.errors.RuleError` naming the node and the rule."""

    def _check(self, s: Step, call: RuleCall, out: Sequence[Any]) -> None:
        graph = self.graph
        where = f"{graph.types[s.node]} ({graph.describe(s.node)})"
        want = len(s.rel_out) + (1 if call.absorbs else 0)
        if len(out) != want:
            raise RuleError(
                f"rule {s.rule!r} on {where} returned {len(out)} items, expected {want} "
                f"(relevance per input{' and the absorbed relevance' if call.absorbs else ''})")
        if call.absorbs and not (isinstance(out[-1], torch.Tensor) and out[-1].dim() == 0):
            raise RuleError(f"rule {s.rule!r} on {where} must report what it absorbs as a 0-d "
                            f"tensor, got {type(out[-1]).__name__}")
        for pos, (slot, e) in enumerate(zip(s.rel_out, graph.edges[s.node])):
            t = out[pos]
            if slot < 0 or t is None or e is None:
                continue
            shape = tuple(graph.nodes[e[0]]._input_metadata[e[1]].shape)
            got = tuple(t.shape)
            if got == shape or (call.fit and _broadcasts_to(shape, got)):
                continue
            raise RuleError(
                f"rule {s.rule!r} on {where} gave relevance of shape {list(got)} for input "
                f"{pos}, whose shape is {list(shape)}: every rule's relevance must have its "
                "input's shape (a rule for a shape-changing node must map relevance back like "
                "its gradient, e.g. 'route')")


def _broadcasts_to(shape: tuple, got: tuple) -> bool:
    try:
        return torch.broadcast_shapes(shape, got) == torch.Size(got)
    except RuntimeError:
        return False


#: value-op kind -> the executor method that runs it
_VALUE_OPS: dict[str, str] = {kind: "op_" + kind for kind in VALUE_KINDS}
