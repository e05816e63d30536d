"""Counting the kernels a replay launches against what a gradient's backward launches.

On a GPU at small batch a backward pass is bound by kernel launches (about 10–20 µs each), so
the number of kernel-launching ops decides the ratio. Two counters:

``count_dispatched(fn)``   the ATen ops ``fn`` dispatches that launch a kernel, counted by a
                           ``TorchDispatchMode`` (views, ``_unsafe_view``, ``detach`` and
                           allocation without a fill are free); works on any device, so a CPU
                           run gives the GPU-relevant count of an eager replay. Ops inside a
                           compiled region are not dispatched one by one (their fused kernels are
                           invisible here; count those on a GPU).
``count_cuda_launches(fn)``  the CUDA kernels ``fn`` launched, from ``torch.profiler`` (a GPU
                           only; counts a compiled replay's fused kernels too).
"""
from __future__ import annotations

import collections
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: ops that launch no kernel although the dispatcher sees them (besides views)
FREE_OPS = frozenset({"detach", "empty", "empty_like", "new_empty", "empty_strided",
                      "new_empty_strided", "set_", "resize_", "lift_fresh", "_reshape_alias",
                      "_unsafe_view", "sym_size", "sym_stride", "sym_numel"})


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in FREE_OPS):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_dispatched(fn: Callable[[], Any]) -> collections.Counter:
    """Kernel-launching ATen ops ``fn`` dispatches, by op name."""
    counter = _Counter()
    with counter:
        fn()
    return counter.ops


def count_cuda_launches(fn: Callable[[], Any]) -> int:
    """CUDA kernels ``fn`` launched (``torch.profiler``; synchronises before and after)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    return len(kernels)

