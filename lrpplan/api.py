"""Public entry points: :func:`attribute`, :func:`explain`, :class:`Explainer`, :class:`Attribution`."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .cache import PlanCache
from .config import RuleSet
from .errors import InvalidInputError, NonFiniteError
from .fingerprint import fingerprint
from .graph import Graph, capture
from .ledger import Ledger
from .modules import ModuleRecorder, record_modules
from .plan import Plan, check_plan, decode, encode
from .replay import bind, replay
from .trace import Tracer

CacheArg = Union[PlanCache, str, "os.PathLike[str]", bool, None]


@dataclass
class Attribution:
    """The result of one explanation.

    Attributes
    ----------
    relevance:
        relevance per explained input, in the structure of the inputs (``None`` for an input no
        relevance can reach, e.g. integer ids without an embedding).
    output:
        the explained output tensor (or the selected scores for :func:`explain`).
    target:
        the selected target per sample (:func:`explain`) or ``None``.
    ledger:
        conservation accounting (:class:`lrpplan.ledger.Ledger`).
    cached:
        True when a compiled plan was replayed, False on a traced run.
    plan_key:
        fingerprint of the plan (xxh3-128 hex).
    plan:
        the plan that was traced or replayed.
    """

    relevance: Any
    output: Any
    target: Any
    ledger: Ledger
    cached: bool
    plan_key: str
    plan: Plan = field(repr=False)

    @property
    def assumptions(self) -> tuple[str, ...]:
        """Documented assumptions rules made on this graph (e.g. an unsaved constant taken as 0)."""
        return self.plan.assumptions


# ---------------------------------------------------------------------------------------------
# graph level


class _PlanStore:
    """In-memory plan + bound steps in front of the on-disk cache."""

    def __init__(self, cache: Optional[PlanCache]) -> None:
        self.cache = cache
        self.memory: dict[str, tuple[Plan, list]] = {}

    def get(self, key: str, n_nodes: int) -> Optional[tuple[Plan, list]]:
        hit = self.memory.get(key)
        if hit is not None:
            return hit
        if self.cache is None:
            return None

        def load(data: bytes) -> Plan:
            plan = decode(data)
            check_plan(plan, n_nodes=n_nodes, key=key)
            return plan

        plan = self.cache.get(key, load)
        if plan is None:
            return None
        hit = (plan, bind(plan.steps))
        self.memory[key] = hit
        return hit

    def put(self, plan: Plan) -> None:
        self.memory[plan.key] = (plan, bind(plan.steps))
        if self.cache is not None:
            self.cache.put(plan.key, encode(plan))


def _store_for(cache: Any) -> _PlanStore:
    """A plan store over the cache the user asked for (memory layer per call only)."""
    if isinstance(cache, _PlanStore):
        return cache
    return _PlanStore(PlanCache.ensure(cache))


def _as_list(x: Any) -> tuple[list, bool]:
    if isinstance(x, torch.Tensor):
        return [x], True
    if isinstance(x, (list, tuple)):
        return list(x), False
    raise InvalidInputError(f"expected a tensor or a sequence of tensors, got {type(x).__name__}")


def _relevance_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def attribute(output: Any, inputs: Any, seed: Any = None, rules: Any = None,
              cache: CacheArg = None) -> Attribution:
    """Propagate relevance from ``output`` back to ``inputs`` through the autograd graph.

    Parameters
    ----------
    output:
        a tensor with a ``grad_fn`` (or a sequence of them).
    inputs:
        a tensor or a sequence of tensors of that graph: leaves (inputs, parameters) or
        intermediate tensors.
    seed:
        relevance at ``output`` (same structure); default: the output values themselves, so
        the input relevance sums to the explained score.
    rules:
        a preset name or a :class:`RuleSet` (default ``"epsilon"``).
    cache:
        a :class:`PlanCache`, a directory, ``None`` (default cache) or ``False`` (no cache).

    Returns
    -------
    Attribution
    """
    outputs, _ = _as_list(output)
    ins, single = _as_list(inputs)
    targets = [{"kind": "tensor", "input": k} for k in range(len(ins))]
    result = _attribute(outputs, seed, rules, cache, ins, targets)
    rel = result[0]
    return Attribution(rel[0] if single else tuple(rel), output, None, *result[1:])


def _attribute(outputs: list, seed: Any, rules: Any, cache: CacheArg, ins: list,
               targets: list[dict], token_inputs: Sequence[int] = (),
               recorder: Optional[ModuleRecorder] = None):
    for o in outputs:
        if not isinstance(o, torch.Tensor) or o.grad_fn is None:
            raise InvalidInputError(
                "the explained output must be a tensor with a grad_fn (computed with gradients "
                "enabled from inputs or parameters that require grad)")
        if not torch.isfinite(o).all():
            raise NonFiniteError("the explained output holds NaN or infinity")
    if seed is None:
        seeds = [o.detach().to(_relevance_dtype(o)) for o in outputs]
    else:
        seeds_in, _ = _as_list(seed)
        if len(seeds_in) != len(outputs):
            raise InvalidInputError("seed must have the structure of output")
        seeds = []
        for o, s in zip(outputs, seeds_in):
            s = torch.as_tensor(s, device=o.device)
            if s.shape != o.shape:
                raise InvalidInputError(f"seed shape {tuple(s.shape)} != output shape "
                                        f"{tuple(o.shape)}")
            if not torch.isfinite(s).all():
                raise NonFiniteError("seed holds NaN or infinity")
            seeds.append(s.detach().to(_relevance_dtype(o)))
    ruleset = RuleSet.ensure(rules)
    roots = []
    for o in outputs:
        ge = torch.autograd.graph.get_gradient_edge(o)
        roots.append((ge.node, ge.output_nr))
    graph = capture(roots)
    plan_targets = []
    for t in targets:
        if t["kind"] == "tensor":
            x = ins[t["input"]]
            if not isinstance(x, torch.Tensor):
                raise InvalidInputError(f"input {t['input']} is not a tensor")
            plan_targets.append({"edge": list(graph.edge_of(x)), "kind": "tensor",
                                 "index": t["input"]})
    for index in token_inputs:
        for nid in _embedding_nodes_for(ins[index], graph):
            plan_targets.append({"edge": [nid, 0], "kind": "tokens", "index": index})
    module_of = recorder.assign(graph) if recorder is not None else {}
    matched = [[nid, path] for nid, path in sorted(module_of.items())
               if ruleset.module_params(path)]
    key = fingerprint(graph, [[t["edge"], t["kind"], t["index"]] for t in plan_targets],
                      ruleset.config(), extra=matched)
    store = _store_for(cache)
    with torch.no_grad():
        return _run(graph, key, store, seeds, plan_targets, ruleset, ins, module_of)


def _run(graph: Graph, key: str, store: _PlanStore, seeds: list, plan_targets: list,
         ruleset: RuleSet, ins: list, module_of: dict[int, str]):
    hit = store.get(key, len(graph))
    cached = hit is not None
    if hit is not None:
        plan, bound = hit
        ex = replay(plan, graph, list(zip(plan.header["roots"], seeds)), bound)
    else:
        plan, ex = Tracer(graph, plan_targets, ruleset, module_of).run(seeds)
        plan = Plan(key, plan.header, plan.steps, plan.n_rel, plan.n_val, plan.targets,
                    plan.assumptions, plan.stats)
        store.put(plan)
    # results per explained input
    out: list[Optional[torch.Tensor]] = [None] * len(ins)
    for k, t in enumerate(plan.targets):
        r = ex.results[k]
        if r is None:
            continue
        idx = t["index"]
        if t["kind"] == "tokens":
            r = r.sum(-1).reshape(ins[idx].shape)
        out[idx] = r if out[idx] is None else out[idx] + r
    for i, x in enumerate(ins):
        if out[i] is None and isinstance(x, torch.Tensor) and x.is_floating_point():
            out[i] = torch.zeros(x.shape, dtype=seeds[0].dtype, device=x.device)
    ledger = Ledger(seeds, ex.results, ex.ledger_rows, graph.types)
    return out, ledger, cached, plan.key, plan


# ---------------------------------------------------------------------------------------------
# model level

Target = Union[None, int, Sequence[int], torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def _main_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        if "logits" in out.keys():
            return out["logits"]
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, torch.Tensor):
                return v
    raise InvalidInputError(f"cannot find a tensor in the model output of type {type(out).__name__}")


def _scores(out: torch.Tensor, target: Target) -> tuple[torch.Tensor, Any]:
    """One score per sample and the target that selected it."""
    if callable(target) and not isinstance(target, torch.Tensor):
        score = target(out)
        if not isinstance(score, torch.Tensor) or score.dim() != 1 or score.shape[0] != out.shape[0]:
            raise InvalidInputError("a target callable must return one score per sample "
                                    f"(shape [{out.shape[0]}])")
        return score, target
    if out.dim() == 0:  # a model that returns one scalar: explain that scalar
        return out.reshape(1), None
    logits = out if out.dim() <= 2 else out[:, -1]  # sequence models: the last position
    if logits.dim() == 1:
        logits = logits.unsqueeze(0) if out.shape[0] != 1 else logits.reshape(1, -1)
    batch, n_classes = logits.shape[0], logits.shape[-1]
    if target is None:
        idx = logits.detach().argmax(-1)
    elif isinstance(target, int):
        idx = torch.full((batch,), target, dtype=torch.long, device=logits.device)
    else:
        idx = torch.as_tensor(target, device=logits.device).long().reshape(-1)
        if idx.numel() != batch:
            raise InvalidInputError(f"{idx.numel()} targets for a batch of {batch}")
    if ((idx < -n_classes) | (idx >= n_classes)).any():
        raise InvalidInputError(f"target {idx.tolist()} out of range for {n_classes} outputs")
    score = logits.gather(-1, (idx % n_classes).unsqueeze(-1)).squeeze(-1)
    return score, idx


def _embedding_nodes_for(ids: torch.Tensor, graph: Graph) -> list[int]:
    """Ids of EmbeddingBackward0 nodes whose saved indices are (a view of) ``ids``."""
    found = []
    storage = ids.untyped_storage().data_ptr()
    for nid, ntype in enumerate(graph.types):
        if ntype == "EmbeddingBackward0":
            idx = graph.nodes[nid]._saved_indices
            if idx.untyped_storage().data_ptr() == storage and idx.numel() == ids.numel():
                found.append(nid)
    return found


class Explainer:
    """Repeated explanation of one model; the first call traces, later calls replay.

    Examples
    --------
    >>> import torch, lrpplan
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> explainer = lrpplan.Explainer(model, cache=False)
    >>> first = explainer(torch.randn(5, 4))
    >>> again = explainer(torch.randn(5, 4))
    >>> (first.cached, again.cached)
    (False, True)
    """

    def __init__(self, model: torch.nn.Module, rules: Any = None, cache: CacheArg = None) -> None:
        self.model = model
        self.rules = RuleSet.ensure(rules)
        self._store = _PlanStore(PlanCache.ensure(cache))

    def __call__(self, *args: Any, target: Target = None, **kwargs: Any) -> Attribution:
        return _explain(self.model, args, target, self.rules, self._store, kwargs)


def explain(model: torch.nn.Module, *args: Any, target: Target = None, rules: Any = None,
            cache: CacheArg = None, **kwargs: Any) -> Attribution:
    """Run ``model(*args, **kwargs)`` and explain the target score of each sample.

    Positional arguments are the explained inputs (floating-point tensors get relevance of their
    shape, integer token ids one relevance per token through the embedding); keyword arguments go
    to the model unattributed. The caller's tensors and the model are not modified.
    ``target``: ``None`` (argmax per sample), an int, a per-sample sequence or tensor, or a
    callable mapping the output to one score per sample.
    """
    return _explain(model, args, target, RuleSet.ensure(rules), _store_for(cache), kwargs)


def _explain(model, args, target, ruleset, store, kwargs) -> Attribution:
    if not args:
        raise InvalidInputError("explain needs at least one positional input")
    ins = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            ins.append(a.detach().clone().requires_grad_(True))
        else:
            ins.append(a)
    # frozen parameters (requires_grad False) make autograd drop the operands a rule needs
    # (a linear layer's input, a frozen bias); run the forward with detached, grad-requiring
    # stand-ins instead, through functional_call, so the model itself is never modified
    frozen = {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()
              if not p.requires_grad} if isinstance(model, torch.nn.Module) else {}
    recorder_ctx = record_modules(model) if ruleset.modules and \
        isinstance(model, torch.nn.Module) else contextlib.nullcontext()
    with torch.enable_grad(), recorder_ctx as recorder:
        if frozen:
            raw = torch.func.functional_call(model, frozen, tuple(ins), kwargs)
        else:
            raw = model(*ins, **kwargs)
        out = _main_output(raw)
        score, idx = _scores(out, target)
    targets = [{"kind": "tensor", "input": k} for k, a in enumerate(ins)
               if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if score.grad_fn is None:
        raise InvalidInputError("the model output does not depend on any input with gradients")
    token_inputs = [k for k, a in enumerate(ins) if isinstance(a, torch.Tensor)
                    and not a.is_floating_point() and not a.is_complex()]
    rel, ledger, cached, key, plan = _attribute([score], None, ruleset, store, ins, targets,
                                                token_inputs, recorder)
    relevance = rel[0] if len(ins) == 1 else tuple(rel)
    return Attribution(relevance, score.detach(), idx, ledger, cached, key, plan)
