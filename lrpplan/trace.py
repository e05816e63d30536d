"""First explanation of a graph: compile its plan with the Promise traversal.

The traversal follows the paper's heuristic (§4.2): a stack of nodes whose relevance inputs have
all arrived; a node propagates exactly once, after its consumers. At each node the rule decides
(structurally) what it needs; the value resolver (:mod:`lrpplan.promise`) plans how missing
forward values are recovered, through Promises where the graph holds them nowhere. Every decision
is structural, so the whole plan is compiled before any tensor is touched; the first explanation
then runs it with a checking subclass of the same executor a replay uses
(:class:`lrpplan.replay.TracingExecutor`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Optional, Sequence

from .errors import InvalidInputError, UnrecoverableValueError, UnsupportedOperation
from .fingerprint import PLAN_FORMAT_VERSION, torch_minor
from .graph import Edge, Graph
from .plan import Plan, Step, ValueOp
from .promise import Promise, PromiseBranch, ValueResolver, read_saved
from .rules.base import NodeInfo, get_rule
from .rules.custom import (COMPILED_REMEDY, UNSUPPORTED_HINTS, compiled_region, function_key,
                           unsupported_hint)
from .rules.routing import suggest_fallback

_RECORD_REMEDY = (" (it was overwritten in place, or its inputs were). lrpplan.explain(model, "
                  "...) and Explainer run the forward themselves and record such values; "
                  "lrpplan.attribute, which gets a finished forward, cannot")


def compile_plan(graph: Graph, targets: Sequence[Mapping[str, Any]], ruleset: Any, key: str,
                 module_of: Optional[Mapping[int, str]] = None) -> Plan:
    """Compile the plan that explains ``graph`` towards ``targets`` with ``ruleset``.

    ``targets``: one dict per attribution target, ``{"edge": [node, output_nr], "kind":
    "tensor"|"tokens", "index": input}``; ``module_of``: node id -> path of the module that ran
    it (for per-module rules); ``key``: the graph's fingerprint, stored in the plan.
    """
    return PlanCompiler(graph, targets, ruleset, module_of).compile(key)


class PlanCompiler:
    """Walks one graph in the paper's order and records a plan step per node."""

    def __init__(self, graph: Graph, targets: Sequence[Mapping[str, Any]], ruleset: Any,
                 module_of: Optional[Mapping[int, str]] = None) -> None:
        self.g = graph
        self.module_of = dict(module_of or {})
        self.targets = [dict(t) for t in targets]
        self.ruleset = ruleset
        self.target_of: dict[Edge, int] = {tuple(t["edge"]): k for k, t in enumerate(self.targets)}
        self.rel_slot: dict[Edge, int] = {}
        self.values = ValueResolver(graph)
        self.steps: list[Step] = []
        self.promises: list[Promise] = []
        #: edge -> every relevance deposited on it is zero wherever the edge's value is zero
        #: (structural; roots are never assumed to be: a caller's seed can be anything)
        self.zero_where_zero: dict[Edge, bool] = {r: False for r in graph.roots}
        self.assumptions: list[str] = []
        #: nodes whose rule took a value autograd did not keep (a frozen bias) as 0
        self.constants_taken_as_zero = 0
        self._live = self._liveness()

    def _slot(self, edge: Edge) -> int:
        return self.rel_slot.setdefault(edge, len(self.rel_slot))

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

    def compile(self, key: str) -> Plan:
        g = self.g
        if not any(self._live[r[0]] or r in self.target_of for r in g.roots):
            raise InvalidInputError(
                "no input can receive relevance: none of the requested inputs is reachable "
                "from the explained output through the autograd graph")
        root_slots = [self._slot(r) for r in g.roots]
        active, pending = self._schedule()
        stack: list[int] = []
        for r in g.roots:
            if pending[r[0]] == 0 and r[0] not in stack:
                stack.append(r[0])
        fused: Optional[tuple[Step, list[Step], set[int]]] = None
        while stack:
            n = stack.pop()
            for edge, k in self._targets_at(n):
                if edge in self.rel_slot:
                    # the relevance stays in its slot when it flows on into the producer
                    keep = bool(active[n] and self._live[n])
                    fused = self._close(fused)
                    self.steps.append(Step("collect", n, rel_in=(self.rel_slot[edge],),
                                           params={"target": k, "keep": keep}))
            if not (active[n] and self._live[n]):
                continue
            step, promise = self._rule_step(n)
            if step is not None:
                if promise is not None:
                    fused = self._close(fused)
                    fused = (step, [], set(promise.internal_nodes()))
                elif fused is not None and n in fused[2]:
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
        return self._finish(key, root_slots)

    def _targets_at(self, n: int) -> list[tuple[Edge, int]]:
        return [(e, k) for e, k in self.target_of.items() if e[0] == n]

    def _close(self, fused):
        if fused is not None:
            origin, body, _ = fused
            self.steps.append(Step("fused", origin.node, chain=origin.chain,
                                   body=(replace(origin, chain=()), *body)))
        return None

    def _unsupported(self, m: int) -> UnsupportedOperation:
        g = self.g
        node_m, type_m = g.nodes[m], g.types[m]
        if compiled_region(node_m, type_m):  # no fallback can fit: say what to pass
            return UnsupportedOperation(type_m, g.describe(m), fallback=None,
                                        remedy=COMPILED_REMEDY)
        fallback, reason = suggest_fallback(
            node_m, [None if e is None else self._shape(e) for e in g.edges[m]])
        known = UNSUPPORTED_HINTS.get(type_m, "")
        hint = " ".join(h for h in (known, unsupported_hint(node_m, type_m, not known)) if h)
        return UnsupportedOperation(type_m, g.describe(m), hint, fallback, reason,
                                    function=function_key(node_m))

    def _rule_step(self, n: int) -> tuple[Optional[Step], Optional[Promise]]:
        g, values = self.g, self.values
        node, ntype, edges = g.nodes[n], g.types[n], g.edges[n]
        n_out = max(1, len(node._input_metadata))
        rel_in = tuple(self.rel_slot.get((n, nr), -1) for nr in range(n_out))
        if all(s < 0 for s in rel_in):
            return None, None  # no relevance arrived (structurally): nothing to propagate
        # a custom autograd Function node is known by its class (qualified name), never by a
        # type name another class may share
        function = function_key(node)
        spec = values.spec(n)
        first = spec is not None and spec.rule == "linear" and self._first_layer(n)
        rule_name, params = self.ruleset.resolve(ntype, first_layer=first,
                                                 module=self.module_of.get(n), function=function)
        if rule_name is None:
            raise self._unsupported(n)
        rule = get_rule(rule_name)
        attrs = spec.static(node) if spec is not None else {}
        info = NodeInfo(
            node=node, node_type=ntype, n_inputs=len(edges), n_outputs=n_out,
            live_inputs=tuple(self.edge_live(e) for e in edges),
            none_inputs=tuple(e is None for e in edges),
            input_shapes=tuple(self._shape(e) for e in edges) if (spec and spec.broadcasts)
            else (None,) * len(edges),
            output_shapes=tuple(tuple(m.shape) for m in node._input_metadata),
            recoverable=lambda i: self._own(n, i) is not None
            or values.recoverable(edges[i] if i < len(edges) else None),
            params=params, first_layer=first,
            source_type=lambda i: self._source_type(edges[i] if i < len(edges) else None),
            output_available=lambda: n_out == 1 and values.direct((n, 0)) is not None,
            position=g.describe(n), attrs=attrs, spec=spec,
        )
        decision = rule.decide(info)
        if decision.assumption and not decision.lost_constant:
            self.assumptions.append(f"#{n} {decision.assumption}")
        chain: list[ValueOp] = []
        vals: list[tuple[Any, int]] = []
        promise: Optional[Promise] = None
        for pos in decision.values:
            own = self._own(n, pos)
            if own is not None:
                vals.append((pos, values.read("saved", n, own, chain)))
                continue
            e = edges[pos] if pos < len(edges) else None
            if e is None or not values.recoverable(e):
                blocker = values.blocked_by.get(e) if e is not None else None
                if blocker is not None:
                    raise self._unsupported(blocker)
                raise UnrecoverableValueError(
                    f"{ntype} ({g.describe(n)}) needs the forward value of input {pos}, which "
                    "autograd saved nowhere and which cannot be recomputed from the graph"
                    + ("" if g.recorded else _RECORD_REMEDY))
            branch = None
            if e not in values.slots and values.recipe(e)[0] == "fwd":
                if promise is None:
                    promise = Promise(n)
                branch = PromiseBranch(pos, e)
                promise.branches.append(branch)
            vals.append((pos, values.materialize(e, chain, branch)))
        nonneg_output = self._own_output(n, decision, chain, vals)
        if decision.lost_constant and not any(key == "out" for key, _ in vals):
            # the output would have recovered the constant; without it the constant is 0
            self.assumptions.append(f"#{n} {decision.assumption}")
            self.constants_taken_as_zero += 1
        reads = (spec.reads if spec is not None else ()) + decision.reads
        meta = spec.meta if spec is not None else ()
        if spec is not None and spec.broadcasts and "in_shapes" not in meta:
            meta += ("in_shapes",)  # the executor sums broadcast relevance back
        vals += values.attribute_slots(n, tuple(dict.fromkeys(reads)), meta, chain)
        rel_out = tuple(self._slot(e) if (send and self.edge_live(e)) else -1
                        for e, send in zip(edges, decision.send))
        merged = {**params, **decision.params, "send": [s >= 0 for s in rel_out], "node_type": ntype,
                  "attrs": attrs}
        if decision.backward:  # the op's own backward, read as a value
            vals.append(("backward", values.read("backward", n, "", chain)))
            merged["node_vjp"] = True
        if nonneg_output:
            merged["output_nonneg"] = True
        if function is not None:
            merged["function"] = function  # the class, by name: for reading a plan
        step = Step("rule", n, rule_name, rel_in, rel_out, tuple(vals), merged, tuple(chain))
        self._note_zeros(step, edges)
        if promise is not None:
            self.promises.append(promise)
        return step, promise

    def _own_output(self, n: int, decision: Any, chain: list[ValueOp],
                    vals: list[tuple[Any, int]]) -> bool:
        """Give the rule its node's forward output where a consumer already saved it (no
        recomputation at run time), as ``vals["out"]``; True when the value given is a ReLU's
        result standing in for it (≥ 0)."""
        values = self.values
        if not decision.params.get("reuse_output") or len(self.g.nodes[n]._input_metadata) > 1:
            return False
        held = None if (n, 0) in values.slots else values.direct((n, 0))
        if held is not None or (n, 0) in values.slots:
            if held is not None:  # never a forward replay recipe memoised earlier
                values.recipes[(n, 0)] = held
            vals.append(("out", values.materialize((n, 0), chain)))
            return False
        relu = self._stand_in(n)
        if relu is None:
            return False
        # relu(z) for z: the two differ only where relu(z) = 0, and there the relevance
        # arriving is exactly 0 (every consumer's rule is x-proportional), so the rule
        # divides 0 by a nonzero number either way; no recomputation of z
        vals.append(("out", values.read("saved", relu, "_saved_result", chain)))
        return True

    def _note_zeros(self, step: Step, edges: Sequence[Optional[Edge]]) -> None:
        """Record, per input edge, whether this step's relevance is zero where its value is."""
        rule = get_rule(step.rule)
        ok = rule.proportional(step.params) or (rule.routes_relevance and all(
            self.zero_where_zero.get((step.node, nr), False)
            for nr, slot in enumerate(step.rel_in) if slot >= 0))
        for e, slot in zip(edges, step.rel_out):
            if slot >= 0 and e is not None:
                self.zero_where_zero[e] = self.zero_where_zero.get(e, True) and ok

    def _stand_in(self, n: int) -> Optional[int]:
        """The id of the node (a ReLU) that alone consumes node ``n``'s output, saved its result
        and receives relevance that is zero wherever that result is; else None."""
        cons = [(c, pos) for c, pos in self.g.consumers(n) if self.g.edges[c][pos] == (n, 0)]
        if len(cons) != 1:
            return None
        relu = cons[0][0]
        spec = self.values.spec(relu)
        if spec is None or not spec.stands_in or not self.zero_where_zero.get((relu, 0), False):
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
            spec = self.values.spec(e[0])
            if spec is None or not spec.rule or not (
                    spec.rule == "identity" or get_rule(spec.rule).routes_relevance):
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

    def _own(self, n: int, pos: int) -> Optional[str]:
        """The attribute holding input ``pos``'s value that node ``n`` saved itself."""
        spec = self.values.spec(n)
        attr = spec.saved_inputs.get(pos) if spec is not None else None
        if attr and read_saved(self.g.nodes[n], attr) is not None:
            return attr
        return None

    def _shape(self, e: Optional[Edge]) -> Optional[tuple[int, ...]]:
        if e is None:
            return None
        return tuple(self.g.nodes[e[0]]._input_metadata[e[1]].shape)

    # -- compile ------------------------------------------------------------------------------

    def _finish(self, key: str, root_slots: list[int]) -> Plan:
        steps = _with_value_frees(self.steps)
        self.assumptions.extend(self.values.assumptions)
        n_rule = sum(len(s.body) if s.kind == "fused" else s.kind == "rule" for s in steps)
        value_ops = [op for s in steps for op in _chains(s)]
        stats = {
            "nodes": len(self.g),
            "rule_steps": n_rule,
            "steps": len(steps),
            "promises": len(self.promises),
            "promise_branches": sum(len(p.branches) for p in self.promises),
            "fused_internal_nodes": sum(len(p.internal_nodes()) for p in self.promises),
            "max_promise_depth": max((p.depth() for p in self.promises), default=0),
            "promise_tree_nodes": sum(b.tree_nodes for p in self.promises for b in p.branches),
            "promise_density": len(self.promises) / max(1, len(self.g)),
            "constants_taken_as_zero": self.constants_taken_as_zero + self.values.lost_constants,
            # values read as recorded during the forward pass (lrpplan.recording)
            "recorded_values": sum(op.kind == "rec" for op in value_ops),
            # steps that call a node's own backward (no pure gradient: not fusable)
            "node_backward_reads": sum(op.kind == "backward" for op in value_ops),
        }
        header = {"format": PLAN_FORMAT_VERSION, "torch": torch_minor(), "roots": root_slots,
                  "rules": self.ruleset.config()}
        return Plan(key=key, header=header, steps=tuple(steps), n_rel=len(self.rel_slot),
                    n_val=self.values.n_val, targets=tuple(self.targets),
                    assumptions=tuple(dict.fromkeys(self.assumptions)), stats=stats)


def _chains(step: Step) -> list[ValueOp]:
    """The value ops of a step and of the steps in its body."""
    return list(step.chain) + [op for b in step.body for op in _chains(b)]


def _with_value_frees(steps: list[Step]) -> list[Step]:
    """Attach to each step the value slots whose last use it is (compile-time liveness)."""
    last: dict[int, int] = {}
    for i, s in enumerate(steps):
        for op in _chains(s):
            for v in op.ins + op.outs:
                last[v] = i
        for b in (s, *s.body):
            for _, v in b.vals:
                last[v] = i
    frees: dict[int, list[int]] = {}
    for v, i in last.items():
        if v >= 0:
            frees.setdefault(i, []).append(v)
    return [replace(s, free_val=tuple(sorted(frees[i]))) if i in frees else s
            for i, s in enumerate(steps)]
