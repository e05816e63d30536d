"""Coverage: which node types a model's graph holds, and which rule handles each.

:func:`coverage` captures the graph of one forward pass and reports, per node type, the count,
the rule (or that none exists), and how many Promises the traced plan opened at nodes of that
type — the columns of the DynamicLRP paper's Table 6. :func:`rule_table` lists the registry itself:
node type → rule → saved values read → role in Promise chains.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from .api import _explain, _store_for
from .config import RuleSet
from .errors import UnsupportedOperation
from .graph import capture
from .rules import OPS, RULES


@dataclass(frozen=True)
class CoverageRow:
    node_type: str
    count: int
    rule: str          # "" when no rule exists
    covered: bool
    promises: int      # Promises opened at nodes of this type


@dataclass(frozen=True)
class CoverageReport:
    rows: tuple[CoverageRow, ...]
    nodes: int
    covered_nodes: int
    unique_ops: int
    promises: int
    error: str = ""

    @property
    def ratio(self) -> float:
        return self.covered_nodes / max(1, self.nodes)

    def format(self) -> str:
        """A markdown table plus the totals line of the paper's Table 6."""
        lines = ["| node type | count | rule | covered | Promises |", "|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.node_type} | {r.count} | {r.rule or '—'} | "
                         f"{'yes' if r.covered else '**no**'} | {r.promises} |")
        lines.append(f"\ncovered nodes {self.covered_nodes}/{self.nodes} "
                     f"({100 * self.ratio:.2f}%), unique ops {self.unique_ops}, "
                     f"Promises {self.promises}")
        if self.error:
            lines.append(f"explanation failed: {self.error}")
        return "\n".join(lines)


def coverage(model: torch.nn.Module, *inputs: Any, rules: Any = None,
             **kwargs: Any) -> CoverageReport:
    """Run one explanation of ``model`` and report node coverage.

    Every node of the captured graph counts (AccumulateGrad leaves included); a node is covered
    when its type has a rule in the rule set (a declared override counts).
    """
    ruleset = RuleSet.ensure(rules)
    error = ""
    promises: Counter[str] = Counter()
    try:
        attr = _explain(model, inputs, None, ruleset, _store_for(False), kwargs)
        plan = attr.plan
        types = {s.node: s.params.get("node_type", "") for s in plan.iter_rule_steps()}
        for s in plan.steps:
            if s.kind == "fused" and s.chain:
                promises[types.get(s.body[0].node, "")] += 1
    except UnsupportedOperation as exc:
        error = str(exc)
    # count node types on a fresh forward (the explanation's graph is gone)
    args = [a.detach().clone().requires_grad_(True)
            if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in inputs]
    with torch.enable_grad():
        out = model(*args, **kwargs)
    tensors = [t for t in _tensors(out) if t.grad_fn is not None]
    graph = capture([(t.grad_fn, 0) for t in tensors[:1]])
    counts = Counter(graph.types)
    rows = []
    for node_type, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        spec = OPS.get(node_type)
        if spec is not None and spec.leaf:
            rule, covered = "leaf", True
        else:
            rule = ruleset.resolve(node_type)[0] or ""
            covered = bool(rule)
        rows.append(CoverageRow(node_type, n, rule, covered, promises.get(node_type, 0)))
    covered_nodes = sum(r.count for r in rows if r.covered)
    return CoverageReport(tuple(rows), len(graph), covered_nodes, len(rows),
                          sum(promises.values()), error)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "values"):
        vals = list(out.values())
        if hasattr(out, "keys") and "logits" in out.keys():
            vals = [out["logits"]] + vals
        return [t for v in vals for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


#: rules that read input values (and so open Promises where the graph did not save them)
_NEEDS_VALUES = {"add", "linear_map", "softmax", "linear", "share", "centred_norm", "affine_norm",
                 "linear_sum", "multilinear", "index_put", "scatter_reduce", "embedding_bag"}


def rule_table() -> str:
    """Markdown table of the registry: node type → rule → static attributes (in the plan key)
    → attributes read at run time → gradient → Promise role."""
    lines = ["| node type | default rule | static (in the key) | read at run time | gradient "
             "| Promise role |", "|---|---|---|---|---|---|"]
    for name in sorted(OPS):
        spec = OPS[name]
        if spec.leaf:
            continue
        saved = {s.replace("_saved_", "") for s in
                 (*spec.saved_inputs.values(), *spec.saved_outputs.values())}
        reads = sorted(saved | set(spec.reads)) + list(spec.meta)
        static = list(spec.attrs) + list(spec.facts)
        role = []
        if spec.rule in _NEEDS_VALUES:
            role.append("Promise origin when an input value is saved nowhere")
        if spec.saved_outputs:
            role.append("Arg node (saves its output)")
        role.append("forward-replayable (internal node)" if spec.forward is not None
                    else "not replayable")
        gradient = "—"
        if RULES[spec.rule].uses_gradient:
            gradient = "pure" if spec.vjp is not None else "the node's own"
        lines.append(f"| {name} | {spec.rule} | {', '.join(static) or '—'} "
                     f"| {', '.join(reads) or '—'} | {gradient} | {'; '.join(role)} |")
    return "\n".join(lines)
