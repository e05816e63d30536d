"""Shape and routing ops: relevance follows the gradient's routing (view, permute, cat, index, max...).

These ops move or copy values without mixing them, so the gradient of the op *is* the
relevance-conserving redistribution; the rule calls the autograd node itself.
Also: the declared fallbacks ``identity``/``route``/``absorb`` and the opaque ``CopySlices``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..errors import RuleError
from .base import OPS, Decision, MaybeTensor, NodeInfo, Rule, add_parts, register_op, register_rule


def _dim(v: int) -> int:
    """Saved dims come back as unsigned 64-bit for negatives (e.g. softmax's dim=-1)."""
    return v - (1 << 64) if v >= (1 << 63) else v


def signed(v: Any) -> Any:
    """A saved int64 (or a tuple / list of them) read back signed: autograd exposes a negative
    dim, slice bound, shift or pad as unsigned 64-bit (``_saved_end`` = 2**64 − 2 for −2).
    Scalars (``alpha``, ``min``, ``exponent``) already come back signed; anything else passes."""
    if isinstance(v, (tuple, list)):
        return type(v)(signed(x) for x in v)
    if isinstance(v, int) and not isinstance(v, bool):
        return _dim(v)
    return v


def out_shape(node: Any, nr: int = 0) -> list[int]:
    return node._input_metadata[nr].shape


def _send_live(info: NodeInfo) -> tuple[bool, ...]:
    return tuple(live and not none for live, none in zip(info.live_inputs, info.none_inputs))


def _fills(p) -> bool:
    spec = OPS.get(p.get("node_type", ""))
    return spec is not None and spec.fills


@register_rule
class Route(Rule):
    """Relevance is routed exactly like the gradient: ``R_in = VJP(R_out)``.

    Conserving where every input is sent; otherwise the node absorbs the share routed to the
    inputs it does not send (an operand leading to no target, a constant) and, for ops that fill
    positions with a constant (padding, ``masked_fill``, ``where`` with an untracked operand),
    the relevance at those positions.
    """

    name = "route"
    routes_relevance = True

    def absorbs(self, p) -> bool:
        return not all(p["send"]) or _fills(p)

    def decide(self, info: NodeInfo) -> Decision:
        return Decision(values=(), send=_send_live(info))

    def run(self, node, rel, vals, p):
        ref = next(r for r in rel if r is not None)
        try:
            grads = node(*rel)
        except RuntimeError:  # some backward kernels insist on the forward dtype
            dt = node._input_metadata[0].dtype
            grads = node(*[None if r is None else r.to(dt) for r in rel])
        if not isinstance(grads, tuple):
            grads = (grads,)
        send = p["send"]
        out: list[MaybeTensor] = [g.to(ref.dtype) if (s and g is not None) else None
                                  for g, s in zip(grads, send)]
        out += [None] * (len(send) - len(out))
        if not self.absorbs(p):
            return out
        # the share of the inputs not sent, where the gradient gives it
        parts = [g.sum().to(ref.dtype) for g, s in zip(grads, send) if g is not None and not s]
        parts.append(self._constant_share(node, rel, grads, p))
        return out + [add_parts(parts, ref)]

    def _constant_share(self, node, rel, grads, p) -> Optional[torch.Tensor]:
        if _fills(p) or any(g is None for g in grads):
            return _unrouted(node, rel, grads, p)
        return None


def _unrouted(node, rel, grads, p) -> Optional[torch.Tensor]:
    """Σ relevance at the output positions the gradient routes to no input (a constant's
    share): ``Σ R·(1 − f(1))`` with ``f`` the op's forward on ones for every input the gradient
    reaches (zeros elsewhere); exact for ops that copy values (each output position holds one
    input value or a constant)."""
    fwd = p.get("forward")
    if fwd is None:
        return None
    ins = [torch.ones_like(g) if g is not None else None for g in grads]
    try:
        kept = fwd(node, ins)
    except Exception:  # noqa: BLE001 - a forward that needs every operand: nothing to book
        return None
    parts = [(r * (1 - k.to(r.dtype))).sum() for r, k in zip(rel, kept) if r is not None]
    return add_parts(parts, next(r for r in rel if r is not None))


@register_rule
class Identity(Rule):
    """Element-wise ops: all relevance of the output goes to input 0 unchanged.

    A node with explained inputs other than input 0 is an error (their relevance would be
    dropped silently): ``route`` or a rule fits such a node.
    """

    name = "identity"

    def decide(self, info: NodeInfo) -> Decision:
        live = [i for i, s in enumerate(_send_live(info)) if s]
        if live and live != [0]:
            raise RuleError(
                f"the rule 'identity' on {info.node_type} ({info.position or 'a node'}) would "
                f"send all relevance to input 0 and drop what belongs to input(s) "
                f"{[i for i in live if i]}, which lead to explained inputs: declare 'route' "
                "(follow the gradient) for this node type, or write a rule for it (docs/rules.md, "
                "'Custom rules')")
        send = tuple(i == 0 and s for i, s in enumerate(_send_live(info)))
        return Decision(values=(), send=send)

    def run(self, node, rel, vals, p):
        out: list[MaybeTensor] = [None] * len(p["send"])
        if p["send"][0]:
            out[0] = rel[0]
        return out


@register_rule
class Absorb(Rule):
    """Declared fallback: relevance stops here and is booked as absorbed."""

    name = "absorb"

    def absorbs(self, p) -> bool:
        return True

    def decide(self, info: NodeInfo) -> Decision:
        return Decision(values=(), send=(False,) * info.n_inputs)

    def run(self, node, rel, vals, p):
        ref = next(r for r in rel if r is not None)
        return [None] * len(p["send"]) + [add_parts([r.sum() for r in rel if r is not None], ref)]


@register_rule
class CopySlicesRule(Route):
    """In-place write into a view: routed like the gradient (exact for copy_/fill_/masked writes)."""

    name = "copyslices"
    routes_relevance = False  # the written region's values are not the input's

    def absorbs(self, p) -> bool:
        return True  # the written region's share when what was written is not sent

    def decide(self, info: NodeInfo) -> Decision:
        return Decision(
            values=(), send=_send_live(info),
            assumption="CopySlices (in-place op on a view): relevance routed like the gradient; "
                       "exact for copy_/fill_/index assignment, an approximation for in-place "
                       "arithmetic on a view",
        )

    def _constant_share(self, node, rel, grads, p) -> Optional[torch.Tensor]:
        if len(grads) > 1 and all(g is not None for g in grads[1:]):
            return None  # the gradient gives the written region to the sources
        # a constant was written (fill_, a tensor without grad): no own-terms form, the node
        # keeps the region to itself; it is where the base's gradient of ones is 0, so its
        # share is Σ R·(1 − VJP_base(1))
        ones = node(torch.ones_like(rel[0]))
        base = ones[0] if isinstance(ones, tuple) else ones
        return (rel[0] * (1 - base.to(rel[0].dtype))).sum()


def suggest_fallback(node: Any, input_shapes: Sequence[Optional[Sequence[int]]]
                     ) -> tuple[Optional[str], str]:
    """The declared fallback that fits a node without a rule, and why (for the error message).

    ``route`` where the node's gradient routes relevance: a cheap probe at trace time sends a
    positive random relevance back through the node, which must return non-negative values of
    the inputs' shapes with the same sum (pooling by max, padding, indexing do; scaling or mixing
    ops do not). Else ``identity`` where the node has one tracked input of the output's shape.
    Else ``None``: neither fits (then ``absorb`` or a rule written for the node).

    ``input_shapes``: the shape of each tracked input (``None`` for an untracked constant).
    A ``torch.compile``d region fits neither, whatever its shapes: its inputs are the parameters
    and activations a whole compiled graph read.
    """
    from .custom import compiled_region
    if compiled_region(node, type(node).__name__):
        return None, ("a torch.compile'd region is a whole compiled graph in one node: no "
                      "fallback passes relevance through it; explain the uncompiled module "
                      "(model._orig_mod)")
    meta = list(getattr(node, "_input_metadata", ()))
    out_shapes = [tuple(m.shape) for m in meta]
    tracked = [tuple(s) for s in input_shapes if s is not None]
    if _routes(node, meta, input_shapes):
        return "route", ("its gradient routes relevance: a positive relevance comes back "
                         "non-negative with the same sum")
    if len(tracked) == 1 and len(out_shapes) == 1 and tracked[0] == out_shapes[0]:
        return "identity", ("one input of the output's shape: relevance passes unchanged, "
                            "right for element-wise ops")
    why = []
    if len(tracked) != 1 or len(out_shapes) != 1:
        why.append(f"'identity' needs one input and one output, it has {len(tracked)} and "
                   f"{len(out_shapes)}")
    elif tracked[0] != out_shapes[0]:
        why.append(f"'identity' needs the input's shape {list(tracked[0])} to be the output's "
                   f"{list(out_shapes[0])}")
    why.append("'route' needs a gradient that routes relevance (moves it without scaling), "
               "and this one does not")
    return None, "; ".join(why)


def _routes(node: Any, meta: Sequence[Any], input_shapes: Sequence[Optional[Sequence[int]]]
            ) -> bool:
    if not meta:
        return False
    gen = torch.Generator().manual_seed(0)  # no global RNG state is touched
    rel = []
    for m in meta:
        if not (m.dtype.is_floating_point or m.dtype.is_complex):
            return False
        r = torch.rand(tuple(m.shape), generator=gen, dtype=torch.float64) + 0.5
        rel.append(r.to(device=m.device, dtype=m.dtype))
    try:
        grads = node(*rel)
    except Exception:  # noqa: BLE001 - only a hint: a node that cannot be probed does not route
        return False
    grads = grads if isinstance(grads, tuple) else (grads,)
    total = sum(float(r.double().sum()) for r in rel)
    got = 0.0
    tol = 1e-2 if any(m.dtype in (torch.float16, torch.bfloat16) for m in meta) else 1e-5
    for g, shape in zip(grads, list(input_shapes) + [None] * len(grads)):
        if g is None:
            continue
        if shape is not None and tuple(g.shape) != tuple(shape):
            return False
        g = g.double()
        if bool((g < -tol * g.abs().max().clamp(min=1e-30)).any()):
            return False
        got += float(g.sum())
    return abs(got - total) <= tol * total


# ---------------------------------------------------------------------------------------------
# forward replays (for Promise chains)

def _reshape(node, v):
    return [v[0].reshape(out_shape(node))]


def _slice(node, v):
    return [torch.ops.aten.slice(v[0], _dim(node._saved_dim), signed(node._saved_start),
                                 signed(node._saved_end), node._saved_step)]


def _split(node, v):
    return list(torch.split(v[0], node._saved_split_size, _dim(node._saved_dim)))


def _split_sizes(node, v):
    return list(torch.split(v[0], list(node._saved_split_sizes), _dim(node._saved_dim)))


def _index(node, v):
    # a None entry means "this dimension whole" (not a new axis, as it would in Python indexing)
    idx = tuple(slice(None) if i is None else i for i in node._saved_indices)
    return [v[0][idx]]


register_op(["ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0",
             "SqueezeBackward1", "SqueezeBackward2", "_ReshapeAliasBackward0"],
            "route", forward=_reshape)
register_op(["AliasBackward0", "CloneBackward0", "NativeDropoutBackward0", "LiftFreshBackward0"],
            "identity", forward=lambda n, v: [v[0]], forward_inputs=(0,))
register_op("ToCopyBackward0", "identity",
            forward=lambda n, v: [v[0].to(n._input_metadata[0].dtype)])
register_op("TBackward0", "route", forward=lambda n, v: [v[0].t()])
register_op("TransposeBackward0", "route", key_attrs=("dim0", "dim1"),
            forward=lambda n, v: [v[0].transpose(_dim(n._saved_dim0), _dim(n._saved_dim1))])
register_op("PermuteBackward0", "route", key_attrs=("dims",),
            forward=lambda n, v: [v[0].permute(*[_dim(d) for d in n._saved_dims])])
register_op("ExpandBackward0", "route", forward=lambda n, v: [v[0].expand(out_shape(n))])
register_op("UnsqueezeBackward0", "route", key_attrs=("dim",),
            forward=lambda n, v: [v[0].unsqueeze(_dim(n._saved_dim))])
register_op("SelectBackward0", "route", key_attrs=("dim",),
            forward=lambda n, v: [v[0].select(_dim(n._saved_dim), _dim(n._saved_index))])
register_op("SliceBackward0", "route", key_attrs=("dim", "step"), forward=_slice)
register_op("CatBackward0", "route", key_attrs=("dim",),
            forward=lambda n, v: [torch.cat(list(v), _dim(n._saved_dim))])
register_op("StackBackward0", "route", key_attrs=("dim",),
            forward=lambda n, v: [torch.stack(list(v), _dim(n._saved_dim))])
register_op("SplitBackward0", "route", key_attrs=("dim",), forward=_split)
register_op("SplitWithSizesBackward0", "route", key_attrs=("dim",), forward=_split_sizes)
register_op("UnbindBackward0", "route", key_attrs=("dim",),
            forward=lambda n, v: list(v[0].unbind(_dim(n._saved_dim))))
register_op("RepeatBackward0", "route",
            forward=lambda n, v: [v[0].repeat(*n._saved_repeats)])
register_op("FlipBackward0", "route", key_attrs=("dims",),
            forward=lambda n, v: [v[0].flip(list(signed(n._saved_dims)))])
register_op("RollBackward0", "route", key_attrs=("dims",),
            forward=lambda n, v: [v[0].roll(list(signed(n._saved_shifts)),
                                            list(signed(n._saved_dims)))])
def _as_strided(node, vals):
    # exact when the input was laid out contiguously (a freshly computed tensor), which is the
    # case autograd creates these nodes for (restriding a reduction's output, explicit as_strided)
    offset = node._saved_storage_offset
    return [vals[0].contiguous().as_strided(node._saved_size, node._saved_stride,
                                             0 if offset is None else offset)]


register_op(["AsStridedBackward0", "AsStridedBackward1"], "route", forward=_as_strided)
register_op("ConstantPadNdBackward0", "route", fills=True,
            forward=lambda n, v: [torch.nn.functional.pad(v[0], list(signed(n._saved_pad)))])
register_op("IndexBackward0", "route", forward=_index)
register_op("IndexSelectBackward0", "route", key_attrs=("dim",),
            saved_inputs={},
            forward=lambda n, v: [v[0].index_select(_dim(n._saved_dim), n._saved_index)])
register_op("GatherBackward0", "route", key_attrs=("dim",), saved_inputs={0: "_saved_self"},
            forward=lambda n, v: [torch.gather(v[0], _dim(n._saved_dim), n._saved_index)])
def _where(node, vals):
    # an operand that does not require grad (e.g. the finfo.min fill of a mask) is not saved:
    # taken as 0 and recorded (exact for a following softmax, which gives those entries nothing)
    a, b = vals
    zero = torch.zeros((), dtype=(a if a is not None else b).dtype)
    return [torch.where(node._saved_condition, zero if a is None else a, zero if b is None else b)]


def _masked_fill(node, vals):
    # the fill value is not saved: taken as 0 and recorded, as for `where`
    return [vals[0].masked_fill(node._saved_mask, 0.0)]


register_op("WhereBackward0", "route", forward=_where, forward_inputs=(0, 1), broadcasts=False)
register_op("MaskedFillBackward0", "route", forward=_masked_fill, forward_inputs=(0,), fills=True)
def _max_pool(node, vals):
    x = vals[0]
    fn = {3: torch.nn.functional.max_pool1d, 4: torch.nn.functional.max_pool2d,
          5: torch.nn.functional.max_pool3d}[x.dim() if x.dim() > 3 else 3]
    return [fn(x, list(node._saved_kernel_size), list(node._saved_stride),
               list(node._saved_padding), list(node._saved_dilation), node._saved_ceil_mode)]


register_op(["MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0",
             "MaxPool1DWithIndicesBackward0"], "route", saved_inputs={0: "_saved_self"},
            forward=_max_pool, key_attrs=("kernel_size", "stride", "padding", "dilation",
                                          "ceil_mode"))
def _reduce_select(node, vals):
    # max/min along a dim: the values at the indices the forward chose (saved), so ties are
    # broken exactly as the forward broke them
    dim, idx = signed(node._saved_dim), node._saved_indices
    if not node._saved_keepdim:
        return [vals[0].gather(dim, idx.unsqueeze(dim)).squeeze(dim)]
    return [vals[0].gather(dim, idx)]


register_op(["MaxBackward0", "MinBackward0"], "route", key_attrs=("dim", "keepdim"),
            forward=_reduce_select)
register_op(["TopkBackward0", "SortBackward0", "KthvalueBackward0", "MedianBackward1"], "route",
            key_attrs=("dim",))
register_op(["MaxBackward1", "MinBackward1", "AmaxBackward0", "AminBackward0"], "route",
            saved_outputs={0: "_saved_result"})
def _nearest(mode):
    def fwd(node, vals):
        size = out_shape(node)
        return [torch.nn.functional.interpolate(vals[0], size=size[2:], mode=mode)]
    return fwd


register_op(["UpsampleNearest1DBackward0", "UpsampleNearest2DBackward0",
             "UpsampleNearest3DBackward0"], "route", forward=_nearest("nearest"))
register_op("UpsampleNearestExact2DBackward0", "route", forward=_nearest("nearest-exact"))
register_op("CopySlices", "copyslices")
register_op("WeightNormInterfaceBackward0", "route", key_attrs=("dim",),
            saved_inputs={0: "_saved_v", 1: "_saved_g"},
            forward=lambda n, v: [torch._weight_norm(v[0], v[1], _dim(n._saved_dim))])
