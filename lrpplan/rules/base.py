"""The rule registry: one :class:`OpSpec` per autograd node type, one :class:`Rule` per rule name.

An *op spec* says what the graph gives for a node type and how the op computes: where the node
saved its input values, whether it saved its output, its static attributes (plain data that
goes into the plan key and into every step), the attributes read at run time (sizes, bounds,
index tensors), its forward op and its gradient as pure functions, and the facts the value
resolver uses (a view, an invertible map, a sum of two operands, a leaf...).

A *rule* says how relevance crosses the node, in two parts (STYLE.md point 13, "a step is an
equation"): :meth:`Rule.decide` learns at compile time what it needs from the node (structure
only), and :meth:`Rule.run` computes relevance from tensors and plain parameters alone, never
touching the live graph. Rules are looked up by name, so a plan stores only names and data.
The compiler and the executor know no operation by name; they ask this registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

Tensor = torch.Tensor
MaybeTensor = Optional[Tensor]
#: the attributes a forward, VJP or rule gets: static attributes and run-time reads by name
Attrs = Mapping[str, Any]

#: forward(input values, attrs) -> output values (one per forward output)
ForwardFn = Callable[[Sequence[MaybeTensor], Attrs], Sequence[Tensor]]
#: vjp(relevance per output, attrs) -> one tensor (or None) per input: the op's gradient
VjpFn = Callable[[Sequence[MaybeTensor], Attrs], Sequence[MaybeTensor]]
#: inverse(output value, attrs) -> input value (single-input views and copies)
InverseFn = Callable[[Tensor, Attrs], Tensor]


def signed(v: Any) -> Any:
    """A saved int64 (or a tuple / list of them) read back signed: autograd exposes a negative
    dim, slice bound, shift or pad as unsigned 64-bit (``_saved_end`` = 2**64 − 2 for −2).
    Scalars (``alpha``, ``min``, ``exponent``) already come back signed; anything else passes."""
    if isinstance(v, (tuple, list)):
        return tuple(signed(x) for x in v)
    if isinstance(v, int) and not isinstance(v, bool):
        return v - (1 << 64) if v >= (1 << 63) else v
    return v


_UNSIGNED = 1 << 63


def plain(v: Any) -> Any:
    """A non-tensor saved attribute as plain data that survives a msgpack round trip: sizes and
    tuples become lists of ints, negative ints read back signed."""
    kind = type(v)
    if kind is int:  # the common case first: the plan key reads every node's attributes
        return v - (1 << 64) if v >= _UNSIGNED else v
    if kind is bool or kind is float or kind is str or v is None:
        return v
    if kind is tuple or kind is list or kind is torch.Size:
        return [plain(x) for x in v]
    if kind is torch.dtype:
        return str(v)
    if isinstance(v, torch.Tensor):
        raise TypeError("a tensor is no static attribute")
    return signed(v)


@dataclass(frozen=True)
class OpSpec:
    """What lrpplan knows about one autograd node type.

    Attributes
    ----------
    node_type:
        ``type(node).__name__``, e.g. ``"AddmmBackward0"``.
    rule:
        name of the default rule (a key of :data:`RULES`).
    saved_inputs / saved_outputs:
        input position / output number -> ``_saved_*`` attribute holding that forward value.
    forward:
        re-runs the forward op from input values and attributes (``None``: cannot be replayed).
    forward_inputs:
        the input positions ``forward`` needs (default: all).
    attrs:
        static attributes: ``_saved_<name>`` attributes that are structure, not sizes (dims,
        kernel sizes, flags, modes). They go into the plan key and, as plain data, into every
        step of the node (``attrs[name]``), so no rule reads them from the live node.
    facts:
        static facts computed from the node (name -> ``fn(node) -> plain data``): the number of
        outputs of a split, whether a convolution has a bias. In the key and the steps, like
        ``attrs``.
    reads:
        ``_saved_<name>`` attributes read at run time by value ops (sizes, slice bounds, index
        tensors, masks): they follow batch size and sequence length, so they are not in the key.
    meta:
        shapes read at run time: ``"in_shapes"`` (one per input) and/or ``"out_shapes"``.
    vjp:
        the op's gradient as a pure function of the relevance and the attributes (routing
        rules send relevance through it). ``None``: rules that need it read the node's own
        backward as a value (``backward`` value op), which a compiled replay cannot fuse.
    broadcasts:
        the op broadcasts its inputs: relevance for an input is summed back to its shape.
    fills:
        some output positions hold a constant that is no input (padding, a fill value): a
        routing rule books the relevance there as absorbed.
    zero_operands:
        input positions a forward replay may take as 0 when autograd does not track them (the
        accumulator an op adds into, an operand of a sum); recorded as an assumption.
    hides_value:
        ``fn(attrs) -> positions`` whose untracked (``None``) edge hides a real value (a frozen
        bias): a forward replay that takes it as 0 records an assumption.
    lossy:
        a forward replay of this op cannot be exact; what it assumes (recorded).
    view:
        the output is a view of input 0 (a value saved further down a chain of views is a view
        whose ``_base`` is the value entering the chain).
    aliases:
        the output may alias another tensor (a view, a leaf, an in-place write): never the start
        of a ``_base`` lookup.
    inverse:
        input 0's value from the output value (single-input views and copies).
    leaf:
        a leaf's accumulator (``AccumulateGrad``): its variable is the value.
    sum_of_two:
        the output is input 0 + input 1 when ``attrs["alpha"] == 1`` (an operand is the output
        minus the other operand).
    stands_in:
        its saved result (``_saved_result``) can stand in for its input in a denominator where
        the relevance arriving is zero wherever that result is (ReLU).
    """

    node_type: str
    rule: str
    saved_inputs: Mapping[int, str] = field(default_factory=dict)
    saved_outputs: Mapping[int, str] = field(default_factory=dict)
    forward: Optional[ForwardFn] = None
    forward_inputs: Optional[tuple[int, ...]] = None
    attrs: tuple[str, ...] = ()
    facts: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    reads: tuple[str, ...] = ()
    meta: tuple[str, ...] = ()
    vjp: Optional[VjpFn] = None
    broadcasts: bool = False
    fills: bool = False
    zero_operands: tuple[int, ...] = ()
    hides_value: Optional[Callable[[Attrs], tuple[int, ...]]] = None
    lossy: str = ""
    view: bool = False
    aliases: bool = False
    inverse: Optional[InverseFn] = None
    leaf: bool = False
    sum_of_two: bool = False
    stands_in: bool = False
    #: prefix of the node attributes ``attrs`` and ``reads`` name ("" for the ``ctx``
    #: attributes of a custom autograd Function)
    attr_prefix: str = "_saved_"

    def static(self, node: Any) -> dict[str, Any]:
        """The node's static attributes and facts as plain data (key and steps)."""
        out = {name: plain(getattr(node, self.attr_prefix + name, None)) for name in self.attrs}
        for name, fn in self.facts.items():
            out[name] = plain(fn(node))
        return out


