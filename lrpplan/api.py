"""Public entry points: :func:`attribute`, :func:`explain`, :class:`Explainer`, :class:`Attribution`."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import torch

from .cache import PlanCache
from .compiled import CompiledPlan
from .config import RuleSet
from .errors import InvalidInputError, LRPWarning, UnrecoverableValueError
from .finite import check_finite
from .fingerprint import fingerprint
from .graph import Graph, capture
from .ledger import Book, Ledger, combined_ledger
from .many import DEFAULT_CHUNK, replay_many
from .modules import ModuleRecorder, record_modules
from .plan import Plan, check_plan, decode, encode
from .recording import ForwardRecording
from .replay import DetailedExecutor, Executor, Program, TracingExecutor, bind
from .rules import token_indices
from .targets import Target, is_callable_target, last_real_positions, output_tensor, select_scores
from .trace import compile_plan

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
    ledgers:
        one ledger per target (several targets per sample: ``ledger`` is their sum).
    """

    relevance: Any
    output: Any
    target: Any
    ledger: Ledger
    cached: bool
    plan_key: str
    plan: Plan = field(repr=False)
    ledgers: tuple = field(default=(), repr=False)

    @property
    def assumptions(self) -> tuple[str, ...]:
        """Documented assumptions rules made on this graph (e.g. an unsaved constant taken as 0)."""
        return self.plan.assumptions


# ---------------------------------------------------------------------------------------------
# graph level


class _PlanStore:
    """In-memory plan + bound steps (+ compiled replays) in front of the on-disk cache."""

    def __init__(self, cache: Optional[PlanCache], compile: bool = False) -> None:
        self.cache = cache
        self.memory: dict[str, tuple[Plan, Program]] = {}
        #: replay plans through torch.compile (lrpplan.compiled); per key
        self.compile = compile
        self.compiled: dict[str, CompiledPlan] = {}

    def replay(self, graph: Graph, plan: Plan, program: Program, seeds: list,
               executor: type[Executor]) -> Book:
        """Run a stored plan: compiled where asked for and possible, else eagerly."""
        if self.compile and executor is Executor:
            compiled = self.compiled.get(plan.key)
            if compiled is None:
                compiled = self.compiled[plan.key] = CompiledPlan(plan, program)
            book = compiled.run(graph, seeds)
            if book is not None:
                return book
        return executor(graph, plan, program).run(seeds).book()

    def get(self, key: str, n_nodes: int) -> Optional[tuple[Plan, Program]]:
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
        hit = (plan, bind(plan))
        self.memory[key] = hit
        return hit

    def put(self, plan: Plan, program: Program) -> None:
        self.memory[plan.key] = (plan, program)
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


#: ``ledger=`` choices: the executor a replay runs with
_LEDGER_EXECUTORS: dict[str, type[Executor]] = {"totals": Executor, "nodes": DetailedExecutor}


def _ledger_executor(ledger: str) -> type[Executor]:
    try:
        return _LEDGER_EXECUTORS[ledger]
    except (KeyError, TypeError):
        raise InvalidInputError(f"ledger={ledger!r}: use 'totals' (exact totals, the default) "
                                "or 'nodes' (also one row per node)") from None


def _chunk(chunk: Any) -> Optional[int]:
    """``chunk=``: None (every target at once) or a positive int of targets per replay."""
    if chunk is None:
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InvalidInputError(f"chunk={chunk!r}: pass None (all targets in one replay) or a "
                                "positive number of targets per replay")
    return chunk


