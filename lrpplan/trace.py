"""First explanation of a graph: dynamic traversal with Promises that records a plan as it runs.

The traversal follows the paper's heuristic (§4.2): a stack of nodes whose relevance inputs have
all arrived; a node propagates exactly once, after its consumers. At each node the rule decides
(structurally) what it needs; missing forward values are recovered through Promises
(:mod:`lrpplan.promise`). Every step is recorded as plan data and executed by the same
:class:`~lrpplan.replay.Executor` methods a replay uses.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

from .errors import InvalidInputError, UnrecoverableValueError, UnsupportedOperation
from .fingerprint import PLAN_FORMAT_VERSION, torch_minor
from .graph import Edge, Graph
from .plan import Plan, Step, ValueOp
from .promise import Promise, PromiseBranch, ValueResolver, read_saved
from .replay import BoundStep, Executor
from .rules.base import OPS, NodeInfo, get_rule
from .rules.custom import (COMPILED_REMEDY, compiled_region, function_key, function_spec,
                           unsupported_hint)


_UNSUPPORTED_HINTS = {
    "CheckpointFunctionBackward": "Reentrant activation checkpointing hides a whole block in one "
    "node; explain with checkpointing off or with torch.utils.checkpoint(use_reentrant=False).",
}


_RECORD_REMEDY = (" (it was overwritten in place, or its inputs were). lrpplan.explain(model, "
                  "...) and Explainer run the forward themselves and record such values; "
                  "lrpplan.attribute, which gets a finished forward, cannot")


class Tracer:
    """Traces one graph and compiles its plan.

    Parameters
    ----------
    graph:
        the captured graph.
    targets:
        one dict per attribution target: ``{"edge": [node, output_nr], "kind": "tensor"|"tokens"}``.
    ruleset:
        a :class:`lrpplan.config.RuleSet`.
    module_of:
        node id -> path of the module that ran it (for per-module rules; optional).
    """

    def __init__(self, graph: Graph, targets: Sequence[Mapping[str, Any]], ruleset: Any,
                 module_of: Optional[Mapping[int, str]] = None) -> None:
        self.g = graph
        self.module_of = dict(module_of or {})
        self.targets = [dict(t) for t in targets]
        self.ruleset = ruleset
        self.target_of: dict[Edge, int] = {tuple(t["edge"]): k for k, t in enumerate(self.targets)}
        self.rel_slot: dict[Edge, int] = {}
        self.n_val = 0
        self.ex = Executor(graph, 0, 0, len(self.targets))
        self.values = ValueResolver(graph, self._new_val, self._exec_value)
        self.steps: list[Step] = []
        self.promises: list[Promise] = []
        #: edge -> every relevance deposited on it is zero wherever the edge's value is zero
        #: (structural; roots are never assumed to be: a caller's seed can be anything)
        self.zero_where_zero: dict[Edge, bool] = {r: False for r in graph.roots}
        self.assumptions: list[str] = []
        #: nodes whose rule took a value autograd did not keep (a frozen bias) as 0
        self.constants_taken_as_zero = 0
        self._live = self._liveness()

    # -- slots ------------------------------------------------------------------------------

    def _new_val(self) -> int:
        self.n_val += 1
        self.ex.val.append(None)
        return self.n_val - 1

    def _exec_value(self, op: ValueOp) -> None:
        self.ex.value_op(op)

    def _slot(self, edge: Edge) -> int:
        slot = self.rel_slot.get(edge)
        if slot is None:
            slot = len(self.rel_slot)
            self.rel_slot[edge] = slot
            self.ex.rel.append(None)
            self.ex.rel_sum.append([])
        return slot

    # -- structure ----------------------------------------------------------------------------

    def _liveness(self) -> list[bool]:
        """live[n]: relevance entering node n can reach an attribution target."""
        g = self.g
        live = [False] * len(g)
        for n in range(len(g) - 1, -1, -1):  # producers before consumers
            for e in g.edges[n]:
                if e is not None and (e in self.target_of or live[e[0]]):
                    live[n] = True
                    break
        return live

    def edge_live(self, e: Optional[Edge]) -> bool:
        return e is not None and (e in self.target_of or self._live[e[0]])

    def _schedule(self) -> tuple[list[bool], list[int]]:
        """Which nodes propagate, and how many relevance inputs each waits for."""
        g = self.g
        active = [False] * len(g)
        pending = [0] * len(g)
        # relevance flows on through an explained intermediate tensor (Captum LayerLRP's
        # semantics): each requested tensor gets what it gets when requested alone
        for r in g.roots:
            active[r[0]] = True
        for n in range(len(g)):
            if not (active[n] and self._live[n]):
                continue
            for e in g.edges[n]:
                if self.edge_live(e):
                    pending[e[0]] += 1
                    active[e[0]] = True
        return active, pending

    # -- the traversal -----------------------------------------------------------------------

    def run(self, seeds: Sequence[torch.Tensor]) -> tuple[Plan, Executor]:
        """Trace with one seed tensor per root; return the compiled plan and the executor."""
        g = self.g
        if not any(self._live[r[0]] or r in self.target_of for r in g.roots):
            raise InvalidInputError(
                "no input can receive relevance: none of the requested inputs is reachable "
                "from the explained output through the autograd graph")
        root_slots = []
        for r, seed in zip(g.roots, seeds):
            slot = self._slot(r)
            root_slots.append(slot)
            self.ex.deposit(slot, seed)
        active, pending = self._schedule()
        stack: list[int] = []
        for r in g.roots:
            if pending[r[0]] == 0 and r[0] not in stack:
                stack.append(r[0])
        fused: Optional[tuple[Step, list[Step], set[int]]] = None
        while stack:
            n = stack.pop()
            for nr_edge, k in self._targets_at(n):
                if nr_edge in self.rel_slot:
                    # the relevance stays in its slot when it flows on into the producer
                    keep = bool(active[n] and self._live[n])
                    step = Step("collect", n, rel_in=(self.rel_slot[nr_edge],),
                                params={"target": k, "keep": keep})
                    fused = self._close(fused)
                    self.steps.append(step)
                    self.ex.collect(step)
            if not (active[n] and self._live[n]):
                continue
            step, promise = self._rule_step(n)
            if step is not None:
                if promise is not None:
                    fused = self._close(fused)
                    fused = (step, [], set(promise.internal_nodes()))
                elif fused is not None and n in fused[2] and not step.chain:
                    fused[1].append(step)
                else:
                    fused = self._close(fused)
                    self.steps.append(step)
            for e in g.edges[n]:
                if self.edge_live(e):
                    pending[e[0]] -= 1
                    if pending[e[0]] == 0:
                        stack.append(e[0])
        self._close(fused)
        plan = self._finish(root_slots)
        self.values.release()
        return plan, self.ex

    def _targets_at(self, n: int) -> list[tuple[Edge, int]]:
        return [(e, k) for e, k in self.target_of.items() if e[0] == n]

    def _close(self, fused):
        if fused is not None:
            origin, body, _ = fused
            chain = origin.chain
            origin = _replace(origin, chain=())
            self.steps.append(Step("fused", origin.node, chain=chain, body=(origin, *body)))
        return None

    def _rule_step(self, n: int) -> tuple[Optional[Step], Optional[Promise]]:
        g = self.g
        node = g.nodes[n]
        ntype = g.types[n]
        n_out = max(1, len(node._input_metadata))
        rel_in = []
        for nr in range(n_out):
            e = (n, nr)
            rel_in.append(self.rel_slot.get(e, -1))
        if all(s < 0 for s in rel_in):
            return None, None  # no relevance arrived (structurally): nothing to propagate
        # a custom autograd Function node is known by its class (qualified name), never by a
        # type name another class may share
        function = function_key(node)
        spec = function_spec(node) if function is not None else OPS.get(ntype)
        first = spec is not None and spec.rule == "linear" and self._first_layer(n)
        rule_name, params = self.ruleset.resolve(ntype, first_layer=first,
                                                 module=self.module_of.get(n), function=function)
        from .replay import CheckedStep  # the tracer checks every rule's output; replays do not
        from .rules.routing import suggest_fallback

        def unsupported(m: int) -> UnsupportedOperation:
            node_m, type_m = g.nodes[m], g.types[m]
            if compiled_region(node_m, type_m):  # no fallback can fit: say what to pass
                return UnsupportedOperation(type_m, g.describe(m), fallback=None,
                                            remedy=COMPILED_REMEDY)
            fallback, reason = suggest_fallback(
                node_m, [None if e is None else self._shape(e) for e in g.edges[m]])
            known = _UNSUPPORTED_HINTS.get(type_m, "")
            hint = " ".join(h for h in (known, unsupported_hint(node_m, type_m, not known)) if h)
            return UnsupportedOperation(type_m, g.describe(m), hint, fallback, reason,
                                        function=function_key(node_m))

        if rule_name is None:
            raise unsupported(n)
        rule = get_rule(rule_name)
        edges = g.edges[n]
        info = NodeInfo(
            node=node, node_type=ntype, n_inputs=len(edges), n_outputs=n_out,
            live_inputs=tuple(self.edge_live(e) for e in edges),
            none_inputs=tuple(e is None for e in edges),
            input_shapes=tuple(self._shape(e) for e in edges) if (spec and spec.broadcasts)
            else (None,) * len(edges),
            output_shapes=tuple(tuple(m.shape) for m in node._input_metadata),
            recoverable=lambda i: self._own(spec, node, i) is not None
            or self.values.recoverable(edges[i] if i < len(edges) else None),
            params=params, first_layer=first,
            source_type=lambda i: self._source_type(edges[i] if i < len(edges) else None),
            output_available=lambda: n_out == 1 and self.values.direct((n, 0)) is not None,
            position=g.describe(n),
        )
        decision = rule.decide(info)
        if decision.assumption and not decision.lost_constant:
            self.assumptions.append(f"#{n} {decision.assumption}")
        chain: list[ValueOp] = []
        vals = []
        nonneg_output = False  # the node's output value given is a ReLU's result (≥ 0)
        promise: Optional[Promise] = None
        for pos in decision.values:
            own = self._own(spec, node, pos)
            if own is not None:
                vals.append((pos, own))
                continue
            e = edges[pos] if pos < len(edges) else None
            if e is None or not self.values.recoverable(e):
                blocker = self.values.blocked_by.get(e) if e is not None else None
                if blocker is not None:
                    raise unsupported(blocker)
                raise UnrecoverableValueError(
                    f"{ntype} ({g.describe(n)}) needs the forward value of input {pos}, which "
                    "autograd saved nowhere and which cannot be recomputed from the graph"
                    + ("" if g.recorded else _RECORD_REMEDY))
            branch = None
            if e not in self.values.slots and self.values.recipe(e)[0] == "fwd":
                if promise is None:
                    promise = Promise(n)
                branch = PromiseBranch(pos, e)
                promise.branches.append(branch)
            vals.append((pos, self.values.materialize(e, chain, branch)))
        if decision.params.get("reuse_output") and n_out == 1:
            # the forward output a consumer already saved: no recomputation at run time
            held = None if (n, 0) in self.values.slots else self.values.direct((n, 0))
            relu = self._relu_stand_in(n) if held is None else None
            if held is not None or (n, 0) in self.values.slots:
                if held is not None:  # never a forward replay recipe memoised earlier
                    self.values.recipes[(n, 0)] = held
                vals.append((len(edges), self.values.materialize((n, 0), chain)))
            elif relu is not None:
                # relu(z) for z: the two differ only where relu(z) = 0, and there the relevance
                # arriving is exactly 0 (every consumer's rule is x-proportional), so the rule
                # divides 0 by a nonzero number either way; no recomputation of z
                slot = self._new_val()
                self.values.emit(ValueOp("saved", relu, "_saved_result", (), (slot,)), chain)
                vals.append((len(edges), slot))
                nonneg_output = True
        if decision.lost_constant and not any(pos == len(edges) for pos, _ in vals):
            # the output would have recovered the constant; without it the constant is 0
            self.assumptions.append(f"#{n} {decision.assumption}")
            self.constants_taken_as_zero += 1
        rel_out = tuple(self._slot(e) if (send and self.edge_live(e)) else -1
                        for e, send in zip(edges, decision.send))
        merged = dict(params)
        merged.update(decision.params)
        merged["send"] = [s >= 0 for s in rel_out]
        if nonneg_output:
            merged["output_nonneg"] = True
        merged["node_type"] = ntype
        if function is not None:
            merged["function"] = function  # the class, by name: for reading a plan
        step = Step("rule", n, rule_name, tuple(rel_in), rel_out, tuple(vals), merged,
                    tuple(chain))
        self.ex.rule(CheckedStep(step, g))
        self._note_zeros(step, edges)
        if promise is not None:
            self.promises.append(promise)
        return step, promise

    def _note_zeros(self, step: Step, edges: Sequence[Optional[Edge]]) -> None:
        """Record, per input edge, whether this step's relevance is zero where its value is."""
        rule = get_rule(step.rule)
        ok = rule.proportional(step.params) or (rule.routes_relevance and all(
            self.zero_where_zero.get((step.node, nr), False)
            for nr, slot in enumerate(step.rel_in) if slot >= 0))
        for e, slot in zip(edges, step.rel_out):
            if slot >= 0 and e is not None:
                self.zero_where_zero[e] = self.zero_where_zero.get(e, True) and ok

    def _relu_stand_in(self, n: int) -> Optional[int]:
        """The id of the ReLU that alone consumes node ``n``'s output, saved its result and
        receives relevance that is zero wherever that result is; else None."""
        cons = [(c, pos) for c, pos in self.g.consumers(n) if self.g.edges[c][pos] == (n, 0)]
        if len(cons) != 1 or self.g.types[cons[0][0]] != "ReluBackward0":
            return None
        relu = cons[0][0]
        if not self.zero_where_zero.get((relu, 0), False):
            return None
        if read_saved(self.g.nodes[relu], "_saved_result") is None:
            return None
        return relu

    def _below_routing(self, e: Optional[Edge]) -> Optional[Edge]:
        """Follow ``e`` down through routing/identity nodes with one live input, to the first
        other node or to an explained tensor that relevance does not flow on from (the input
        layer is the one next to the deepest explained tensors)."""
        g = self.g
        while e is not None and not self._terminal_target(e):
            spec = OPS.get(g.types[e[0]])
            if spec is None or not (spec.rule == "identity"
                                    or get_rule(spec.rule).routes_relevance):
                return e
            live = [c for c in g.edges[e[0]] if self.edge_live(c)]
            if len(live) != 1:
                return e
            e = live[0]
        return e

    def _first_layer(self, n: int) -> bool:
        """A linear node one of whose explained operands comes straight from an input."""
        return any(self.edge_live(e) and self._terminal_target(self._below_routing(e))
                   for e in self.g.edges[n])

    def _terminal_target(self, e: Optional[Edge]) -> bool:
        return e is not None and e in self.target_of and not self._live[e[0]]

    def _source_type(self, e: Optional[Edge]) -> str:
        end = self._below_routing(e)
        if end is None or self._terminal_target(end):
            return ""
        return self.g.types[end[0]]

    @staticmethod
    def _own(spec, node, pos) -> Optional[str]:
        attr = spec.saved_inputs.get(pos) if spec is not None else None
        if attr and read_saved(node, attr) is not None:
            return attr
        return None

    def _shape(self, e: Optional[Edge]) -> Optional[tuple[int, ...]]:
        if e is None:
            return None
        return tuple(self.g.nodes[e[0]]._input_metadata[e[1]].shape)

    # -- compile ------------------------------------------------------------------------------

    def _finish(self, root_slots: list[int]) -> Plan:
        steps = _with_value_frees(self.steps)
        self.assumptions.extend(self.values.assumptions)
        internal = sum(len(p.internal_nodes()) for p in self.promises)
        n_rule = sum(1 for s in steps for _ in (s.body if s.kind == "fused" else
                                                 ([s] if s.kind == "rule" else [])))
        stats = {
            "nodes": len(self.g),
            "rule_steps": n_rule,
            "steps": len(steps),
            "promises": len(self.promises),
            "promise_branches": sum(len(p.branches) for p in self.promises),
            "fused_internal_nodes": internal,
            "max_promise_depth": max((p.depth() for p in self.promises), default=0),
            "promise_tree_nodes": sum(b.tree_nodes for p in self.promises for b in p.branches),
            "promise_density": len(self.promises) / max(1, len(self.g)),
            "constants_taken_as_zero": self.constants_taken_as_zero + self.values.lost_constants,
            # values read as recorded during the forward pass (lrpplan.recording)
            "recorded_values": sum(op.kind == "rec" for s in steps for op in _chains(s)),
        }
        header = {"format": PLAN_FORMAT_VERSION, "torch": torch_minor(), "roots": root_slots,
                  "rules": self.ruleset.config()}
        return Plan(key="", header=header, steps=tuple(steps), n_rel=len(self.rel_slot),
                    n_val=self.n_val, targets=tuple(self.targets),
                    assumptions=tuple(dict.fromkeys(self.assumptions)), stats=stats)