OPS: dict[str, OpSpec] = {}


def register_op(node_types: str | Sequence[str], rule: str, **fields: Any) -> None:
    """Register one or several node types sharing a spec (fields as in :class:`OpSpec`)."""
    if isinstance(node_types, str):
        node_types = (node_types,)
    for name in node_types:
        if name in OPS:
            raise RuntimeError(f"op spec for {name!r} registered twice")
        OPS[name] = OpSpec(name, rule, **fields)


def op_spec(node_type: str) -> Optional[OpSpec]:
    """The spec of a node type, or ``None`` if lrpplan does not know it."""
    return OPS.get(node_type)


@dataclass(frozen=True)
class Decision:
    """What a rule decided at compile time for one node; stored in the plan step.

    Attributes
    ----------
    values:
        input positions whose forward values the rule needs at run time (``x[pos]``).
    send:
        per input position: whether relevance is sent there (structural, never value-dependent).
    params:
        plain (msgpack-able) parameters for :meth:`Rule.run`.
    assumption:
        a documented assumption this node's rule makes (recorded with the result), or ``""``.
    lost_constant:
        the assumption is that a value autograd did not keep (a frozen bias, a constant
        operand) is 0, unless the node's forward output is supplied (``reuse_output``), which
        recovers it exactly; the compiler records the assumption only when it is not, and the
        explanation then warns (:class:`~lrpplan.errors.LRPWarning`).
    reads:
        ``_saved_<name>`` attributes of the node the rule reads at run time (``x[name]``), on
        top of the op spec's ``reads``.
    backward:
        the rule calls the op's gradient and the op has no pure one: the node's own backward is
        read as a value (``x["backward"]``).
    """

    values: tuple[int, ...]
    send: tuple[bool, ...]
    params: Mapping[str, Any] = field(default_factory=dict)
    assumption: str = ""
    lost_constant: bool = False
    reads: tuple[str, ...] = ()
    backward: bool = False


@dataclass(frozen=True)
class NodeInfo:
    """Compile-time view of a node given to :meth:`Rule.decide`."""

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
    #: the node's static attributes (:meth:`OpSpec.static`), as its steps get them
    attrs: Mapping[str, Any] = field(default_factory=dict)
    #: the op spec (None for a node type lrpplan does not know)
    spec: Optional[OpSpec] = None