def attribute(output: Any, inputs: Any, seed: Any = None, rules: Any = None,
              cache: CacheArg = None, ledger: str = "totals") -> Attribution:
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
    ledger:
        ``"totals"`` (default): a replay keeps the ledger's exact totals; ``"nodes"``: also one
        row per node (inflow, outflow, absorbed; :meth:`Ledger.leaks`), one reduction per
        deposit more. The first explanation of a graph always keeps the rows.

    Returns
    -------
    Attribution
    """
    outputs, _ = _as_list(output)
    ins, single = _as_list(inputs)
    targets = [{"kind": "tensor", "input": k} for k in range(len(ins))]
    result = _attribute(outputs, seed, rules, cache, ins, targets,
                        options=_Options(_ledger_executor(ledger)))
    rel = result.relevance
    return Attribution(rel[0] if single else tuple(rel), output, None, result.ledger,
                       result.cached, result.key, result.plan, tuple(result.ledgers))


@dataclass(frozen=True)
class _Options:
    """How an explanation runs: the replay's executor (the ledger's detail), and for several
    targets per sample (``[B, K]`` scores) how many travel together (``chunk``)."""

    executor: type[Executor] = Executor
    chunk: Optional[int] = DEFAULT_CHUNK


def _attribute(outputs: list, seed: Any, rules: Any, cache: CacheArg, ins: list,
               targets: list[dict], token_inputs: Sequence[int] = (),
               recorder: Optional[ModuleRecorder] = None,
               recording: Optional[ForwardRecording] = None,
               options: _Options = _Options(), columns: bool = False) -> _Explained:
    """Explain ``outputs`` (``columns``: one ``[B, K]`` output whose K columns are K targets,
    each explained alone, all in one replay)."""
    for o in outputs:
        if isinstance(o, torch.Tensor) and o.grad_fn is None and (
                o.is_inference() or torch.is_inference_mode_enabled()):
            raise InvalidInputError(_INFERENCE_MODE)
        if not isinstance(o, torch.Tensor) or o.grad_fn is None:
            raise InvalidInputError(
                "the explained output must be a tensor with a grad_fn (computed with gradients "
                "enabled from inputs or parameters that require grad)")
    # the seeds are checked with the results, in one synchronisation (lrpplan.finite)
    seed_error = "the explained output holds NaN or infinity"
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
            seeds.append(s.detach().to(_relevance_dtype(o)))
        seed_error = "seed holds NaN or infinity"
    seed_sets = [seeds]
    if columns:  # one seed per target: the output with every other column zero
        (s,) = seeds
        seed_sets = [[s * (torch.arange(s.shape[1], device=s.device) == k).to(s.dtype)]
                     for k in range(s.shape[1])]
    ruleset = RuleSet.ensure(rules)
    roots = []
    for o in outputs:
        ge = torch.autograd.graph.get_gradient_edge(o)
        roots.append((ge.node, ge.output_nr))
    graph = capture(roots)
    if recording is not None:
        graph.recorded = recording.values_for(graph)
        recording.clear()  # the graph's own values only from here on
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
    with torch.no_grad(), _no_autocast():
        result = _run(graph, key, store, seed_sets, plan_targets, ruleset, ins, module_of,
                      options, seed_error, columns)
    plan = result.plan
    lost = plan.stats.get("constants_taken_as_zero", 0)
    if lost:
        _warn_once(("constants", plan.key), (
            f"{lost} node(s) of this graph use a value autograd did not keep as 0, e.g. a bias "
            "of a layer whose parameters do not require grad (see Attribution.assumptions): "
            "its relevance is not the LRP of the model. Run the forward with "
            "requires_grad=True on the parameters, or use lrpplan.explain(model, x), which "
            "does so without modifying the model."))
    return result


def _no_autocast() -> contextlib.ExitStack:
    """Relevance is computed in float32/float64 even when the caller runs under autocast."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


class _Explained(NamedTuple):
    """What :func:`_run` gives back."""

    relevance: list  # per explained input (None where it is not a tensor)
    ledger: Ledger
    cached: bool
    key: str
    plan: Plan
    ledgers: list  # one per target


def _run(graph: Graph, key: str, store: _PlanStore, seed_sets: list[list[torch.Tensor]],
         plan_targets: list, ruleset: RuleSet, ins: list, module_of: dict[int, str],
         options: _Options = _Options(),
         seed_error: str = "the explained output holds NaN or infinity",
         columns: bool = False) -> _Explained:
    """Run (or trace and store) the plan for each seed set; relevance per explained input
    (``columns``: ``[B, K, ...]``, one map per target), the ledger, and the plan."""
    hit = store.get(key, len(graph))
    cached = hit is not None
    if hit is not None:
        plan, program = hit
        if len(seed_sets) == 1:
            books = [store.replay(graph, plan, program, seed_sets[0], options.executor)]
        else:
            books = replay_many(graph, plan, program, seed_sets, options.chunk)
    else:
        plan = compile_plan(graph, plan_targets, ruleset, key, module_of)
        program = bind(plan)
        books = [TracingExecutor(graph, plan, program).run(seed_sets[0]).book()]
        store.put(plan, program)
        if len(seed_sets) > 1:  # the first target traced (and checked), the others together
            books += replay_many(graph, plan, program, seed_sets[1:], options.chunk)
    # one synchronisation for every target: finite, or the node that broke it
    check_finite(graph, plan, seed_sets, books, seed_error)
    per_target = [_relevance_per_input(plan, book, ins, seeds[0].dtype)
                  for book, seeds in zip(books, seed_sets)]
    ledgers = [Ledger(seeds, book, graph.types) for seeds, book in zip(seed_sets, books)]
    if not columns:
        return _Explained(per_target[0], ledgers[0], cached, plan.key, plan, ledgers)
    out = [None if r[0] is None else torch.stack(r, 1) for r in zip(*per_target)]
    # one target: its own ledger, with the per-node rows the run kept
    ledger = ledgers[0] if len(ledgers) == 1 else combined_ledger(seed_sets, books, graph.types)
    return _Explained(out, ledger, cached, plan.key, plan, ledgers)