def _chains(step: Step) -> list[ValueOp]:
    """The value ops of a step and of the steps in its body."""
    return list(step.chain) + [op for b in step.body for op in _chains(b)]


def _replace(step: Step, **changes: Any) -> Step:
    fields = {f: getattr(step, f) for f in step.__slots__}
    fields.update(changes)
    return Step(**fields)


def _with_value_frees(steps: list[Step]) -> list[Step]:
    """Attach to each step the value slots whose last read it is (compile-time liveness)."""
    last: dict[int, int] = {}

    def reads(s: Step) -> list[int]:
        out = [v for op in s.chain for v in op.ins if v >= 0]
        out += [src for _, src in s.vals if isinstance(src, int)]
        for b in s.body:
            out += reads(b)
        return out

    def writes(s: Step) -> list[int]:
        out = [v for op in s.chain for v in op.outs if v >= 0]
        for b in s.body:
            out += writes(b)
        return out

    for i, s in enumerate(steps):
        for v in writes(s) + reads(s):
            last[v] = i
    frees: dict[int, list[int]] = {}
    for v, i in last.items():
        frees.setdefault(i, []).append(v)
    return [_replace(s, free_val=tuple(sorted(frees.get(i, ())))) if i in frees else s
            for i, s in enumerate(steps)]