class Rule:
    """How relevance crosses one kind of node.

    Subclasses set ``name`` and implement :meth:`decide` (compile time, structural) and
    :meth:`run` (every time; pure tensor math). ``run(rel, x, p)`` receives the relevance at
    each forward output (``None`` where none arrived); ``x``, a mapping with the forward values
    of the inputs listed in ``Decision.values`` (``x[pos]``), the node's own forward output
    where the plan supplies it (``x["out"]``) and the node's attributes (static ones and
    run-time reads, ``x["dim"]``); and ``p``, ``Decision.params`` merged with the rule-set
    parameters, ``p["send"]`` and ``p["node_type"]``. It returns relevance per input
    (``None`` where not sent), each of its input's shape (summed back by the executor only for
    ops that broadcast), and, where :meth:`absorbs` says so, one more item: the relevance the
    node absorbs.
    """

    name: str = ""
    #: parameter names this rule reads from the rule set, with defaults
    defaults: Mapping[str, Any] = {}
    #: the relevance it sends is a rearrangement of the relevance it received (gradient
    #: routing): zero wherever the input value is zero if the received relevance was
    routes_relevance: bool = False
    #: :meth:`run` calls the op's gradient (:func:`vjp_of`)
    uses_gradient: bool = False
    #: :meth:`run` works on relevance with a batch of targets in front (``torch.func.vmap``:
    #: no writes of relevance into buffers made from forward values); see :mod:`lrpplan.many`
    batched_relevance: bool = True

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

    def run(self, rel: Sequence[MaybeTensor], x: Attrs,
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
# what a rule may call: the op's forward and gradient, from the step's data alone


def forward_of(p: Mapping[str, Any]) -> ForwardFn:
    """The forward op of the step's node type (``p["node_type"]``)."""
    fwd = OPS[p["node_type"]].forward
    if fwd is None:
        raise KeyError(f"{p['node_type']} has no forward replay")
    return fwd


def vjp_of(p: Mapping[str, Any], x: Attrs) -> VjpFn:
    """The op's gradient: the pure one of its spec, else (``p["node_vjp"]``, set by the compiler
    for a :attr:`Decision.backward`) the node's own backward that the plan read as a value
    (``x["backward"]``)."""
    spec = OPS.get(p["node_type"])
    if spec is not None and spec.vjp is not None and not p.get("node_vjp"):
        return spec.vjp
    node_backward = x["backward"]
    return lambda rel, a: _call_backward(node_backward, rel)


def _call_backward(node_backward: Any, rel: Sequence[MaybeTensor]) -> list[MaybeTensor]:
    ref = next(r for r in rel if r is not None)
    try:
        grads = node_backward(*rel)
    except RuntimeError:  # some backward kernels insist on the forward dtype
        dt = node_backward._input_metadata[0].dtype
        grads = node_backward(*[None if r is None else r.to(dt) for r in rel])
    grads = grads if isinstance(grads, tuple) else (grads,)
    return [None if g is None else (g.to_dense() if g.is_sparse else g).to(ref.dtype)
            for g in grads]


def autograd_vjp(forward: ForwardFn, at: Sequence[Any] = ()) -> VjpFn:
    """A VJP for a rarely used op, from its forward: autograd differentiates ``forward`` at a
    point. ``at[pos]`` names the entry of the attributes holding input ``pos``'s value (a saved
    input read at run time, or a forward value the rule has): ops whose gradient depends on the
    values (max-like ops, products of several operands) are differentiated there. Inputs
    without an entry are taken at zeros of ``a["in_shapes"][pos]``: ops linear in them have the
    same gradient everywhere. Exact by construction; costs the forward once more, and a
    compiled replay does not fuse across it."""
    def vjp(rel: Sequence[MaybeTensor], a: Attrs) -> list[MaybeTensor]:
        ref = next(r for r in rel if r is not None)
        shapes = a.get("in_shapes") or [None] * len(at)
        ins: list[MaybeTensor] = []
        for pos, shape in enumerate(shapes):
            key = at[pos] if pos < len(at) else None
            value = a.get(key) if key is not None else None
            if value is not None:
                t = value.detach().to(ref.dtype) if value.is_floating_point() else None
            elif shape is not None:
                t = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
            else:
                t = None
            ins.append(None if t is None else t.requires_grad_(True))
        with torch.enable_grad():
            outs = forward(ins, a)
            pairs = [(o, r) for o, r in zip(outs, rel) if r is not None]
            wrt = [t for t in ins if t is not None]
            grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [r for _, r in pairs],
                                             allow_unused=True))
        return [None if t is None else next(grads) for t in ins]
    vjp.by_autograd = True  # type: ignore[attr-defined]  (not under torch.func.vmap)
    return vjp


# ---------------------------------------------------------------------------------------------
# small tensor helpers shared by rules


def own_output(x: Attrs) -> MaybeTensor:
    """The node's forward output when the plan supplies it."""
    return x.get("out")