def _relevance_per_input(plan: Plan, book: Book, ins: list,
                         dtype: torch.dtype) -> list[Optional[torch.Tensor]]:
    """The book's results summed per explained input (token targets summed over the hidden
    dimension); zeros for a floating-point input no relevance reached."""
    out: list[Optional[torch.Tensor]] = [None] * len(ins)
    for k, t in enumerate(plan.targets):
        r = book.results[k]
        if r is None:
            continue
        idx = t["index"]
        if t["kind"] == "tokens":
            r = r.sum(-1).reshape(ins[idx].shape)
        out[idx] = r if out[idx] is None else out[idx] + r
    for i, x in enumerate(ins):
        if out[i] is None and isinstance(x, torch.Tensor) and x.is_floating_point():
            out[i] = torch.zeros(x.shape, dtype=dtype, device=x.device)
    return out


# ---------------------------------------------------------------------------------------------
# model level

def _embedding_nodes_for(ids: torch.Tensor, graph: Graph) -> list[int]:
    """Ids of embedding nodes whose saved indices are (a view of) ``ids``."""
    found = []
    storage = ids.untyped_storage().data_ptr()
    for nid, node in enumerate(graph.nodes):
        idx = token_indices(node, graph.types[nid])
        if idx is not None and idx.untyped_storage().data_ptr() == storage \
                and idx.numel() == ids.numel():
            found.append(nid)
    return found


class Explainer:
    """Repeated explanation of one model; the first call traces, later calls replay.

    Parameters
    ----------
    model:
        the model (a ``torch.compile``d one is explained through the module it wraps).
    rules:
        a preset name or a :class:`RuleSet` (default ``"epsilon"``).
    cache:
        a :class:`PlanCache`, a directory, ``None`` (default cache) or ``False`` (no disk cache).
    ledger:
        ``"totals"`` (default) or ``"nodes"`` (per-node rows on replays too; see
        :func:`attribute`).
    compile:
        replay plans through ``torch.compile`` (:mod:`lrpplan.compiled`): one function per plan
        whose element-wise chains fuse; the first replay of a plan compiles (seconds to minutes,
        ``explainer.compile_seconds``), later ones run the compiled code. Falls back to the
        eager replay with one :class:`LRPWarning` where compiling is impossible. Keeps the
        ledger's totals (not with ``ledger="nodes"``).

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

    def __init__(self, model: torch.nn.Module, rules: Any = None, cache: CacheArg = None,
                 ledger: str = "totals", compile: bool = False,
                 chunk: Optional[int] = DEFAULT_CHUNK) -> None:
        self.model = model
        self.rules = RuleSet.ensure(rules)
        self._options = _Options(_ledger_executor(ledger), _chunk(chunk))
        if compile and self._options.executor is not Executor:
            raise InvalidInputError("compile=True replays with the ledger's totals; "
                                    "ledger='nodes' needs the eager replay: choose one")
        self._store = _PlanStore(PlanCache.ensure(cache), compile=bool(compile))

    def __call__(self, *args: Any, target: Target = None, **kwargs: Any) -> Attribution:
        return _explain(self.model, args, target, self.rules, self._store, kwargs,
                        self._options)

    @property
    def compile_seconds(self) -> dict[str, list[float]]:
        """Plan key -> the seconds each compiling replay took (``compile=True``)."""
        return {key: list(c.compile_seconds) for key, c in self._store.compiled.items()}


def explain(model: torch.nn.Module, *args: Any, target: Target = None, rules: Any = None,
            cache: CacheArg = None, ledger: str = "totals",
            chunk: Optional[int] = DEFAULT_CHUNK, **kwargs: Any) -> Attribution:
    """Run ``model(*args, **kwargs)`` and explain the target score of each sample.

    Positional arguments are the explained inputs (floating-point tensors get relevance of their
    shape, integer token ids one relevance per token through the embedding); keyword arguments go
    to the model unattributed. The caller's tensors and the model (parameters and buffers) are
    not modified.

    ``target``: ``None`` (argmax per sample), an integer class, per-sample integers, or a
    callable that receives the model's own output (tensor, ``ModelOutput``, dict, tuple) and
    returns one score per sample. Without a callable the output (or its ``logits``) must be
    ``[B]`` scores, ``[B, C]`` logits or ``[B, T, C]`` sequence logits (see
    :mod:`lrpplan.targets`); for sequence logits the explained position of each sample is its
    last real token when an ``attention_mask`` (decoder-only models) or a
    ``decoder_attention_mask`` is passed, else the last position.

    ``ledger``: ``"totals"`` (default) or ``"nodes"`` (per-node rows on a replay too; see
    :func:`attribute`).

    Several targets per sample (``[B, K]`` classes, ``[B, K, 2]`` (position, token) pairs, or a
    callable returning ``[B, K]``) are explained in one vmapped replay per ``chunk`` targets
    (default 16; ``None``: all K at once); ``relevance`` is then ``[B, K, *input]``.
    """
    return _explain(model, args, target, RuleSet.ensure(rules), _store_for(cache), kwargs,
                    _Options(_ledger_executor(ledger), _chunk(chunk)))


def _explained_positions(model: Any, kwargs: dict, batch: int) -> Optional[torch.Tensor]:
    """The last real token of each sample, from the attention mask that covers the output's
    sequence (None: explain the last position)."""
    mask = kwargs.get("decoder_attention_mask")
    if mask is None:
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            return None  # attention_mask covers the encoder input, not the output sequence
        mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != batch:
        return None
    return last_real_positions(mask)


def _uncompiled(model: Any) -> Any:
    """The module a ``torch.compile``d model wraps (``OptimizedModule._orig_mod``: the same
    module, the same parameters), unwrapped as often as it was compiled; any other model as it
    is. A compiled forward puts a whole compiled graph into one autograd node, which no LRP rule
    can see into; the uncompiled forward computes the same function op by op."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # imported by torch.compile
    optimized = getattr(eval_frame, "OptimizedModule", None)
    while optimized is not None and isinstance(model, optimized):
        model = model._orig_mod
    return model


