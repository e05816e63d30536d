"""The structural key of an explanation: xxh3-128 over what decides the plan.

In the key:
- every node's type and its input edges ``(producer id, output number)`` (``None`` edges too);
- each node's static attributes, the op spec's ``attrs`` and ``facts`` (dims, kernel sizes,
  flags, groups, the number of outputs of a split, whether a convolution has a bias, the class
  of a custom Function): :meth:`lrpplan.rules.base.OpSpec.static`, the same function that puts
  them into the plan's steps;
- per input of an op that broadcasts (``OpSpec.broadcasts``: add, mul, div...), its broadcast
  pattern (leading dims it lacks, whether it is expanded at all) and whether it has the output's
  dtype (:func:`lrpplan.rules.layout.operand_facts`);
- the number of outputs of a node lrpplan has no op spec for;
- the root and target edges (which tensors relevance starts from and is collected at);
- the rule configuration, the plan format version and torch's major.minor version.

Deliberately not in the key: sizes (``*_sym_sizes``), slice bounds, split sizes and indices
(an op spec's ``reads``). They follow batch size and sequence length; graph-read value ops read
them from the live graph at run time, so one plan serves every batch size with the same
structure. What a rule or a
value source *decides* from sizes, values or dtypes at trace time (DESIGN.md invariant 7) is
reduced to the structural facts above, computed by the same functions the decisions call.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import msgpack
import torch
import xxhash

from .graph import Edge, Graph
from .rules.custom import spec_for
from .rules.layout import operand_facts, unknown_node_fact

#: bump when the meaning of a plan changes, or when plans compiled now are better than the
#: cached ones (2: value sources without recomputation -- views' bases, inverted views,
#: output minus operand, ReLU results -- and the value-op kinds that record them; 3: broadcast
#: patterns and per-node facts in the key, product-rule decisions taken from them; 4: steps as
#: equations -- static attributes in the steps, run-time attributes read by value ops)
PLAN_FORMAT_VERSION = 4


def torch_minor() -> str:
    """``"major.minor"`` of the running torch."""
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def _plain(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (tuple, list, torch.Size)):
        return [_plain(x) for x in v]
    if isinstance(v, torch.Tensor):  # never expected in key attrs; keep only its structure
        return ["tensor", str(v.dtype), v.dim()]
    return str(v)


def node_record(node: Any, node_type: str, edges: Sequence[Edge | None],
                nodes: Sequence[Any] | None = None) -> list:
    """What one node contributes to the key (``nodes``: the graph's nodes by id, needed for
    the broadcast patterns of ops that broadcast)."""
    spec = spec_for(node, node_type)
    attrs: list = []
    if spec is not None:
        attrs.append(sorted(spec.static(node).items()))  # plain data already
        if spec.broadcasts:
            if nodes is None:
                raise ValueError(f"node_record of {node_type} needs the graph's nodes")
            attrs.append(operand_facts(node, [None if e is None else (nodes[e[0]], e[1])
                                              for e in edges]))
    else:
        attrs.append(unknown_node_fact(node))
    return [node_type, [None if e is None else list(e) for e in edges], attrs]


def fingerprint(graph: Graph, targets: Sequence[Sequence[Any]], rule_config: Mapping[str, Any],
                extra: Any = None) -> str:
    """Hex xxh3-128 key of ``graph`` explained towards ``targets`` with ``rule_config``."""
    h = xxhash.xxh3_128()
    h.update(msgpack.packb(["lrpplan", PLAN_FORMAT_VERSION, torch_minor()]))
    h.update(msgpack.packb(_plain(rule_config), use_bin_type=True))
    h.update(msgpack.packb([list(r) for r in graph.roots]))
    h.update(msgpack.packb([_plain(t) for t in targets]))
    h.update(msgpack.packb(_plain(extra)))
    for node, node_type, edges in zip(graph.nodes, graph.types, graph.edges):
        h.update(msgpack.packb(node_record(node, node_type, edges, graph.nodes)))
    return h.hexdigest()
