"""Promises: recovering forward values the autograd graph did not save (paper §4.3, App. D–E).

A rule that needs an input value (the z-rule of an addition, the logits of a softmax, the input
of a mean) asks for the value flowing along one input edge. If the graph holds
it (a leaf's variable, the producer's saved result, a *sibling* consumer's saved input, the
``_base`` of a saved view, an invertible view's output, an addition's output minus its other
operand) it is read directly. Otherwise a :class:`Promise` is opened at the rule's node (the
*origin*) with one :class:`PromiseBranch` per missing input. A branch walks down the graph through
nodes that saved nothing useful (its *internal* nodes) until it reaches *Arg* nodes whose outputs
can be had, then the forward chain re-runs the internal nodes' forward ops back up to the origin.
An internal node with several missing inputs opens a nested Promise: a Promise tree.

How the paper's mechanics map onto this resolver:

- *Pre-Promises* (App. D.3): branches always reach ahead of the traversal frontier to their Arg
  nodes without propagating relevance; relevance through internal nodes follows later, when the
  traversal reaches them, so the deadlock of §4.3.3 cannot occur.
- *Input aggregation* (App. E): resolved values are memoised per edge, so two Promises never
  replay the same internal node twice (internal nodes are disjoint across Promises), and relevance
  reaching a node from several consumers is summed before the node propagates, exactly once.

The resolver is structural and runs nothing: :meth:`ValueResolver.recipe` decides *how* a value
is recovered, :meth:`ValueResolver.materialize` appends the :class:`~lrpplan.plan.ValueOp` list
(the forward chain a plan stores inside a fused step) and returns the value slot. Every op fact
it uses (views, inverses, sums, leaves, forward replays) comes from the op specs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import GraphFreedError
from .graph import Edge, Graph
from .plan import ValueOp
from .rules.base import OpSpec
from .rules.custom import spec_for
from .rules.layout import broadcast_pattern

#: ("leaf", node) | ("saved"|"base"|"rec", node, attr) | ("unview", node, out_edge)
#: | ("diff", add, out_edge, other_edge) | ("fwd", node, {pos: Edge | ("saved", node, attr) | None})
Recipe = tuple


def read_saved(node: Any, attr: str) -> Any:
    """``getattr(node, attr)`` that tells a freed graph from a tensor modified in place."""
    try:
        return getattr(node, attr)
    except RuntimeError as exc:
        msg = str(exc)
        if "backward through the graph a second time" in msg or "already been freed" in msg:
            raise GraphFreedError(
                "the graph's saved tensors were freed by an earlier backward()/autograd.grad(); "
                "explain before calling backward, or pass retain_graph=True to it") from exc
        if "modified by an inplace operation" in msg:
            return None
        raise


@dataclass
class PromiseBranch:
    """The search for one missing input value of a Promise's origin.

    ``internal`` lists the nodes this branch forward-replays (its Promise tree, flattened in
    replay order), ``arg_nodes`` where it found values, ``depth`` the longest chain of replayed
    nodes from an Arg node up to the origin, and ``tree_nodes`` the internal nodes that needed
    several replayed inputs themselves (nested Promises: where the tree branches).
    """

    input_pos: int
    edge: Edge
    arg_nodes: list[int] = field(default_factory=list)
    internal: list[int] = field(default_factory=list)
    depth: int = 0
    tree_nodes: int = 0


@dataclass
class Promise:
    """Deferred propagation at ``origin`` until its missing input values are recovered."""

    origin: int
    branches: list[PromiseBranch] = field(default_factory=list)

    def depth(self) -> int:
        """Longest forward chain (number of replayed nodes) over all branches."""
        return max((b.depth for b in self.branches), default=0)

    def internal_nodes(self) -> list[int]:
        return [n for b in self.branches for n in b.internal]


class ValueResolver:
    """Finds forward values along graph edges and plans the value ops that recover them;
    memoises per edge and per graph read. Allocates value slots (``n_val``)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.n_val = 0
        self.recipes: dict[Edge, Optional[Recipe]] = {}
        self.slots: dict[Edge, int] = {}
        self._reads: dict[tuple[str, int, str], int] = {}
        self.fwd_outs: dict[int, tuple[int, ...]] = {}
        #: edge -> length of the longest forward-replay chain that produced its value
        self.depths: dict[Edge, int] = {}
        self.assumptions: list[str] = []
        #: forward replays of a linear map that took its bias, which autograd did not keep
        #: (frozen), as 0 (a mask operand taken as 0 is an assumption, not counted here)
        self.lost_constants = 0
        #: edge -> id of a node with no op spec that blocked its recovery
        self.blocked_by: dict[Edge, int] = {}
        self._specs = [spec_for(n, t) for n, t in zip(graph.nodes, graph.types)]

    def spec(self, node_id: int) -> Optional[OpSpec]:
        return self._specs[node_id]

    # -- graph reads ----------------------------------------------------------------------------

    def new_slot(self) -> int:
        self.n_val += 1
        return self.n_val - 1

    def read(self, kind: str, node: int, attr: str, chain: list[ValueOp]) -> int:
        """The slot of a graph read (``saved``, ``meta``, ``backward``...), planned once."""
        key = (kind, node, attr)
        slot = self._reads.get(key)
        if slot is None:
            slot = self._reads[key] = self.new_slot()
            chain.append(ValueOp(kind, node, attr, (), (slot,)))
        return slot

    def attribute_slots(self, node: int, names: tuple[str, ...], meta: tuple[str, ...],
                        chain: list[ValueOp]) -> list[tuple[str, int]]:
        """(name, slot) of the run-time attributes and shapes of ``node`` its op reads."""
        spec = self.spec(node)
        prefix = spec.attr_prefix if spec is not None else "_saved_"
        out = [(name, self.read("saved", node, prefix + name, chain)) for name in names]
        out += [(m, self.read("meta", node, m, chain)) for m in meta]
        return out

    # -- structural decision ----------------------------------------------------------------

    def direct(self, edge: Edge) -> Optional[Recipe]:
        """A source that holds the value already (no forward replay), or None.

        In order: a leaf's variable; the producer's saved output; a consumer's saved input;
        the ``_base`` of a view of the value that a consumer further down a chain of views
        saved; the held output of an invertible view or copy, inverted (``unview``).
        """
        g = self.graph
        pid, nr = edge
        spec = self.spec(pid)
        if spec is not None and spec.leaf:
            return ("leaf", pid)
        if spec is not None and nr in spec.saved_outputs:
            attr = spec.saved_outputs[nr]
            if read_saved(g.nodes[pid], attr) is not None:
                return ("saved", pid, attr)
        for c, pos in g.consumers(pid):
            if g.edges[c][pos] != edge:
                continue
            cspec = self.spec(c)
            attr = cspec.saved_inputs.get(pos) if cspec is not None else None
            if attr and read_saved(g.nodes[c], attr) is not None:
                return ("saved", c, attr)
        if not (spec is not None and spec.aliases):
            found = self._saved_view_base(edge)
            if found is not None:
                return found
        for c, pos in g.consumers(pid):
            cspec = self.spec(c)
            if g.edges[c][pos] == edge and cspec is not None and cspec.inverse is not None and (
                    (c, 0) in self.slots or self.direct((c, 0))):
                return ("unview", c, (c, 0))
        return None

    def _difference(self, edge: Edge) -> Optional[Recipe]:
        """``("diff", add, out_edge, other_edge)``: ``edge`` feeds ``out = edge + other`` and
        both ``out`` and ``other`` are held by the graph, so the value is ``out - other``.

        Cheaper than re-running the branch that produced it (a residual branch: a matmul); it
        differs from the exact value by one rounding of ``out``, which moves a z-rule's shares
        by at most ``ulp(out) / |out|`` of the relevance at ``out``.
        """
        g = self.graph
        meta = g.nodes[edge[0]]._input_metadata[edge[1]]
        for c, pos in g.consumers(edge[0]):
            spec = self.spec(c)
            if g.edges[c][pos] != edge or spec is None or not spec.sum_of_two \
                    or len(g.edges[c]) != 2:
                continue
            node = g.nodes[c]
            other = g.edges[c][1 - pos]
            if other is None or other == edge or spec.static(node).get("alpha", 1) != 1:
                continue
            out_meta = node._input_metadata[0]
            other_meta = g.nodes[other[0]]._input_metadata[other[1]]
            # the other operand may broadcast (a bias); this one must have the output's shape:
            # decided on the broadcast pattern and dtypes the plan key records for the add
            # (rules.layout.operand_facts), so a replay at other sizes makes the same choice
            if not (broadcast_pattern(meta.shape, out_meta.shape).same_shape
                    and meta.dtype == out_meta.dtype == other_meta.dtype):
                continue
            if self.direct((c, 0)) is not None and self.direct(other) is not None:
                return ("diff", c, (c, 0), other)
        return None

    def _saved_view_base(self, edge: Edge) -> Optional[Recipe]:
        """``("base", node, attr)``: a consumer down a chain of views of ``edge`` saved a view
        whose ``_base`` is the value on ``edge`` (same shape and dtype; checked here)."""
        g = self.graph
        meta = g.nodes[edge[0]]._input_metadata[edge[1]]
        shape, dtype = tuple(meta.shape), meta.dtype
        frontier, seen = [edge], {edge}
        while frontier:
            e = frontier.pop()
            for c, pos in g.consumers(e[0]):
                if g.edges[c][pos] != e:
                    continue
                cspec = self.spec(c)
                if cspec is not None and cspec.view:
                    for out in range(max(1, len(g.nodes[c]._input_metadata))):
                        if (c, out) not in seen:
                            seen.add((c, out))
                            frontier.append((c, out))
                    continue
                if e == edge:
                    continue  # a direct consumer's saved input is the value itself (see direct)
                attr = cspec.saved_inputs.get(pos) if cspec is not None else None
                t = read_saved(g.nodes[c], attr) if attr else None
                base = getattr(t, "_base", None)
                # the base must be the very tensor on ``edge`` (its autograd edge), not merely
                # one of its shape: shapes can coincide at one size (a size-1 dim) and not at
                # another, and the plan key holds no sizes
                if base is not None and base.dtype == dtype and tuple(base.shape) == shape \
                        and self._is_edge_tensor(base, edge):
                    return ("base", c, attr)
        return None

    def _is_edge_tensor(self, t: Any, edge: Edge) -> bool:
        """``t`` is the output ``edge`` of the graph (same autograd node and output number)."""
        if not getattr(t, "requires_grad", False) or t.grad_fn is None:
            return False
        return self.graph.index.get(t.grad_fn) == edge[0] and t.output_nr == edge[1]

    def recipe(self, edge: Edge) -> Optional[Recipe]:
        """How the value on ``edge`` can be had, or None if it cannot (memoised, iterative)."""
        if edge in self.recipes:
            return self.recipes[edge]
        g = self.graph
        stack = [edge]
        while stack:
            e = stack[-1]
            if e in self.recipes:
                stack.pop()
                continue
            found = self.direct(e) or self._difference(e)
            if found is not None:
                self.recipes[e] = found
                stack.pop()
                continue
            pid = e[0]
            spec = self.spec(pid)
            if spec is None or spec.forward is None:
                self.recipes[e] = self._recorded(e)
                if spec is None and self.recipes[e] is None:
                    self.blocked_by[e] = pid
                stack.pop()
                continue
            positions = spec.forward_inputs
            if positions is None:
                positions = tuple(range(len(g.edges[pid])))
            ins: dict[int, Any] = {}
            pending: list[Edge] = []
            ok = True
            for pos in positions:
                attr = spec.saved_inputs.get(pos)
                if attr and read_saved(g.nodes[pid], attr) is not None:
                    ins[pos] = ("saved", pid, attr)
                    continue
                child = g.edges[pid][pos] if pos < len(g.edges[pid]) else None
                if child is None:
                    if pos in spec.zero_operands or spec.forward_inputs is not None:
                        ins[pos] = None
                        continue
                    ok = False
                    break
                if child in self.recipes:
                    if self.recipes[child] is None:
                        if child in self.blocked_by:
                            self.blocked_by[e] = self.blocked_by[child]
                        ok = False
                        break
                    ins[pos] = child
                else:
                    pending.append(child)
            if not ok:
                self.recipes[e] = self._recorded(e)
                stack.pop()
            elif pending:
                stack.extend(pending)
            else:
                self.recipes[e] = ("fwd", pid, ins)
                stack.pop()
        return self.recipes[edge]

    def _recorded(self, edge: Edge) -> Optional[Recipe]:
        """``("rec", node, output)``: the value as recorded during the forward pass, the last
        resort when the graph neither holds nor can recompute it (:mod:`lrpplan.recording`)."""
        if edge in self.graph.recorded:
            return ("rec", edge[0], str(edge[1]))
        return None

    def recoverable(self, edge: Optional[Edge]) -> bool:
        return edge is not None and self.recipe(edge) is not None

    # -- materialisation ----------------------------------------------------------------------

    def materialize(self, edge: Edge, chain: list[ValueOp],
                    branch: Optional[PromiseBranch] = None) -> int:
        """Append (to ``chain``) the value ops recovering ``edge``; return its slot."""
        if edge in self.slots:
            return self.slots[edge]
        if self.recipe(edge) is None:
            raise KeyError(edge)
        stack: list[Edge] = [edge]
        while stack:
            e = stack[-1]
            if e in self.slots:
                stack.pop()
                continue
            rec = self.recipes[e]
            kind = rec[0]
            if kind in ("diff", "unview"):
                todo = [x for x in rec[2:] if x not in self.slots]
                if todo:
                    for x in todo:
                        self.recipes.setdefault(x, self.direct(x) or self._difference(x))
                    stack.extend(todo)
                    continue
                slot = self.new_slot()
                if kind == "diff":
                    chain.append(ValueOp("sub", rec[1], "", (self.slots[rec[2]],
                                                             self.slots[rec[3]]), (slot,)))
                else:
                    chain.append(self._pure_op("unview", rec[1], (self.slots[rec[2]],), (slot,),
                                               chain))
                self.slots[e] = slot
                stack.pop()
                continue
            if kind in ("leaf", "saved", "base", "rec"):
                self.slots[e] = self.read(kind, rec[1], rec[2] if kind != "leaf" else "", chain)
                if branch is not None:
                    branch.arg_nodes.append(rec[1])
                stack.pop()
                continue
            pid, ins = rec[1], rec[2]
            if pid in self.fwd_outs:  # another output of a multi-output node already replayed
                self.slots[e] = self.fwd_outs[pid][e[1]]
                self.depths[e] = self.depths[(pid, 0)] if (pid, 0) in self.depths else 1
                stack.pop()
                continue
            pending = [c for c in ins.values()
                       if isinstance(c, tuple) and len(c) == 2 and c not in self.slots]
            if pending:
                stack.extend(pending)
                continue
            self._forward(pid, ins, chain, branch)
            self.slots[e] = self.fwd_outs[pid][e[1]]
            stack.pop()
        if branch is not None:
            branch.depth = max(branch.depth, self.depths.get(edge, 0))
        return self.slots[edge]

    def _forward(self, pid: int, ins: dict, chain: list[ValueOp],
                 branch: Optional[PromiseBranch]) -> None:
        """Plan the forward replay of node ``pid`` from its planned inputs."""
        g, spec = self.graph, self.spec(pid)
        node_type = g.types[pid]
        in_slots = []
        n_in = max(len(g.edges[pid]), max(ins, default=-1) + 1)
        for pos in range(n_in):
            src = ins.get(pos)
            if src is None:
                if pos in ins and g.edges[pid][pos] is None and self._hides_value(pid, pos):
                    self.assumptions.append(
                        f"{node_type} #{pid}: forward value recomputed with its untracked "
                        f"operand {pos} (not saved by autograd) taken as 0")
                    if spec.rule == "linear":  # a frozen bias
                        self.lost_constants += 1
                in_slots.append(-1)
            elif len(src) == 3:  # the node's own saved input
                in_slots.append(self.read("saved", pid, src[2], chain))
            else:
                in_slots.append(self.slots[src])
        if spec.lossy:
            self.assumptions.append(f"{node_type} #{pid}: {spec.lossy}")
        outs = tuple(self.new_slot() for _ in range(max(1, len(g.nodes[pid]._input_metadata))))
        chain.append(self._pure_op("fwd", pid, tuple(in_slots), outs, chain))
        self.fwd_outs[pid] = outs
        child_depths = [self.depths.get(c, 0) for c in ins.values()
                        if isinstance(c, tuple) and len(c) == 2]
        depth = 1 + max(child_depths, default=0)
        for nr in range(len(outs)):
            self.depths[(pid, nr)] = depth
        if branch is not None:
            branch.internal.append(pid)
            if sum(d > 0 for d in child_depths) > 1:
                branch.tree_nodes += 1

    def _hides_value(self, pid: int, pos: int) -> bool:
        """A ``(None, 0)`` input of this node hides a real value (not an absent optional
        input): an operand of a sum, a frozen bias, an untracked ``where`` operand."""
        spec = self.spec(pid)
        if pos in spec.zero_operands:
            return True
        return spec.hides_value is not None and \
            pos in spec.hides_value(spec.static(self.graph.nodes[pid]))

    def _pure_op(self, kind: str, pid: int, ins: tuple[int, ...], outs: tuple[int, ...],
                 chain: list[ValueOp]) -> ValueOp:
        """A ``fwd`` / ``unview`` op of node ``pid``: its static attributes as params, the
        run-time attributes it reads as further inputs."""
        spec = self.spec(pid)
        reads = self.attribute_slots(pid, spec.reads, spec.meta, chain)
        params = {"node_type": self.graph.types[pid], "attrs": spec.static(self.graph.nodes[pid]),
                  "reads": [name for name, _ in reads]}
        return ValueOp(kind, pid, "", ins + tuple(slot for _, slot in reads), outs, params)
