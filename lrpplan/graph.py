"""Capture: one iterative walk over ``grad_fn.next_functions`` giving canonical node ids and edges.

The walk is a depth-first post-order with an explicit stack, visiting ``next_functions`` in order,
so the same graph structure always yields the same ids (roots first: id 0 is the first root).
The fingerprint of the structure is computed from the records of this same walk
(:mod:`lrpplan.fingerprint`), so a replay walks the graph exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch

from .errors import InvalidInputError

Edge = tuple[int, int]  # (producer node id, output number)


@dataclass
class Graph:
    """The captured autograd graph.

    Attributes
    ----------
    nodes:
        autograd nodes in canonical topological order (consumers before producers).
    types:
        ``type(node).__name__`` per node.
    edges:
        per node, per input position: ``(producer id, output number)`` or ``None`` for a
        ``(None, 0)`` entry (an operand autograd does not track).
    roots:
        the edges relevance starts from.
    index:
        node -> id (keeps the Python wrappers alive, so ids stay valid).
    recorded:
        forward values recorded while the forward ran, by edge (:mod:`lrpplan.recording`;
        empty unless :func:`lrpplan.explain` recorded its forward). The ``rec`` value op reads
        them.
    """

    nodes: list[Any]
    types: list[str]
    edges: list[tuple[Optional[Edge], ...]]
    roots: list[Edge]
    index: dict[Any, int]
    recorded: dict[Edge, torch.Tensor] = field(default_factory=dict, repr=False)
    _consumers: Optional[list[list[tuple[int, int]]]] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.nodes)

    def consumers(self, node_id: int) -> list[tuple[int, int]]:
        """(consumer id, input position) pairs reading any output of ``node_id``."""
        if self._consumers is None:
            cons: list[list[tuple[int, int]]] = [[] for _ in self.nodes]
            for c, ins in enumerate(self.edges):
                for pos, e in enumerate(ins):
                    if e is not None:
                        cons[e[0]].append((c, pos))
            self._consumers = cons
        return self._consumers[node_id]

    def edge_of(self, tensor: torch.Tensor) -> Edge:
        """The graph edge carrying ``tensor`` (a leaf or an intermediate tensor)."""
        if not tensor.requires_grad:
            raise InvalidInputError("tensor does not require grad, so it is not in any graph")
        ge = torch.autograd.graph.get_gradient_edge(tensor)
        nid = self.index.get(ge.node)
        if nid is None:
            raise InvalidInputError(
                f"tensor of shape {tuple(tensor.shape)} is not part of the explained output's "
                "graph (was it created by a different forward pass, or detached?)")
        return (nid, ge.output_nr)

    def describe(self, node_id: int) -> str:
        """Human-readable position of a node, for error messages."""
        path = [self.types[node_id]]
        cur = node_id
        # walk towards the root along first consumers, to give some context
        for _ in range(3):
            cons = self.consumers(cur)
            if not cons:
                break
            cur = cons[0][0]
            path.append(self.types[cur])
        return f"node #{node_id} of {len(self.nodes)}, consumed by " + " <- ".join(path[1:]) \
            if len(path) > 1 else f"node #{node_id} of {len(self.nodes)} (a root)"


def capture(roots: Sequence[tuple[Any, int]]) -> Graph:
    """Walk the autograd graph from ``roots`` (pairs ``(grad_fn, output_nr)``; every node a
    ``torch.autograd.graph.Node``)."""
    post: list[Any] = []
    seen: dict[Any, None] = {}
    nexts: dict[Any, tuple] = {}
    for root, _nr in roots:
        if root in seen:
            continue
        seen[root] = None
        stack: list[tuple[Any, Iterable]] = [(root, iter(_next(root, nexts)))]
        while stack:
            node, it = stack[-1]
            for child, _ in it:
                if child is not None and child not in seen:
                    seen[child] = None
                    stack.append((child, iter(_next(child, nexts))))
                    break
            else:
                stack.pop()
                post.append(node)
    nodes = post[::-1]
    index = {n: i for i, n in enumerate(nodes)}
    types = [type(n).__name__ for n in nodes]
    edges = [
        tuple(None if c is None else (index[c], nr) for c, nr in nexts[n]) for n in nodes
    ]
    root_edges = [(index[r], nr) for r, nr in roots]
    return Graph(nodes, types, edges, root_edges, index)


def _next(node: Any, cache: dict[Any, tuple]) -> tuple:
    nf = node.next_functions
    cache[node] = nf
    return nf
