"""A plan's steps as one function through ``torch.compile`` (``Explainer(..., compile=True)``).

A plan is a straight-line program of pure steps (STYLE.md point 13), so it can be handed to a
compiler as it is:

1. the graph reads (:data:`lrpplan.plan.READ_KINDS`: saved tensors, sizes, leaves, recorded
   values) are gathered eagerly, outside the compiled region, in plan order;
2. one function runs every other step (rules, forward replays, collects) from the seeds and the
   gathered values, with the plan's structure and static parameters as constants; it returns the
   results and what each step absorbed, stacked. ``torch.compile`` fuses the element-wise chains
   of stabilisation, division and the ledger into a few kernels.

Sizes: the first call compiles for the sizes it sees (static shapes, the fastest code); the first
call at other sizes compiles once more with every dimension dynamic (``dynamic=True``), and every
later size reuses that. A plan
that reads a node's own backward (a declared fallback on an op without a pure gradient) cannot be
compiled: its replay runs eagerly, with one warning. If ``torch.compile`` is unavailable or fails
on a platform, the replay runs eagerly too, with one :class:`~lrpplan.errors.LRPWarning`.
"""
from __future__ import annotations

import time
import types
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx.experimental._config as shape_config

from .errors import LRPWarning
from .graph import Graph
from .ledger import Book
from .plan import READ_KINDS, Plan, ValueOp
from .replay import Executor, Program, bind


class _PureExecutor(Executor):
    """Runs a plan's steps from values gathered beforehand: graph reads are no-ops here."""

    def __init__(self, plan: Plan, program: Program) -> None:
        super().__init__(_NO_GRAPH, plan, program)

    def value_op(self, op: ValueOp) -> None:
        if op.kind not in READ_KINDS:
            super().value_op(op)


class _Unnamed:
    """Node types where no graph is at hand (an error message names "a node")."""

    def __getitem__(self, node: int) -> str:
        return "a node"


class _NoGraph:
    """Stands in for the live graph inside the compiled region, which never reads it."""

    nodes: tuple = ()
    edges: tuple = ()
    types = _Unnamed()


_NO_GRAPH: Any = _NoGraph()


def gather_reads(graph: Graph, plan: Plan) -> list[Any]:
    """The graph reads of a plan (:attr:`Plan.graph_reads`), run eagerly: one value per read
    op, in plan order."""
    ex = Executor(graph, plan, program=[])
    for op in plan.graph_reads:
        ex.value_op(op)
    return [ex.val[op.outs[0]] for op in plan.graph_reads]


class CompiledPlan:
    """The replay of one plan through ``torch.compile``.

    Parameters
    ----------
    plan:
        the plan (its steps are constants of the compiled function).
    program:
        ``bind(plan)``, when the caller has it.
    """

    def __init__(self, plan: Plan, program: Optional[Program] = None) -> None:
        self.plan = plan
        self.program = program if program is not None else bind(plan)
        #: why this plan runs eagerly ("" while it compiles)
        self.eager_reason = ""
        if any(op.kind == "backward" for op in plan.graph_reads):
            self.eager_reason = ("the plan routes relevance through a node's own backward (an "
                                 "op without a pure gradient), which a compiled function cannot "
                                 "call")
        self._static: Optional[Callable] = None
        self._dynamic: Optional[Callable] = None
        self._sizes: Optional[tuple] = None
        #: seconds the calls that compiled took (the first call, and one per recompile)
        self.compile_seconds: list[float] = []
        self._frames_seen = 0

    def _function(self, sizes: tuple) -> Callable:
        """The static function for the first sizes seen, the dynamic one for any other."""
        if self._sizes is None:
            self._sizes = sizes
        if sizes == self._sizes:
            if self._static is None:
                self._static = torch.compile(self._replay_function("static"))
            return self._static
        if self._dynamic is None:
            self._dynamic = torch.compile(self._replay_function("dynamic"), dynamic=True)
        return self._dynamic

    def _replay_function(self, variant: str) -> Callable:
        """:func:`run_pure` bound to this plan, as a function with a code object of its own:
        dynamo keeps its compiled variants (and their limit) per code object, so every plan
        and variant gets its own cache instead of evicting another plan's."""
        plan, program = self.plan, self.program

        def replay(seeds: list[torch.Tensor], gathered: list[Any]):
            return run_pure(plan, program, seeds, gathered)

        name = f"lrpplan_replay_{variant}_{plan.key[:12]}"
        code = replay.__code__.replace(co_name=name, co_qualname=name)
        return types.FunctionType(code, replay.__globals__, name, None, replay.__closure__)

    def run(self, graph: Graph, seeds: Sequence[torch.Tensor]) -> Optional[Book]:
        """Replay on ``graph`` from ``seeds``; ``None`` when this plan runs eagerly (the
        caller replays it with an :class:`~lrpplan.replay.Executor`)."""
        if self.eager_reason:
            _warn_eager(self.plan.key, self.eager_reason)
            return None
        gathered = gather_reads(graph, self.plan)
        try:
            fn = self._function(_sizes(seeds, gathered))
            start = time.perf_counter()
            # no "duck" sizes: two dims equal at this call (batch 2, 2 heads) stay separate
            with shape_config.patch(use_duck_shape=False):
                results, stacked, nodes, through = fn(list(seeds), gathered)
            self._note_compiles(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager replay
            self.eager_reason = f"torch.compile failed ({type(exc).__name__}: {exc})"
            _warn_eager(self.plan.key, self.eager_reason)
            return None
        absorbed = [] if stacked is None else list(zip(nodes, stacked.unbind()))
        return Book(list(results), list(through), absorbed, None)

    def _note_compiles(self, seconds: float) -> None:
        """Book the call's time as compile time when it compiled (dynamo's frame count)."""
        frames = _compiled_frames()
        if frames is None or frames != self._frames_seen:
            self._frames_seen = frames if frames is not None else self._frames_seen
            if frames is not None or not self.compile_seconds:
                self.compile_seconds.append(seconds)


def run_pure(plan: Plan, program: Program, seeds: Sequence[torch.Tensor],
             gathered: Sequence[Any]):
    """The pure part of a replay: every step from the seeds and the graph reads gathered by
    :func:`gather_reads`; returns the results, what the steps absorbed (stacked), the
    absorbing nodes and the targets whose relevance flows on."""
    ex = _PureExecutor(plan, program)
    for op, value in zip(plan.graph_reads, gathered):
        ex.val[op.outs[0]] = value
    ex.run(seeds)
    absorbed = torch.stack([t.reshape(()) for _, t in ex.absorbed]) if ex.absorbed else None
    return ex.results, absorbed, tuple(node for node, _ in ex.absorbed), tuple(ex.through)


def _sizes(seeds: Sequence[torch.Tensor], gathered: Sequence[Any]) -> tuple:
    """The shapes a call sees (and the plain values it reads: sizes, bounds)."""
    return tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else v
                 for v in (*seeds, *gathered))


def _compiled_frames() -> Optional[int]:
    """How many frames dynamo has compiled in this process (None where it does not say)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without dynamo
        return None
    return int(counters["stats"]["unique_graphs"])


_WARNED: set = set()


def _warn_eager(key: str, reason: str) -> None:
    if (key, reason) in _WARNED:
        return
    _WARNED.add((key, reason))
    warnings.warn(f"compile=True: plan {key} replays eagerly: {reason}", LRPWarning,
                  stacklevel=4)
