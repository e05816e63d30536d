"""The structural key of an explanation: xxh3-128 over what decides the plan.

In the key:
- every node's type and its input edges ``(producer id, output number)`` (``None`` edges too);
- the non-tensor saved attributes each op spec lists as ``key_attrs`` (dims, flags, groups...);
- the root and target edges (which tensors relevance starts from and is collected at);
- the rule configuration, the plan format version and torch's major.minor version.

Deliberately not in the key: sizes (``*_sym_sizes``), slice bounds, split sizes and indices.
They follow batch size and sequence length; rules and forward replays read them from the live
graph at run time, so one plan serves every batch size with the same structure.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import msgpack
import torch
import xxhash

from .graph import Edge, Graph
from .rules.base import OPS

#: bump when the meaning of a plan changes, or when plans compiled now are better than the
#: cached ones (2: value sources without recomputation -- views' bases, inverted views,
#: output minus operand, ReLU results -- and the value-op kinds that record them)
PLAN_FORMAT_VERSION = 2


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


def node_record(node: Any, node_type: str, edges: Sequence[Edge | None]) -> list:
    """What one node contributes to the key."""
    spec = OPS.get(node_type)
    attrs = []
    if spec is not None:
        for name in spec.key_attrs:
            attrs.append(_plain(getattr(node, "_saved_" + name, None)))
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
        h.update(msgpack.packb(node_record(node, node_type, edges)))
    return h.hexdigest()