def _explain(model, args, target, ruleset, store, kwargs,
             options: _Options = _Options()) -> Attribution:
    """Run the model and explain the target scores (``explain`` and ``Explainer``). A
    ``torch.compile``d model is explained through the module it wraps (:func:`_uncompiled`):
    same parameters, same relevance as explaining that module.

    When the plan needs a value autograd keeps nowhere (:mod:`lrpplan.recording`), the forward
    runs once more with recording on, and so does every later forward of that model."""
    model = _uncompiled(model)
    if not args:
        raise InvalidInputError("explain needs at least one positional input")
    if torch.is_inference_mode_enabled():
        raise InvalidInputError(_INFERENCE_MODE)
    ins = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            if a.is_inference():
                raise InvalidInputError("input tensors created under torch.inference_mode() "
                                        "cannot take part in autograd; create them outside it "
                                        "(or pass x.clone() made outside inference_mode)")
            ins.append(a.detach().clone().requires_grad_(True))
        else:
            ins.append(a)
    record = _records_forward(model)
    while True:
        try:
            return _explain_once(model, ins, target, ruleset, store, kwargs, record, options)
        except UnrecoverableValueError:
            if record:
                raise
            record = True
            _remember_recording(model)


def _explain_once(model, ins, target, ruleset, store, kwargs, record: bool,
                  options: _Options = _Options()) -> Attribution:
    """One forward pass (recorded when ``record``) and its explanation."""
    first = next((a for a in ins if isinstance(a, torch.Tensor)), None)
    batch = first.shape[0] if first is not None and first.dim() > 0 else 1
    is_module = isinstance(model, torch.nn.Module)
    # frozen parameters (requires_grad False) make autograd drop the operands a rule needs
    # (a linear layer's input, a frozen bias); run the forward with detached, grad-requiring
    # stand-ins instead, through functional_call, so the model itself is never modified
    frozen = {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()
              if not p.requires_grad} if is_module else {}
    buffers = _BufferSnapshot(model) if is_module else None
    recorder_ctx = record_modules(model) if ruleset.modules and is_module \
        else contextlib.nullcontext()
    recording = ForwardRecording() if record else None
    try:
        with torch.enable_grad(), recorder_ctx as recorder, \
                recording if recording is not None else contextlib.nullcontext():
            if frozen:
                raw = torch.func.functional_call(model, frozen, tuple(ins), kwargs)
            else:
                raw = model(*ins, **kwargs)
            if is_module:
                _warn_if_training(model, buffers)
            positions = _explained_positions(model, kwargs, batch)
            score, idx = select_scores(raw, target, batch, positions)
        targets = [{"kind": "tensor", "input": k} for k, a in enumerate(ins)
                   if isinstance(a, torch.Tensor) and a.is_floating_point()]
        if score.grad_fn is None:
            raise InvalidInputError("the model output does not depend on any input with "
                                    "gradients")
        token_inputs = [k for k, a in enumerate(ins) if isinstance(a, torch.Tensor)
                        and not a.is_floating_point() and not a.is_complex()]
        columns = score.dim() == 2
        rel, ledger, cached, key, plan, ledgers = _attribute(
            [score], None, ruleset, store, ins, targets, token_inputs, recorder, recording,
            options, columns=columns)
        if columns and isinstance(idx, torch.Tensor) and idx.dim() == 1:  # one per sample
            rel, score = [None if r is None else r.squeeze(1) for r in rel], score.squeeze(1)
    finally:
        if buffers is not None:
            buffers.restore()
        if recording is not None:
            recording.clear()
    relevance = rel[0] if len(ins) == 1 else tuple(rel)
    return Attribution(relevance, score.detach(), idx, ledger, cached, key, plan, tuple(ledgers))


