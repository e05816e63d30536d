"""The rule registry: one :class:`OpSpec` per autograd node type, one :class:`Rule` per rule name.

An *op spec* says what the graph gives for a node type: where the node saved its input values,
whether it saved its output, how to re-run its forward operation (for Promise chains), and which
non-tensor saved attributes change what a rule does (they go into the fingerprint).

A *rule* says how relevance crosses the node. Rules are looked up by name, so a plan stores only
names and plain parameters. The traversal and the replay know no operation by name; they ask this
registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

Tensor = torch.Tensor
MaybeTensor = Optional[Tensor]

#: forward(node, input_values) -> output values (one per forward output)
ForwardFn = Callable[[Any, Sequence[MaybeTensor]], Sequence[Tensor]]


@dataclass(frozen=True)
class OpSpec:
    """What the autograd graph offers for one node type.

    Attributes
    ----------
    node_type:
        ``type(node).__name__``, e.g. ``"AddmmBackward0"``.
    rule:
        name of the default rule family (a key of :data:`RULES`).
    saved_inputs:
        input position -> ``_saved_*`` attribute holding that input's forward value.
    saved_outputs:
        output number -> ``_saved_*`` attribute holding that forward output.
    forward:
        re-runs the forward op from its input values (``None``: cannot be replayed).
    forward_inputs:
        the input positions ``forward`` needs (default: all).
    key_attrs:
        non-tensor saved attributes that go into the fingerprint.
    broadcasts:
        the op broadcasts its inputs: relevance for an input is summed back to the input's shape.
        For every other op a rule's relevance must have its input's shape exactly.
    fills:
        some output positions hold a constant that is no input (padding, a fill value, an
        operand autograd does not track): a routing rule books the relevance there as absorbed.
    zero_operands:
        input positions a forward replay may take as 0 when autograd does not track them (the
        accumulator an op adds into, usually ``torch.zeros``); recorded as an assumption.
    """

    node_type: str
    rule: str
    saved_inputs: Mapping[int, str] = field(default_factory=dict)
    saved_outputs: Mapping[int, str] = field(default_factory=dict)
    forward: Optional[ForwardFn] = None
    forward_inputs: Optional[tuple[int, ...]] = None
    key_attrs: tuple[str, ...] = ()
    broadcasts: bool = False
    fills: bool = False
    zero_operands: tuple[int, ...] = ()


OPS: dict[str, OpSpec] = {}


def register_op(
    node_types: str | Sequence[str],
    rule: str,
    *,
    saved_inputs: Mapping[int, str] | None = None,
    saved_outputs: Mapping[int, str] | None = None,
    forward: ForwardFn | None = None,
    forward_inputs: tuple[int, ...] | None = None,
    key_attrs: tuple[str, ...] = (),
    broadcasts: bool = False,
    fills: bool = False,
    zero_operands: tuple[int, ...] = (),
) -> None:
    """Register one or several node types sharing a spec."""
    if isinstance(node_types, str):
        node_types = (node_types,)
    for name in node_types:
        if name in OPS:
            raise RuntimeError(f"op spec for {name!r} registered twice")
        OPS[name] = OpSpec(
            name, rule, dict(saved_inputs or {}), dict(saved_outputs or {}), forward,
            forward_inputs, tuple(key_attrs), broadcasts, fills, tuple(zero_operands),
        )


def op_spec(node_type: str) -> Optional[OpSpec]:
    """The spec of a node type, or ``None`` if lrpplan does not know it."""
    return OPS.get(node_type)


@dataclass(frozen=True)
class Decision:
    """What a rule decided at trace time for one node; stored in the plan step.

    Attributes
    ----------
    values:
        input positions whose forward values the rule needs at run time.
    send:
        per input position: whether relevance is sent there (structural, never value-dependent).
    params:
        plain (msgpack-able) parameters for :meth:`Rule.run`.
    assumption:
        a documented assumption this node's rule makes (recorded with the result), or ``""``.
    lost_constant:
        the assumption is that a value autograd did not keep (a frozen bias, a constant
        operand) is 0, unless the node's forward output is supplied (``reuse_output``), which
        recovers it exactly; the tracer records the assumption only when it is not, and the
        explanation then warns (:class:`~lrpplan.errors.LRPWarning`).
    """

    values: tuple[int, ...]
    send: tuple[bool, ...]
    params: Mapping[str, Any] = field(default_factory=dict)
    assumption: str = ""
    lost_constant: bool = False


@dataclass(frozen=True)
class NodeInfo:
    """Trace-time view of a node given to :meth:`Rule.decide`."""

    node: Any
    node_type: str
    n_inputs: int
    n_outputs: int
    live_inputs: tuple[bool, ...]  # input edge leads (eventually) to an attribution target
    none_inputs: tuple[bool, ...]  # input edge is (None, 0): a constant autograd does not track
    input_shapes: tuple[Optional[tuple[int, ...]], ...]
    output_shapes: tuple[tuple[int, ...], ...]
    recoverable: Callable[[int], bool]  # can the forward value of input i be had?
    params: Mapping[str, Any] = field(default_factory=dict)  # the rule set's parameters
    first_layer: bool = False  # an explained operand comes straight from an explained input
    #: type of the first node below input i that is not pure routing ("" at a target/leaf)
    source_type: Callable[[int], str] = lambda i: ""
    #: the node's forward output is saved somewhere in the graph (no replay needed)
    output_available: Callable[[], bool] = lambda: False
    #: where the node sits in the graph, for error messages
    position: str = ""


class Rule:
    """How relevance crosses one kind of node.

    Subclasses set ``name`` and implement :meth:`decide` (trace time, structural) and :meth:`run`
    (every time; pure tensor math, no traversal). ``run`` receives the relevance at each forward
    output (``None`` where none arrived), the forward values of the inputs listed in
    ``Decision.values`` (others ``None``) and ``Decision.params`` merged with the rule-set
    parameters; it returns relevance per input (``None`` where ``Decision.send`` is False),
    each of its input's shape (summed back by the executor only for ops that broadcast), and,
    where :meth:`absorbs` says so, one more item: the relevance the node absorbs.
    """

    name: str = ""
    #: parameter names this rule reads from the rule set, with defaults
    defaults: Mapping[str, Any] = {}
    #: the relevance it sends is a rearrangement of the relevance it received (gradient
    #: routing): zero wherever the input value is zero if the received relevance was
    routes_relevance: bool = False

    def proportional(self, p: Mapping[str, Any]) -> bool:
        """The relevance sent to each input is that input's value times finite factors (so it
        is exactly zero wherever the value is zero), for a step with parameters ``p``."""
        return False

    def absorbs(self, p: Mapping[str, Any]) -> bool:
        """Whether a step with parameters ``p`` absorbs relevance (part of the ledger check).

        False: the rule conserves, Σ sent == Σ received. True: :meth:`run` returns
        ``len(p["send"]) + 1`` items, the last a 0-d tensor in the relevance dtype: the relevance
        the node absorbs, computed from the rule's own terms (a bias share Σ b·s, an ε share
        Σ ε·sign(z)·s, an unsent operand's or a constant's share, an absorbing fallback's
        inflow), never as received − sent. The ledger compares it with received − sent
        (:meth:`lrpplan.Ledger.leaks`).
        """
        return False

    def decide(self, info: NodeInfo) -> Decision:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, node: Any, rel: Sequence[MaybeTensor], vals: Sequence[MaybeTensor],
            p: Mapping[str, Any]) -> list[MaybeTensor]:  # pragma: no cover - interface
        raise NotImplementedError


RULES: dict[str, Rule] = {}


def register_rule(cls: type[Rule]) -> type[Rule]:
    """Class decorator: instantiate the rule and file it under ``cls.name``."""
    if not cls.name or cls.name in RULES:
        raise RuntimeError(f"rule name {cls.name!r} empty or registered twice")
    RULES[cls.name] = cls()
    return cls


def get_rule(name: str) -> Rule:
    """The rule registered under ``name`` (KeyError names the known rules)."""
    try:
        return RULES[name]
    except KeyError:
        raise KeyError(f"unknown rule {name!r}; known: {sorted(RULES)}") from None


# ---------------------------------------------------------------------------------------------
# small tensor helpers shared by rules


def own_output(vals: Sequence[MaybeTensor], p: Mapping[str, Any]) -> MaybeTensor:
    """The node's forward output when the plan supplies it (the slot after the inputs')."""
    n_inputs = len(p["send"])
    return vals[n_inputs] if len(vals) > n_inputs else None


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + eps * sign(z)`` with sign(0) = +1 (Zennit's convention)."""
    if eps == 0.0:
        return z
    # sign(z) + 0.5 has the sign of z with sign(±0) = +1; five vectorised passes are several
    # times faster than torch.where on CPU and give the same bits
    return torch.sign(z).add_(0.5).sign_().mul_(eps).add_(z)


