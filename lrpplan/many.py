"""Many targets in one replay: K relevance maps through one plan (issue 16).

Every rule is linear in the relevance it receives once the forward values are fixed, so the
relevance of K targets can travel through one replay together. The graph reads are gathered
once; the plan's pure steps run under ``torch.func.vmap`` over the K seeds: the forward values
(saved tensors, recomputed values, stabilised denominators) are shared by all targets, and each
relevance operation runs once for all K (a batched matrix product, one element-wise kernel). K
is no structure: the plan is the plan of one target.

A plan whose steps cannot be vmapped (a node's own backward, a gradient computed by autograd,
a rule that writes relevance into buffers of the forward values: :func:`vmappable`) replays once
per target instead, with the same results. Memory grows with K; ``chunk`` splits K, by default
into groups of :data:`DEFAULT_CHUNK` (measured on a 2-core CPU, docs/performance.md: ResNet-50
at 224² gains nothing from 64 targets at once, 1.01× the cost of 64 replays, but 0.70× in
groups of 16).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .compiled import gather_reads, run_pure
from .graph import Graph
from .ledger import Book
from .plan import Plan
from .replay import Executor, Program
from .rules.base import OPS, RULES


#: targets per vmapped replay when the caller does not say (``chunk=None`` means all at once)
DEFAULT_CHUNK = 16


def vmappable(plan: Plan) -> bool:
    """Every step of ``plan`` can run with a batch of relevance maps (``torch.func.vmap``)."""
    if any(op.kind == "backward" for op in plan.value_ops()):
        return False
    for step in plan.iter_rule_steps():
        rule = RULES[step.rule]
        if not rule.batched_relevance:
            return False
        spec = OPS.get(step.params.get("node_type", ""))
        if rule.uses_gradient and spec is not None and getattr(spec.vjp, "by_autograd", False):
            return False
    return True


def replay_many(graph: Graph, plan: Plan, program: Program,
                seed_sets: Sequence[Sequence[torch.Tensor]], chunk: Optional[int] = None
                ) -> list[Book]:
    """One :class:`~lrpplan.ledger.Book` per seed set (one seed per root each), from one
    vmapped replay per ``chunk`` seed sets (all at once when ``chunk`` is None)."""
    k = len(seed_sets)
    if not vmappable(plan):
        return [Executor(graph, plan, program).run(list(seeds)).book() for seeds in seed_sets]
    gathered = gather_reads(graph, plan)
    step = k if not chunk or chunk <= 0 else int(chunk)
    books: list[Book] = []
    for start in range(0, k, step):
        part = seed_sets[start:start + step]
        stacked = [torch.stack([seeds[i] for seeds in part]) for i in range(len(part[0]))]
        books += _batched_books(plan, program, stacked, gathered, len(part))
    return books


def _batched_books(plan: Plan, program: Program, stacked: list[torch.Tensor],
                   gathered: list[Any], n: int) -> list[Book]:
    """Run the plan's pure steps once for ``n`` stacked seed sets."""
    static: dict[str, Any] = {}

    def one(seeds: list[torch.Tensor]):
        results, absorbed, nodes, through = run_pure(plan, program, seeds, gathered)
        # which results exist and which nodes absorbed is structure, the same for every target
        static["present"] = [r is not None for r in results]
        static["nodes"], static["through"] = nodes, through
        return [r for r in results if r is not None], absorbed

    results, absorbed = torch.func.vmap(one, in_dims=(0,), randomness="error")(stacked)
    books = []
    for i in range(n):
        found = iter(results)
        per_target = [next(found)[i] if present else None for present in static["present"]]
        parts = [] if absorbed is None else list(zip(static["nodes"], absorbed[i].unbind()))
        books.append(Book(per_target, list(static["through"]), parts, None))
    return books