#: (ε, dtype, device) -> ε as a 0-d tensor, made once (a scalar argument would cost a fill)
_SCALARS: dict[tuple[float, torch.dtype, torch.device], Tensor] = {}


def scalar(value: float, like: Tensor) -> Tensor:
    """``value`` as a 0-d tensor of ``like``'s dtype and device, cached."""
    key = (value, like.dtype, like.device)
    t = _SCALARS.get(key)
    if t is None:
        t = _SCALARS[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return t


def eps_sign(z: Tensor, eps: float) -> Tensor:
    """``ε·sign(z)`` with sign(+0) = +1 (Zennit's convention), in one element-wise pass.

    ``copysign`` gives a negative zero −ε; a matrix product or a sum never produces one (its
    accumulator starts at +0), so only an explicit ``-0.0`` in the data differs from Zennit's
    ``(z == 0) + sign(z)``, which gives it +ε.
    """
    return torch.copysign(scalar(eps, z), z)


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + ε·sign(z)`` (sign as in :func:`eps_sign`)."""
    if eps == 0.0:
        return z
    return eps_sign(z, eps).add_(z)


def batched(t: Tensor) -> bool:
    """``t`` carries a batch of targets (inside :func:`torch.func.vmap`, :mod:`lrpplan.many`)."""
    return torch._C._functorch.is_batchedtensor(t)


def into(dst: Tensor, src: Tensor) -> bool:
    """An in-place op on ``dst`` (a temporary) with ``src`` may write into ``dst``: not when
    ``src`` carries a batch of targets and ``dst`` does not."""
    return not batched(src) or batched(dst)


def _in_place_ok(r: Tensor, d: Tensor) -> bool:
    """``r / d`` may be written into ``d`` (a temporary): same shape and dtype, no autograd,
    not inside ``torch.compile`` (which plans its own buffers) nor with a batch of targets in
    ``r`` only."""
    return d.shape == r.shape and d.dtype == r.dtype and not torch.compiler.is_compiling() \
        and into(d, r) \
        and not (torch.is_grad_enabled() and (r.requires_grad or d.requires_grad))


def stable_div(r: Tensor, z: Tensor, eps: float, nonneg: bool = False) -> Tensor:
    """``r / stabilize(z, eps)``, written into the one temporary ``stabilize`` allocates.

    ``nonneg``: ``z`` is known to be ≥ 0 (a ReLU's result), so ``stabilize`` is ``z + eps``.
    """
    if nonneg and not eps:
        # a ReLU's result stands in for z: where it is 0 the relevance arriving is exactly 0
        # (the stand-in's condition), and 0 / 0 there is 0, not NaN
        return r / z.masked_fill(z == 0, 1)
    d = (z + eps if eps else z) if nonneg else stabilize(z, eps)
    if d is not z and _in_place_ok(r, d):
        return torch.div(r, d, out=d)
    return r / d


def stable_div_share(r: Tensor, z: Tensor, eps: float, nonneg: bool = False,
                     bias: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """``(s, a)``: ``s = r / stabilize(z, eps)`` as :func:`stable_div` gives it, and the share
    the stabiliser absorbs, ``a = Σ ε·sign(z)·s`` (a 0-d tensor; ``None`` when ``eps`` is 0 and
    there is no ``bias``).

    ``bias``: a term of ``z`` that absorbs its share too (broadcastable to ``z``): then
    ``a = Σ (ε·sign(z) + bias)·s``, both shares in one reduction.
    """
    if nonneg:  # z ≥ 0: stabilize(z) = z + eps, ε·sign(z) = ε
        s = stable_div(r, z, eps, True)
        if bias is None:
            return s, (s.sum() * eps if eps else None)
        return s, dot_sum(bias + eps if eps else bias, s)
    if eps == 0.0:
        s = stable_div(r, z, 0.0)
        return s, (None if bias is None else dot_sum(bias, s))
    e = eps_sign(z, eps)
    d = e + z
    s = torch.div(r, d, out=d) if _in_place_ok(r, d) else r / d
    if bias is not None and expands_to(bias.shape, e.shape):
        e.add_(bias)
        bias = None
    share = _dot(e, s) if e.shape == s.shape and e.dtype == s.dtype else (e * s).sum()
    return s, (share if bias is None else share + dot_sum(bias, s))


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


def expands_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """A tensor of ``shape`` broadcasts to ``target`` without growing it."""
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def dot_sum(a: Tensor, b: Tensor) -> Tensor:
    """Σ a·b with ``a`` broadcast against ``b`` (a 0-d tensor): ``b`` is summed to ``a``'s
    shape first, so a per-channel bias costs one reduction of ``b``."""
    if a.dim() > b.dim():
        return (a * b).sum()
    b = sum_to(b, a.shape)
    if a.shape == b.shape and a.dtype == b.dtype:
        return _dot(a, b)
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
