"""Which module ran each autograd node (for per-module rules, like Zennit's name map).

During one forward pass, temporary hooks on every submodule note the autograd sequence number
before and after the module runs (a tiny probe op gives the current number); a node belongs to
the innermost module whose interval holds its ``_sequence_nr()``. The hooks are removed when the
forward ends, also on error: nothing stays on the model.
"""
from __future__ import annotations

import bisect
import contextlib
from typing import Any, Iterator

import torch

from .graph import Graph
from .rules import OPS


def _probe() -> int:
    """The autograd sequence number the next node will get (consumes one)."""
    leaf = torch.zeros((), requires_grad=True)
    with torch.enable_grad():
        return leaf.view(()).grad_fn._sequence_nr()


class ModuleRecorder:
    """Collects ``(start, end, path)`` sequence-number intervals of module calls."""

    def __init__(self) -> None:
        self.intervals: list[tuple[int, int, str]] = []
        self._open: list[tuple[str, int]] = []

    def assign(self, graph: Graph) -> dict[int, str]:
        """node id -> path of the innermost module that created it."""
        spans = sorted(self.intervals, key=lambda t: (t[0], -t[1]))
        starts = [s for s, _, _ in spans]
        out: dict[int, str] = {}
        for nid, node in enumerate(graph.nodes):
            spec = OPS.get(graph.types[nid])
            if spec is not None and spec.leaf:
                continue
            seq = node._sequence_nr()
            best = None
            for i in range(bisect.bisect_right(starts, seq) - 1, -1, -1):
                s, e, path = spans[i]
                if s < seq < e and (best is None or e - s < best[1] - best[0]):
                    best = (s, e, path)
            if best is not None:
                out[nid] = best[2]
        return out


@contextlib.contextmanager
def record_modules(model: torch.nn.Module) -> Iterator[ModuleRecorder]:
    """Record module intervals while the body runs the model's forward."""
    rec = ModuleRecorder()
    handles = []

    def pre(path: str):
        def hook(module: Any, args: Any) -> None:
            rec._open.append((path, _probe()))
        return hook

    def post(path: str):
        def hook(module: Any, args: Any, out: Any) -> None:
            p, start = rec._open.pop()
            rec.intervals.append((start, _probe(), p))
        return hook

    try:
        for path, mod in model.named_modules():
            if path:
                handles.append(mod.register_forward_pre_hook(pre(path)))
                handles.append(mod.register_forward_hook(post(path)))
        yield rec
    finally:
        for h in handles:
            h.remove()