#: models (or callables) whose plans read values recorded during the forward pass
_RECORDING_MODELS: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _records_forward(model: Any) -> bool:
    try:
        return model in _RECORDING_MODELS
    except TypeError:  # not weakly referenceable
        return False


def _remember_recording(model: Any) -> None:
    try:
        _RECORDING_MODELS.add(model)
    except TypeError:
        pass


_INFERENCE_MODE = ("lrpplan cannot explain under torch.inference_mode(): autograd records no "
                   "graph there. Call it outside inference_mode (lrpplan turns gradients on "
                   "by itself, so torch.no_grad() around the call is fine)")


class _BufferSnapshot:
    """Every buffer of a model (running statistics, counters), restorable after a forward.

    One flat copy per dtype and device, and one comparison of it after the forward (a kernel
    each, not one per buffer: ATen updates BatchNorm's running statistics without moving their
    version counters, so the values are what is compared); only where a group changed are its
    buffers compared one by one and copied back."""

    def __init__(self, model: torch.nn.Module) -> None:
        buffers = [b for b in model.buffers() if b.numel()]
        groups: dict[tuple, list[torch.Tensor]] = {}
        for b in buffers:
            groups.setdefault((b.dtype, b.device), []).append(b)
        with torch.no_grad():
            self.groups = [(members, self._flat(members)) for members in groups.values()]

    @staticmethod
    def _flat(members: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([b.detach().reshape(-1) for b in members])

    def _pairs(self):
        """(buffer, its copy) of every group whose values changed."""
        for members, flat in self.groups:
            if torch.equal(self._flat(members), flat):
                continue
            offset = 0
            for b in members:
                copy = flat[offset:offset + b.numel()].view(b.shape)
                offset += b.numel()
                if not torch.equal(b, copy):
                    yield b, copy

    def changed(self) -> bool:
        """The forward changed a buffer's values."""
        with torch.no_grad():
            return any(True for _ in self._pairs())

    def restore(self) -> None:
        with torch.no_grad():
            for b, copy in list(self._pairs()):
                b.copy_(copy)


def _warn_if_training(model: torch.nn.Module, buffers: _BufferSnapshot) -> None:
    """Warn when training mode changed what the forward computed: a dropout module in training
    mode, or buffers (BatchNorm's running statistics) the forward pass updated."""
    dropout = any(m.training and isinstance(m, torch.nn.modules.dropout._DropoutNd)
                  and m.p > 0 for m in model.modules())
    updated = buffers.changed()
    if dropout or updated:
        if model in _WARNED_TRAINING:
            return
        _WARNED_TRAINING.add(model)
        _warn_once(("train", len(_WARNED_TRAINING), id(model)), (
            f"{type(model).__name__} is in training mode: "
            + ("dropout makes the explanation random" if dropout else "")
            + (" and " if dropout and updated else "")
            + ("batch statistics make it depend on the rest of the batch" if updated else "")
            + ". Call model.eval() first (lrpplan restored the buffers the forward updated)."))


_WARNED: set = set()
_WARNED_TRAINING: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def _warn_once(key: Any, message: str) -> None:
    """One :class:`LRPWarning` per key per process (Python's filter would show one per line)."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, LRPWarning, stacklevel=4)
