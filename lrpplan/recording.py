"""Forward values autograd keeps nowhere, recorded while :func:`lrpplan.explain` runs the forward.

Autograd saves what gradients need, not what LRP rules need: an addition's operands, say, are
saved by no node. The Promise system recomputes such a value from saved tensors upstream, but
when the tensors it would start from were overwritten in place later in the forward (a slice
assignment into a buffer, ``h += ...``), nothing in the graph holds the value any more.

:class:`ForwardRecording` is a ``TorchDispatchMode`` that sees every aten op of one forward
pass. It keeps a reference to each op's tensor outputs and, just before an op writes into a
tensor's storage, a copy of every recorded tensor that shares that storage (copy on write), keyed
by the autograd node and output number that value had. After the pass, :meth:`values_for` maps
the keys onto the edges of the captured graph (:attr:`lrpplan.graph.Graph.recorded`), where the
``rec`` value op of a plan reads them.

It costs Python work per aten op and keeps every intermediate tensor alive until the graph is
captured, so :func:`lrpplan.explain` turns it on only for models whose plan needs it (found on
the first explanation; ``docs/rules.md``, "Values the graph loses"). :func:`lrpplan.attribute`
does not run the forward and cannot record.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .graph import Edge, Graph

Key = tuple[Any, int]  # (autograd node, output number)


def _written_positions(func: Any, cache: dict[Any, tuple[tuple[int, ...], tuple[str, ...]]]):
    """Positional indices and keyword names of the arguments ``func`` writes into."""
    hit = cache.get(func)
    if hit is None:
        positions, names = [], []
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                positions.append(i)
                names.append(arg.name)
        hit = cache[func] = (tuple(positions), tuple(names))
    return hit


def _storage_key(t: torch.Tensor) -> Any:
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # no storage (sparse, nested)
        return None


class ForwardRecording(TorchDispatchMode):
    """Records the value of every autograd output produced while it is active (see the module
    docstring). Use as a context manager around the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        #: storage -> the op outputs living in it (their current version is still in there)
        self._live: dict[Any, list[torch.Tensor]] = {}
        #: values whose storage was written to later: copies taken just before the write
        self._frozen: dict[Key, torch.Tensor] = {}
        self._writes: dict[Any, tuple[tuple[int, ...], tuple[str, ...]]] = {}
        #: bytes copied on write (the measured memory cost beyond keeping outputs alive)
        self.copied_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        positions, names = _written_positions(func, self._writes)
        if positions:
            written = [args[i] for i in positions if i < len(args)]
            written += [kwargs[n] for n in names if n in kwargs]
            for w in written:
                for t in (w if isinstance(w, (list, tuple)) else (w,)):
                    if isinstance(t, torch.Tensor):
                        self._freeze(t)
        out = func(*args, **kwargs)
        for t in (out if isinstance(out, (list, tuple)) else (out,)):
            if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
                key = _storage_key(t)
                if key is not None:
                    self._live.setdefault(key, []).append(t)
        return out

    def _freeze(self, written: torch.Tensor) -> None:
        """Copy the current version of every recorded tensor in ``written``'s storage."""
        key = _storage_key(written)
        for t in self._live.get(key, ()):
            node = t.grad_fn
            if node is None or (node, t.output_nr) in self._frozen:
                continue
            self._frozen[(node, t.output_nr)] = t.detach().clone()
            self.copied_bytes += t.numel() * t.element_size()

    def values_for(self, graph: Graph) -> dict[Edge, torch.Tensor]:
        """The recorded values of the edges of ``graph`` (copies where the storage was written
        to after the value was made, the tensors themselves otherwise)."""
        found: dict[Edge, torch.Tensor] = {}
        for (node, nr), value in self._frozen.items():
            nid = graph.index.get(node)
            if nid is not None:
                found[(nid, nr)] = value
        for tensors in self._live.values():
            for t in tensors:
                node = t.grad_fn
                nid = graph.index.get(node) if node is not None else None
                if nid is not None and (nid, t.output_nr) not in found:
                    found[(nid, t.output_nr)] = t.detach()
        return found

    def clear(self) -> None:
        """Drop every reference (the recorded tensors are large)."""
        self._live.clear()
        self._frozen.clear()
