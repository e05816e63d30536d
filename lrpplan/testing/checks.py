"""Conservation checks usable with or without hypothesis."""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import nn

import lrpplan
from lrpplan.api import Attribution


# =============================================================================================
# checks


class ReportRow(NamedTuple):
    """One propagated autograd node of a :class:`ConservationReport`."""

    node: int
    node_type: str
    inflow: float
    outflow: float
    absorbed: float


class ConservationReport(list):
    """Per-node conservation rows (a ``list`` of :class:`ReportRow`) with the totals.

    Attributes
    ----------
    start, at_inputs, absorbed, residual:
        the ledger totals: ``start = at_inputs + absorbed + residual``.
    attribution:
        the :class:`lrpplan.Attribution` the report was made from.
    """

    def __init__(self, attribution: Attribution) -> None:
        led = attribution.ledger
        super().__init__(ReportRow(r.node, r.node_type, r.inflow, r.outflow, r.absorbed)
                         for r in led.rows)
        self.attribution = attribution
        self.start = led.start
        self.at_inputs = led.at_inputs
        self.absorbed = led.absorbed
        self.residual = led.residual

    def summary(self, top: int = 10) -> str:
        """Totals and the ``top`` nodes absorbing the most relevance (by magnitude)."""
        lines = [f"start {self.start:.6g} = at inputs {self.at_inputs:.6g} + absorbed "
                 f"{self.absorbed:.6g} + residual {self.residual:.3g}"]
        rows = sorted(self, key=lambda r: -abs(r.absorbed))[:top]
        if rows:
            lines.append(f"{'node':>6}  {'type':<44} {'in':>12} {'out':>12} {'absorbed':>12}")
            for r in rows:
                lines.append(f"{r.node:>6}  {r.node_type:<44} {r.inflow:>12.5g} "
                             f"{r.outflow:>12.5g} {r.absorbed:>12.5g}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def conservation_report(model: nn.Module, *inputs: Any, rules: Any = None, target: Any = None,
                        **kwargs: Any) -> ConservationReport:
    """Explain ``model(*inputs)`` (no plan cache) and return the per-node ledger.

    Parameters
    ----------
    model:
        the model.
    *inputs:
        its positional inputs.
    rules:
        a preset name or :class:`lrpplan.RuleSet` (default ``"epsilon"``).
    target:
        as for :func:`lrpplan.explain`.
    **kwargs:
        keyword arguments for the model.

    Returns
    -------
    ConservationReport
        a list of :class:`ReportRow` (node id, node type, in, out, absorbed); ``print()`` it for
        a summary.
    """
    attr = lrpplan.explain(model, *inputs, target=target, rules=rules, cache=False, **kwargs)
    return ConservationReport(attr)


def _relevances(attr: Attribution) -> list[torch.Tensor]:
    rel = attr.relevance
    items = list(rel) if isinstance(rel, tuple) else [rel]
    return [r for r in items if r is not None]


def assert_conserves(model: nn.Module, *inputs: Any, rules: Any = None, tolerance: float = 1e-4,
                     min_input_share: Optional[float] = None, target: Any = None,
                     **kwargs: Any) -> Attribution:
    """Assert that an explanation of ``model(*inputs)`` conserves relevance.

    Checks, on one explanation without plan cache:

    1. every relevance tensor is finite;
    2. the ledger closes: ``|start − at_inputs − absorbed| ≤ tolerance · (max(|start|,
       |at_inputs|, |absorbed|, 1) + 0.01)`` (:meth:`lrpplan.Ledger.closes` with
       ``rtol=tolerance, atol=tolerance / 100``);
    3. with ``min_input_share``: ``at_inputs / start ≥ min_input_share`` (a start relevance of
       exactly 0 fails: the share is undefined).

    Parameters
    ----------
    model:
        the model.
    *inputs:
        its positional inputs.
    rules:
        a preset name or :class:`lrpplan.RuleSet`.
    tolerance:
        relative tolerance of the ledger check.
    min_input_share:
        least share of the start relevance that must reach the inputs (e.g. ``0.999`` for a
        bias-free model under the ε-rule with a negligible ε).
    target:
        as for :func:`lrpplan.explain`.
    **kwargs:
        keyword arguments for the model.

    Returns
    -------
    lrpplan.Attribution
        the checked explanation.

    Raises
    ------
    AssertionError
        with the conservation report when a check fails.
    """
    attr = lrpplan.explain(model, *inputs, target=target, rules=rules, cache=False, **kwargs)
    for k, r in enumerate(_relevances(attr)):
        if not torch.isfinite(r).all():
            raise AssertionError(f"relevance of input {k} is not finite:\n"
                                 f"{ConservationReport(attr)}")
    led = attr.ledger
    if not led.closes(rtol=tolerance, atol=tolerance * 1e-2):
        raise AssertionError(f"the conservation ledger does not close (tolerance {tolerance}):\n"
                             f"{ConservationReport(attr)}")
    if min_input_share is not None:
        if led.start == 0.0:
            raise AssertionError("the start relevance is 0: the input share is undefined")
        share = led.at_inputs / led.start
        if not share >= min_input_share:
            raise AssertionError(f"only {share:.6g} of the start relevance reached the inputs "
                                 f"(required ≥ {min_input_share}):\n{ConservationReport(attr)}")
    return attr


