"""Promises: recovering forward values the autograd graph did not save (paper §4.3, App. D–E).

A rule that needs an input value (the z-rule of an ``AddBackward0``, the logits of a softmax, the
input of a ``MeanBackward1``) asks for the value flowing along one input edge. If the graph holds
it (a leaf's variable, the producer's saved result, or a *sibling* consumer's saved input) it is
loaded directly. Otherwise a :class:`Promise` is opened at the rule's node (the *origin*) with one
:class:`PromiseBranch` per missing input. A branch walks down the graph through nodes that saved
nothing useful (its *internal* nodes) until it reaches *Arg* nodes whose outputs can be had, then
the forward chain re-runs the internal nodes' forward ops back up to the origin. An internal node
with several missing inputs opens a nested Promise: a Promise tree.

How the paper's mechanics map onto this resolver:

- *Pre-Promises* (App. D.3): branches always reach ahead of the traversal frontier to their Arg
  nodes without propagating relevance; relevance through internal nodes follows later, when the
  traversal reaches them, so the deadlock of §4.3.3 cannot occur.
- *Input aggregation* (App. E): resolved values are memoised per edge, so two Promises never
  replay the same internal node twice (internal nodes are disjoint across Promises), and relevance
  reaching a node from several consumers is summed before the node propagates, exactly once.

The resolver is structural: :meth:`ValueResolver.recipe` decides *how* a value is recovered
without touching tensors, :meth:`ValueResolver.materialize` emits the :class:`~lrpplan.plan.ValueOp`
list (the forward chain that a plan stores inside a fused step) and runs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from .errors import GraphFreedError
from .graph import Edge, Graph
from .plan import ValueOp
from .rules.base import OPS
from .rules.layout import broadcast_pattern, conv_has_bias
from .rules.routing import _dim

#: ("leaf", node) | ("saved", node, attr) | ("fwd", node, {pos: Edge | ("saved", node, attr) | None})
Recipe = tuple
_ZERO_OK = frozenset({"AddBackward0", "SubBackward0", "RsubBackward0", "AddBackward1",
                      "SubBackward1", "RsubBackward1"})


#: node types whose forward output is a view of their (single tracked) input: a value saved
#: further down such a chain is a view whose ``_base`` is the tensor entering the chain
_VIEW_OPS = frozenset({
    "ViewBackward0", "ReshapeAliasBackward0", "SelectBackward0", "SliceBackward0",
    "TransposeBackward0", "PermuteBackward0", "TBackward0", "UnsqueezeBackward0",
    "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "ExpandBackward0",
    "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0", "AliasBackward0",
    "AsStridedBackward0", "DiagonalBackward0", "NarrowBackward0", "UnfoldBackward0",
})
def _reshape_back(n: Any, t: Any) -> Any:
    return t.reshape(n._saved_self_sym_sizes)


def _unpermute(n: Any, t: Any) -> Any:
    dims = [_dim(d) % t.dim() for d in n._saved_dims]
    inverse = [0] * len(dims)
    for i, d in enumerate(dims):
        inverse[d] = i
    return t.permute(inverse)


#: single-input ops whose input value follows from their output value: type -> inverse
#: (``UnsafeView`` and ``Clone`` outputs are fresh tensors, so ``base`` cannot see through them)
INVERSES: dict[str, Callable[[Any, Any], Any]] = {
    "ViewBackward0": _reshape_back,
    "UnsafeViewBackward0": _reshape_back,
    "ReshapeAliasBackward0": _reshape_back,
    "SqueezeBackward0": _reshape_back,
    "SqueezeBackward1": _reshape_back,
    "SqueezeBackward2": _reshape_back,
    "UnsqueezeBackward0": lambda n, t: t.squeeze(_dim(n._saved_dim)),
    "TransposeBackward0": lambda n, t: t.transpose(_dim(n._saved_dim0),
                                                   _dim(n._saved_dim1)),
    "TBackward0": lambda n, t: t.t(),
    "PermuteBackward0": _unpermute,
    "CloneBackward0": lambda n, t: t,
    "AliasBackward0": lambda n, t: t,
}
#: producers whose output may alias something else (never the start of a ``base`` lookup)
_ALIASING = _VIEW_OPS | {"AccumulateGrad", "CopySlices"}

#: forward replays that cannot be exact, and what they assume
_LOSSY_FORWARD = {
    "ConstantPadNdBackward0": "forward value recomputed with the unsaved pad value taken as 0",
    "MaskedFillBackward0": "forward value recomputed with the unsaved fill value taken as 0 "
                           "(exact for a following softmax, which gives masked entries nothing)",
}


def _lost_operand(node_type: str, node: Any) -> bool:
    """A ``(None, 0)`` input of this node hides a real value (not an absent optional input)."""
    if node_type in _ZERO_OK or node_type in ("AddmmBackward0", "WhereBackward0"):
        return True
    if node_type == "ConvolutionBackward0":
        return conv_has_bias(node)
    return False


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
    """Finds and recovers forward values along graph edges; memoises per edge.

    Parameters
    ----------
    graph:
        the captured graph.
    new_slot:
        allocates a fresh value slot.
    execute:
        runs a :class:`ValueOp` against the live graph (the tracer's executor).
    """

    def __init__(self, graph: Graph, new_slot: Callable[[], int],
                 execute: Callable[[ValueOp], None]) -> None:
        self.graph = graph
        self.new_slot = new_slot
        self.execute = execute
        self.recipes: dict[Edge, Optional[Recipe]] = {}
        self.slots: dict[Edge, int] = {}
        self.fwd_outs: dict[int, tuple[int, ...]] = {}
        #: edge -> length of the longest forward-replay chain that produced its value
        self.depths: dict[Edge, int] = {}
        self.assumptions: list[str] = []
        #: forward replays of a linear map that took its bias, which autograd did not keep
        #: (frozen), as 0 (a mask operand taken as 0 is an assumption, not counted here)
        self.lost_constants = 0
        #: edge -> id of a node with no op spec that blocked its recovery
        self.blocked_by: dict[Edge, int] = {}

    # -- structural decision ----------------------------------------------------------------

    def direct(self, edge: Edge) -> Optional[Recipe]:
        """A source that holds the value already (no forward replay), or None.

        In order: a leaf's variable; the producer's saved output; a consumer's saved input;
        the ``_base`` of a view of the value that a consumer further down a chain of views
        saved; the held output of an invertible view or copy, inverted (``unview``).
        """
        g = self.graph
        pid, nr = edge
        ptype = g.types[pid]
        if ptype == "AccumulateGrad":
            return ("leaf", pid)
        spec = OPS.get(ptype)
        if spec is not None and nr in spec.saved_outputs:
            attr = spec.saved_outputs[nr]
            if read_saved(g.nodes[pid], attr) is not None:
                return ("saved", pid, attr)
        for c, pos in g.consumers(pid):
            if g.edges[c][pos] != edge:
                continue
            cspec = OPS.get(g.types[c])
            attr = cspec.saved_inputs.get(pos) if cspec is not None else None
            if attr and read_saved(g.nodes[c], attr) is not None:
                return ("saved", c, attr)
        if ptype not in _ALIASING:
            found = self._saved_view_base(edge)
            if found is not None:
                return found
        for c, pos in g.consumers(pid):
            if g.edges[c][pos] == edge and g.types[c] in INVERSES and (
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
            if g.edges[c][pos] != edge or g.types[c] != "AddBackward0" or len(g.edges[c]) != 2:
                continue
            node = g.nodes[c]
            other = g.edges[c][1 - pos]
            if other is None or other == edge or getattr(node, "_saved_alpha", 1) != 1:
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
                ctype = g.types[c]
                if ctype in _VIEW_OPS:
                    for out in range(max(1, len(g.nodes[c]._input_metadata))):
                        if (c, out) not in seen:
                            seen.add((c, out))
                            frontier.append((c, out))
                    continue
                if e == edge:
                    continue  # a direct consumer's saved input is the value itself (see direct)
                cspec = OPS.get(ctype)
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
            spec = OPS.get(g.types[pid])
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
                    if g.types[pid] in _ZERO_OK or pos in spec.zero_operands \
                            or spec.forward_inputs is not None:
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

    def release(self) -> None:
        """Drop the callbacks: they point back at the tracer, a reference cycle that would keep
        the autograd graph (every saved activation) alive until the cyclic GC runs."""
        self.new_slot = self.execute = _released

    def recoverable(self, edge: Optional[Edge]) -> bool:
        return edge is not None and self.recipe(edge) is not None

    # -- materialisation ----------------------------------------------------------------------

    def materialize(self, edge: Edge, chain: list[ValueOp],
                    branch: Optional[PromiseBranch] = None) -> int:
        """Emit (into ``chain``) and run the value ops recovering ``edge``; return its slot."""
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
            if kind == "diff":
                todo = [x for x in rec[2:] if x not in self.slots]
                if todo:
                    for x in todo:
                        self.recipes.setdefault(x, self.direct(x))
                    stack.extend(todo)
                    continue
                slot = self.new_slot()
                self.emit(ValueOp("sub", rec[1], "", (self.slots[rec[2]], self.slots[rec[3]]),
                                   (slot,)), chain)
                self.slots[e] = slot
                stack.pop()
                continue
            if kind == "unview":
                child = rec[2]
                if child not in self.slots:
                    self.recipes.setdefault(child, self.direct(child) or self._difference(child))
                    stack.append(child)
                    continue
                slot = self.new_slot()
                self.emit(ValueOp("unview", rec[1], "", (self.slots[child],), (slot,)), chain)
                self.slots[e] = slot
                stack.pop()
                continue
            if kind in ("leaf", "saved", "base", "rec"):
                slot = self.new_slot()
                op = ValueOp(kind, rec[1], rec[2] if kind != "leaf" else "", (), (slot,))
                self.emit(op, chain)
                self.slots[e] = slot
                if branch is not None:
                    branch.arg_nodes.append(rec[1])
                stack.pop()
                continue
            pid, ins = rec[1], rec[2]
            if pid in self.fwd_outs:  # another output of a multi-output node already replayed
                self.slots[e] = self._out_slot(pid, e[1])
                self.depths[e] = self.depths[(pid, 0)] if (pid, 0) in self.depths else 1
                stack.pop()
                continue
            pending = [c for c in ins.values()
                       if isinstance(c, tuple) and len(c) == 2 and c not in self.slots]
            if pending:
                stack.extend(pending)
                continue
            in_slots = []
            n_in = max(len(self.graph.edges[pid]), max(ins, default=-1) + 1)
            for pos in range(n_in):
                src = ins.get(pos)
                if src is None:
                    spec = OPS.get(self.graph.types[pid])
                    if pos in ins and self.graph.edges[pid][pos] is None and (
                            _lost_operand(self.graph.types[pid], self.graph.nodes[pid])
                            or (spec is not None and pos in spec.zero_operands)):
                        self.assumptions.append(
                            f"{self.graph.types[pid]} #{pid}: forward value recomputed with "
                            f"its untracked operand {pos} (not saved by autograd) taken as 0")
                        spec = OPS.get(self.graph.types[pid])
                        if spec is not None and spec.rule == "linear":  # a frozen bias
                            self.lost_constants += 1
                    in_slots.append(-1)
                elif len(src) == 3:  # the node's own saved input
                    slot = self.new_slot()
                    self.emit(ValueOp("saved", pid, src[2], (), (slot,)), chain)
                    in_slots.append(slot)
                else:
                    in_slots.append(self.slots[src])
            if self.graph.types[pid] in _LOSSY_FORWARD:
                self.assumptions.append(f"{self.graph.types[pid]} #{pid}: {_LOSSY_FORWARD[self.graph.types[pid]]}")
            n_out = self._n_outputs(pid)
            outs = tuple(self.new_slot() for _ in range(n_out))
            self.emit(ValueOp("fwd", pid, "", tuple(in_slots), outs), chain)
            self.fwd_outs[pid] = outs
            child_depths = [self.depths.get(c, 0) for c in ins.values()
                            if isinstance(c, tuple) and len(c) == 2]
            depth = 1 + max(child_depths, default=0)
            for nr in range(n_out):
                self.depths[(pid, nr)] = depth
            if branch is not None:
                branch.internal.append(pid)
                if sum(d > 0 for d in child_depths) > 1:
                    branch.tree_nodes += 1
            self.slots[e] = outs[e[1]]
            stack.pop()
        if branch is not None:
            branch.depth = max(branch.depth, self.depths.get(edge, 0))
        return self.slots[edge]

    def _n_outputs(self, pid: int) -> int:
        return max(1, len(self.graph.nodes[pid]._input_metadata))

    def _out_slot(self, pid: int, nr: int) -> int:
        return self.fwd_outs[pid][nr]

    def emit(self, op: ValueOp, chain: list[ValueOp]) -> None:
        """Run ``op`` now and append it to ``chain`` (the plan records what the trace ran)."""
        self.execute(op)
        chain.append(op)


ValSource = Union[int, str]


def _released(*args: Any) -> Any:
    raise RuntimeError("value resolver used after its trace finished")
