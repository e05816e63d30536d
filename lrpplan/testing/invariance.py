"""Shape invariance of plans (DESIGN.md invariant 7): a plan compiled at one set of sizes and
replayed at others gives what a fresh trace at those sizes gives."""
from __future__ import annotations

import tempfile
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

import lrpplan
from lrpplan.api import Attribution

from .checks import _relevances


class ShapeReplay(NamedTuple):
    """One comparison made by :func:`assert_shape_invariance`.

    Attributes
    ----------
    first:
        the size the explainer (or the disk cache) saw first, where it compiled a plan.
    size:
        the size explained afterwards and compared with a fresh trace.
    mode:
        ``"memory"`` (one :class:`lrpplan.Explainer`) or ``"disk"`` (fresh :func:`lrpplan.explain`
        calls sharing a :class:`lrpplan.PlanCache` directory, so every plan comes from disk).
    cached:
        whether that explanation replayed a compiled plan (False: the key differed, so it traced).
    error:
        ``max |got − fresh| / max |fresh|`` over the relevance tensors.
    """

    first: Any
    size: Any
    mode: str
    cached: bool
    error: float


def _call(make_inputs: Callable[..., Any], size: Any) -> tuple:
    if isinstance(size, dict):
        out = make_inputs(**size)
    elif isinstance(size, tuple):
        out = make_inputs(*size)
    else:
        out = make_inputs(size)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _compare(got: Attribution, ref: Attribution, rtol: Optional[float], what: str) -> float:
    a_list, b_list = _relevances(got), _relevances(ref)
    if len(a_list) != len(b_list):
        raise AssertionError(f"{what}: {len(a_list)} relevance tensors, a fresh trace gives "
                             f"{len(b_list)}")
    worst = 0.0
    for k, (a, b) in enumerate(zip(a_list, b_list)):
        tol = rtol if rtol is not None else (1e-10 if b.dtype == torch.float64 else 1e-5)
        if a.shape != b.shape:
            raise AssertionError(f"{what}: input {k} has relevance of shape {tuple(a.shape)}, a "
                                 f"fresh trace gives {tuple(b.shape)}")
        if not torch.isfinite(a).all() and torch.isfinite(b).all():
            raise AssertionError(f"{what}: input {k} has non-finite relevance, a fresh trace "
                                 "gives finite relevance")
        if not b.numel():
            continue
        scale = float(b.double().abs().max())
        err = float((a.double() - b.double()).abs().max())
        rel = err / max(scale, 1e-30)
        worst = max(worst, rel)
        if not err <= tol * max(scale, 1e-30):
            raise AssertionError(
                f"{what}: input {k} differs from a fresh trace: max abs error {err:.3g}, max "
                f"|relevance| {scale:.3g}, relative {rel:.3g} > {tol:g} (plan "
                f"{'replayed' if got.cached else 'traced'}, key {got.plan_key})")
    return worst


def assert_shape_invariance(model: nn.Module, make_inputs: Callable[..., Any],
                            sizes: Sequence[Any], *, rules: Any = None, target: Any = None,
                            rtol: Optional[float] = None, first: Optional[Sequence[int]] = None,
                            modes: Sequence[str] = ("memory", "disk"),
                            require_replay: bool = False) -> list[ShapeReplay]:
    """Assert that plans compiled at some sizes and replayed at others equal fresh traces.

    For every size ``sizes[i]`` (``i`` in ``first``), a fresh explainer first explains the
    inputs of that size (compiling a plan), then the inputs of every other size in turn; each of
    those explanations — a replayed plan where the fingerprint matched, a new trace otherwise —
    must equal a traced run without cache (``cache=False``) on the same inputs:
    ``max |got − fresh| ≤ rtol · max |fresh|`` per input, ``rtol`` by default ``1e-5`` for
    float32 and ``1e-10`` for float64 relevance. Two modes:

    - ``"memory"``: one :class:`lrpplan.Explainer` without disk cache;
    - ``"disk"``: a :class:`lrpplan.PlanCache` in a fresh temporary directory and a fresh
      :func:`lrpplan.explain` call with a fresh ``PlanCache`` object per explanation, so a plan
      can only come from the files on disk.

    Parameters
    ----------
    model:
        the model (eval mode).
    make_inputs:
        ``make_inputs(size)`` returns the positional inputs (a tensor or a tuple) for one entry
        of ``sizes``; a dict entry is passed as keywords, a tuple as positional arguments. It is
        called once per size, and the same tensors are used for every explanation at that size.
    sizes:
        at least two size specifications, e.g. ``[dict(batch=1, seq=1), dict(batch=3, seq=5)]``
        (include sizes of 1: a size-1 dim is where broadcasting and its absence look alike).
    rules:
        a preset name or :class:`lrpplan.RuleSet`.
    target:
        as for :func:`lrpplan.explain` (``None``: the argmax, the same for every call).
    rtol:
        relative tolerance (see above).
    first:
        indices into ``sizes`` to compile at first (default: every size).
    modes:
        a subset of ``("memory", "disk")``.
    require_replay:
        also fail when no explanation after the first replayed a plan (the check would then
        only compare traces with traces).

    Returns
    -------
    list of ShapeReplay
        one row per comparison (which size came first, which was compared, the mode, whether
        the plan was replayed, the relative error).

    Raises
    ------
    AssertionError
        naming the sizes, the mode and the input whose relevance differs from a fresh trace.
    """
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError("assert_shape_invariance needs at least two sizes")
    bad = set(modes) - {"memory", "disk"}
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of ('memory', 'disk'), not {modes}")
    inputs = [_call(make_inputs, s) for s in sizes]
    fresh = [lrpplan.explain(model, *x, target=target, rules=rules, cache=False) for x in inputs]
    for s, f in zip(sizes, fresh):
        if f.cached:
            raise AssertionError(f"explain(cache=False) replayed a plan at size {s!r}")
    order = list(range(len(sizes))) if first is None else list(first)
    rows: list[ShapeReplay] = []
    for i in order:
        for mode in modes:
            with tempfile.TemporaryDirectory(prefix="lrpplan-shapes-") as tmp:
                if mode == "memory":
                    explainer = lrpplan.Explainer(model, rules=rules, cache=False)

                    def run(x: tuple) -> Attribution:
                        return explainer(*x, target=target)
                else:
                    def run(x: tuple) -> Attribution:
                        return lrpplan.explain(model, *x, target=target, rules=rules,
                                               cache=lrpplan.PlanCache(tmp))
                start = run(inputs[i])
                if start.cached:
                    raise AssertionError(f"the first explanation ({mode}, size {sizes[i]!r}) "
                                         "replayed a plan: the cache was not fresh")
                _compare(start, fresh[i], rtol, f"size {sizes[i]!r} ({mode}, first call)")
                for j in range(len(sizes)):
                    if j == i:
                        continue
                    got = run(inputs[j])
                    what = (f"plan cache ({mode}) filled at size {sizes[i]!r}, then explained at "
                            f"size {sizes[j]!r}")
                    err = _compare(got, fresh[j], rtol, what)
                    rows.append(ShapeReplay(sizes[i], sizes[j], mode, got.cached, err))
    if require_replay and not any(r.cached for r in rows):
        raise AssertionError("no explanation replayed a plan: every size got its own key")
    return rows