def _fresh_like(x: Any, batch: int, gen: torch.Generator) -> Any:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    shape = (batch,) + tuple(x.shape[1:])
    if x.is_floating_point():
        std = float(x.detach().double().std()) if x.numel() > 1 else 1.0
        std = std if math.isfinite(std) and std > 0 else 1.0
        return (std * torch.randn(shape, generator=gen, dtype=torch.float64)).to(
            dtype=x.dtype, device=x.device)
    flat = x.reshape(-1)  # token ids: resample ids that occur in x (valid for the model)
    pick = torch.randint(flat.numel(), (math.prod(shape),), generator=gen)
    return flat[pick.to(flat.device)].reshape(shape)


def assert_replay_matches_trace(model: nn.Module, *inputs: Any, rules: Any = None,
                                rtol: Optional[float] = None, target: Any = None,
                                replay_inputs: Optional[Sequence[Any]] = None,
                                seed: int = 0) -> Attribution:
    """Assert that a replayed plan gives the relevance of a traced run.

    An :class:`lrpplan.Explainer` (no disk cache) traces ``model(*inputs)``, then explains fresh
    inputs of another batch size (``batch + 1``; or ``replay_inputs``), which must replay the
    compiled plan. That relevance is compared with a traced run (``cache=False``) on the same
    fresh inputs: ``max |replayed − traced| ≤ rtol · max |traced|`` per input, ``rtol`` by default
    ``1e-5`` for float32 and ``1e-10`` for float64 relevance.

    Parameters
    ----------
    model:
        the model.
    *inputs:
        inputs of the first (traced) call; their first dimension is the batch.
    rules:
        a preset name or :class:`lrpplan.RuleSet`.
    rtol:
        relative tolerance (see above).
    target:
        target for the replayed and the reference call (``None``: argmax, identical for both).
    replay_inputs:
        the inputs of the replayed call (default: fresh random inputs of batch size
        ``batch + 1``; floats with the spread of ``inputs``, token ids resampled from those
        in ``inputs``).
    seed:
        seed for the fresh inputs.

    Returns
    -------
    lrpplan.Attribution
        the replayed explanation, with the ledger's per-node rows (``ledger="nodes"``).

    Raises
    ------
    AssertionError
        when the second call traced instead of replaying, or the relevances differ.
    """
    explainer = lrpplan.Explainer(model, rules=rules, cache=False, ledger="nodes")
    first = explainer(*inputs)
    if first.cached:
        raise AssertionError("the first call of a fresh Explainer replayed a plan")
    if replay_inputs is None:
        gen = torch.Generator().manual_seed(seed)
        batch = inputs[0].shape[0] + 1
        replay_inputs = tuple(_fresh_like(x, batch, gen) for x in inputs)
    replayed = explainer(*replay_inputs, target=target)
    if not replayed.cached:
        raise AssertionError(
            "the second call traced again instead of replaying the plan of the first: the "
            f"fingerprint changed ({first.plan_key} -> {replayed.plan_key})")
    traced = lrpplan.explain(model, *replay_inputs, target=target, rules=rules, cache=False)
    if traced.cached:
        raise AssertionError("explain(cache=False) replayed a plan")
    got, ref = _relevances(replayed), _relevances(traced)
    if len(got) != len(ref):
        raise AssertionError(f"{len(got)} replayed relevance tensors, {len(ref)} traced")
    for k, (a, b) in enumerate(zip(got, ref)):
        tol = rtol if rtol is not None else (1e-10 if b.dtype == torch.float64 else 1e-5)
        if a.shape != b.shape:
            raise AssertionError(f"input {k}: replayed shape {tuple(a.shape)} != traced "
                                 f"{tuple(b.shape)}")
        scale = float(b.double().abs().max()) if b.numel() else 0.0
        err = float((a.double() - b.double()).abs().max()) if b.numel() else 0.0
        if not err <= tol * max(scale, 1e-30):
            rel = err / max(scale, 1e-30)
            raise AssertionError(f"input {k}: replay differs from trace: max abs error {err:.3g}, "
                                 f"max |relevance| {scale:.3g}, relative {rel:.3g} > {tol:g}")
    return replayed