def stable_div(r: Tensor, z: Tensor, eps: float, nonneg: bool = False) -> Tensor:
    """``r / stabilize(z, eps)``, written into the one temporary ``stabilize`` allocates.

    ``nonneg``: ``z`` is known to be ≥ 0 (a ReLU's result), so ``stabilize`` is ``z + eps``.
    """
    if nonneg and not eps:
        # a ReLU's result stands in for z: where it is 0 the relevance arriving is exactly 0
        # (the stand-in's condition), and 0 / 0 there is 0, not NaN
        return r / z.masked_fill(z == 0, 1)
    d = (z + eps if eps else z) if nonneg else stabilize(z, eps)
    if d is not z and d.shape == r.shape and d.dtype == torch.result_type(r, d) \
            and not (torch.is_grad_enabled() and (r.requires_grad or d.requires_grad)):
        return torch.div(r, d, out=d)
    return r / d


def stable_div_share(r: Tensor, z: Tensor, eps: float, nonneg: bool = False
                     ) -> tuple[Tensor, Optional[Tensor]]:
    """``(s, a)``: ``s = r / stabilize(z, eps)`` as :func:`stable_div` gives it, and the ε
    share ``a = Σ ε·sign(z)·s`` (a 0-d tensor; ``None`` when ``eps`` is 0), the relevance the
    stabiliser absorbs. Costs one product-sum over ``z`` more than :func:`stable_div`."""
    if eps == 0.0:
        return stable_div(r, z, 0.0, nonneg), None
    if nonneg:  # z ≥ 0: stabilize(z) = z + eps
        s = stable_div(r, z, eps, True)
        return s, s.sum() * eps
    e = torch.sign(z).add_(0.5).sign_().mul_(eps)  # ε·sign(z), sign(0) = +1
    d = e + z
    if d.shape == r.shape and d.dtype == torch.result_type(r, d) \
            and not (torch.is_grad_enabled() and (r.requires_grad or d.requires_grad)):
        s = torch.div(r, d, out=d)
    else:
        s = r / d
    if e.shape == s.shape and e.dtype == s.dtype:
        return s, torch.dot(e.reshape(-1), s.reshape(-1))
    return s, (e * s).sum()


def dot_sum(a: Tensor, b: Tensor) -> Tensor:
    """Σ a·b with ``a`` broadcast against ``b`` (a 0-d tensor): ``b`` is summed to ``a``'s
    shape first, so a per-channel bias costs one reduction of ``b``."""
    if a.dim() > b.dim():
        return (a * b).sum()
    b = sum_to(b, a.shape)
    if a.shape == b.shape and a.dtype == b.dtype:
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum()


def add_parts(parts: Sequence[Optional[Tensor]], like: Tensor) -> Tensor:
    """The sum of the 0-d parts that are not None (a 0-d zero of ``like``'s dtype if none)."""
    out = None
    for t in parts:
        if t is not None:
            out = t if out is None else out + t
    return like.new_zeros(()) if out is None else out


def sum_to(t: Tensor, shape: Sequence[int]) -> Tensor:
    """Sum a broadcast tensor back to ``shape`` (the transpose of broadcasting)."""
    shape = tuple(shape)
    if tuple(t.shape) == shape:
        return t
    return t.sum_to_size(shape) if len(shape) else t.sum()


def as_rel(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast a forward value to the relevance dtype (fp32 accumulation for half models)."""
    return t if t.dtype == dtype else t.to(dtype)
