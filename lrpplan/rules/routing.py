"""Shape and routing ops: relevance follows the gradient's routing (view, permute, cat, index, max...).

These ops move or copy values without mixing them, so the gradient of the op *is* the
relevance-conserving redistribution. Each op spec carries its forward (for Promise chains) and
its gradient as pure functions of tensors and attributes (``vjp``), so a routing step never
calls the live autograd node; an op without a pure gradient (a declared fallback on a node type
lrpplan does not know, ``CopySlices``) reads the node's own backward as a value.
Also: the declared fallbacks ``identity``/``route``/``absorb`` and ``CopySlices``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import RuleError
from .base import (OPS, Attrs, Decision, MaybeTensor, NodeInfo, Rule, add_parts, autograd_vjp,
                   register_op, register_rule, sum_to, vjp_of)

T = torch.Tensor


def _send_live(info: NodeInfo) -> tuple[bool, ...]:
    return tuple(live and not none for live, none in zip(info.live_inputs, info.none_inputs))


def _fills(p) -> bool:
    spec = OPS.get(p.get("node_type", ""))
    return spec is not None and spec.fills


def _vjp_fits(info: NodeInfo) -> bool:
    """The op's pure gradient can run on this node (else its own backward is read)."""
    spec = info.spec
    if spec is None or spec.vjp is None:
        return False
    # a cat whose untracked inputs hide where the tracked ones lie (their sizes are saved
    # nowhere): one untracked input's size is the rest of the output, two are unknown
    return not (spec.node_type == "CatBackward0" and sum(info.none_inputs) > 1)


@register_rule
class Route(Rule):
    """Relevance is routed exactly like the gradient: ``R_in = VJP(R_out)``.

    Conserving where every input is sent; otherwise the node absorbs the share routed to the
    inputs it does not send (an operand leading to no target, a constant) and, for ops that fill
    positions with a constant (padding, ``masked_fill``, ``where`` with an untracked operand),
    the relevance at those positions.
    """

    uses_gradient = True
    name = "route"
    routes_relevance = True

    def absorbs(self, p) -> bool:
        return not all(p["send"]) or _fills(p)

    def decide(self, info: NodeInfo) -> Decision:
        return Decision(values=(), send=_send_live(info), backward=not _vjp_fits(info))

    def grads(self, rel: Sequence[MaybeTensor], x: Attrs, p) -> list[MaybeTensor]:
        return list(vjp_of(p, x)(rel, x))

    def run(self, rel, x, p):
        ref = next(r for r in rel if r is not None)
        grads = self.grads(rel, x, p)
        send = p["send"]
        grads += [None] * (len(send) - len(grads))
        out: list[MaybeTensor] = [g.to(ref.dtype) if (s and g is not None) else None
                                  for g, s in zip(grads, send)]
        if not self.absorbs(p):
            return out
        # the share of the inputs not sent, where the gradient gives it
        parts = [g.sum().to(ref.dtype) for g, s in zip(grads, send) if g is not None and not s]
        parts.append(self._constant_share(rel, x, grads, p))
        return out + [add_parts(parts, ref)]

    def _constant_share(self, rel, x, grads, p) -> Optional[T]:
        if _fills(p) or any(g is None for g in grads):
            return _unrouted(rel, x, grads, p)
        return None


def _unrouted(rel, x, grads, p) -> Optional[T]:
    """Σ relevance at the output positions the gradient routes to no input (a constant's
    share): ``Σ R·(1 − f(1))`` with ``f`` the op's forward on ones for every input the gradient
    reaches (zeros elsewhere); exact for ops that copy values (each output position holds one
    input value or a constant)."""
    spec = OPS.get(p.get("node_type", ""))
    if spec is None or spec.forward is None:
        return None
    ins = [torch.ones_like(g) if g is not None else None for g in grads]
    try:
        kept = spec.forward(ins, x)
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

    def run(self, rel, x, p):
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

    def run(self, rel, x, p):
        ref = next(r for r in rel if r is not None)
        return [None] * len(p["send"]) + [add_parts([r.sum() for r in rel if r is not None], ref)]


@register_rule
class CopySlicesRule(Route):
    """In-place write into a view: routed like the gradient (exact for copy_/fill_/masked writes).

    ``CopySlices`` wraps the in-place op's own node, so its gradient is the node's own backward
    (read as a value: a compiled replay does not fuse across it)."""

    name = "copyslices"
    routes_relevance = False  # the written region's values are not the input's

    def absorbs(self, p) -> bool:
        return True  # the written region's share when what was written is not sent

    def decide(self, info: NodeInfo) -> Decision:
        return Decision(
            values=(), send=_send_live(info), backward=True,
            assumption="CopySlices (in-place op on a view): relevance routed like the gradient; "
                       "exact for copy_/fill_/index assignment, an approximation for in-place "
                       "arithmetic on a view",
        )

    def _constant_share(self, rel, x, grads, p) -> Optional[T]:
        if len(grads) > 1 and all(g is not None for g in grads[1:]):
            return None  # the gradient gives the written region to the sources
        # a constant was written (fill_, a tensor without grad): no own-terms form, the node
        # keeps the region to itself; it is where the base's gradient of ones is 0, so its
        # share is Σ R·(1 − VJP_base(1))
        base = self.grads([torch.ones_like(rel[0])], x, p)[0]
        return (rel[0] * (1 - base.to(rel[0].dtype))).sum()


def suggest_fallback(node: Any, input_shapes: Sequence[Optional[Sequence[int]]]
                     ) -> tuple[Optional[str], str]:
    """The declared fallback that fits a node without a rule, and why (for the error message).

    ``route`` where the node's gradient routes relevance: a cheap probe at compile time sends a
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
# forward, gradient and inverse of each routing op, from tensors and attributes alone

def _in(a: Attrs, pos: int = 0) -> tuple[int, ...]:
    return tuple(a["in_shapes"][pos])


def _out(a: Attrs, nr: int = 0) -> tuple[int, ...]:
    return tuple(a["out_shapes"][nr])


def _zeros_in(a: Attrs, r: T, pos: int = 0) -> T:
    return r.new_zeros(_in(a, pos))


def _inverse_permutation(dims: Sequence[int]) -> list[int]:
    dims = [d % len(dims) for d in dims]
    inverse = [0] * len(dims)
    for i, d in enumerate(dims):
        inverse[d] = i
    return inverse


_RESHAPES = ["ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0",
             "SqueezeBackward1", "SqueezeBackward2", "_ReshapeAliasBackward0"]
for _name in _RESHAPES:
    register_op(_name, "route", meta=("in_shapes", "out_shapes"),
                forward=lambda v, a: [v[0].reshape(_out(a))],
                vjp=lambda rel, a: [rel[0].reshape(_in(a))],
                inverse=lambda t, a: t.reshape(_in(a)),
                # an unsafe view's output is a fresh tensor: its base is no other value
                view=_name != "UnsafeViewBackward0", aliases=_name != "UnsafeViewBackward0")
register_op("AliasBackward0", "identity", forward=lambda v, a: [v[0]], forward_inputs=(0,),
            inverse=lambda t, a: t, vjp=lambda rel, a: [rel[0]], view=True, aliases=True)
register_op("CloneBackward0", "identity", forward=lambda v, a: [v[0]], forward_inputs=(0,),
            inverse=lambda t, a: t, vjp=lambda rel, a: [rel[0]])
register_op("LiftFreshBackward0", "identity", forward=lambda v, a: [v[0]], forward_inputs=(0,),
            vjp=lambda rel, a: [rel[0]])
# dropout in eval mode is no node; in train mode the rule passes relevance through the kept
# positions' values (identity), its gradient scales by the mask
register_op("NativeDropoutBackward0", "identity", forward=lambda v, a: [v[0]], forward_inputs=(0,),
            attrs=("p",), reads=("result1",),
            vjp=lambda rel, a: [torch.ops.aten.native_dropout_backward(
                rel[0], a["result1"], 1.0 / (1.0 - a["p"]) if a["p"] < 1 else 0.0)])


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.rsplit(".", 1)[-1])


register_op("ToCopyBackward0", "identity",
            facts={"out_dtype": lambda n: n._input_metadata[0].dtype},
            forward=lambda v, a: [v[0].to(_dtype(a["out_dtype"]))],
            vjp=lambda rel, a: [rel[0]])
register_op("TBackward0", "route", forward=lambda v, a: [v[0].t()],
            vjp=lambda rel, a: [rel[0].t()], inverse=lambda t, a: t.t(), view=True, aliases=True)
register_op(["TransposeBackward0"], "route", attrs=("dim0", "dim1"),
            forward=lambda v, a: [v[0].transpose(a["dim0"], a["dim1"])],
            vjp=lambda rel, a: [rel[0].transpose(a["dim0"], a["dim1"])],
            inverse=lambda t, a: t.transpose(a["dim0"], a["dim1"]), view=True, aliases=True)
register_op("PermuteBackward0", "route", attrs=("dims",),
            forward=lambda v, a: [v[0].permute(*a["dims"])],
            vjp=lambda rel, a: [rel[0].permute(*_inverse_permutation(a["dims"]))],
            inverse=lambda t, a: t.permute(*_inverse_permutation(a["dims"])),
            view=True, aliases=True)
register_op("ExpandBackward0", "route", meta=("in_shapes", "out_shapes"),
            forward=lambda v, a: [v[0].expand(_out(a))],
            vjp=lambda rel, a: [sum_to(rel[0], _in(a))], view=True, aliases=True)
register_op("UnsqueezeBackward0", "route", attrs=("dim",),
            forward=lambda v, a: [v[0].unsqueeze(a["dim"])],
            vjp=lambda rel, a: [rel[0].squeeze(a["dim"])],
            inverse=lambda t, a: t.squeeze(a["dim"]), view=True, aliases=True)
register_op("SelectBackward0", "route", attrs=("dim",), reads=("index",), meta=("in_shapes",),
            forward=lambda v, a: [v[0].select(a["dim"], a["index"])],
            vjp=lambda rel, a: [torch.ops.aten.select_backward(rel[0], _in(a), a["dim"],
                                                               a["index"])],
            view=True, aliases=True)
register_op("SliceBackward0", "route", attrs=("dim", "step"), reads=("start", "end"),
            meta=("in_shapes",),
            forward=lambda v, a: [torch.ops.aten.slice(v[0], a["dim"], a["start"], a["end"],
                                                       a["step"])],
            vjp=lambda rel, a: [torch.ops.aten.slice_backward(
                rel[0], _in(a), a["dim"], a["start"], a["end"], a["step"])],
            view=True, aliases=True)
register_op("DiagonalBackward0", "route", attrs=("offset", "dim1", "dim2"), meta=("in_shapes",),
            forward=lambda v, a: [v[0].diagonal(a["offset"], a["dim1"], a["dim2"])],
            vjp=lambda rel, a: [torch.ops.aten.diagonal_backward(
                rel[0], _in(a), a["offset"], a["dim1"], a["dim2"])], view=True, aliases=True)
register_op("UnfoldBackward0", "route", attrs=("dimension",), reads=("size", "step"),
            meta=("in_shapes",),
            forward=lambda v, a: [v[0].unfold(a["dimension"], a["size"], a["step"])],
            vjp=lambda rel, a: [torch.ops.aten.unfold_backward(
                rel[0], _in(a), a["dimension"], a["size"], a["step"])], view=True, aliases=True)


def _cat_vjp(rel, a):
    r, shapes = rel[0], a["in_shapes"]
    dim = a["dim"] % r.dim()
    known = sum(s[dim] for s in shapes if s is not None)
    sizes = [r.shape[dim] - known if s is None else s[dim] for s in shapes]
    return list(r.split(sizes, dim))


register_op("CatBackward0", "route", attrs=("dim",), meta=("in_shapes",),
            forward=lambda v, a: [torch.cat(list(v), a["dim"])], vjp=_cat_vjp)
register_op("StackBackward0", "route", attrs=("dim",),
            forward=lambda v, a: [torch.stack(list(v), a["dim"])],
            vjp=lambda rel, a: list(rel[0].unbind(a["dim"])))


def _join_vjp(stack: bool):
    """The gradient of a split / unbind: the outputs' relevance joined back (zeros where none
    arrived)."""
    def vjp(rel, a):
        ref = next(r for r in rel if r is not None)
        parts = [r if r is not None else ref.new_zeros(shape)
                 for r, shape in zip(rel, a["out_shapes"])]
        return [torch.stack(parts, a["dim"]) if stack else torch.cat(parts, a["dim"])]
    return vjp


def _n_outputs(node: Any) -> int:
    return len(node._input_metadata)


register_op(["SplitBackward0"], "route", attrs=("dim",), facts={"n_out": _n_outputs},
            reads=("split_size",), meta=("out_shapes",),
            forward=lambda v, a: list(torch.split(v[0], a["split_size"], a["dim"])),
            vjp=_join_vjp(False), view=True, aliases=True)
register_op(["SplitWithSizesBackward0"], "route", attrs=("dim",), facts={"n_out": _n_outputs},
            reads=("split_sizes",), meta=("out_shapes",),
            forward=lambda v, a: list(torch.split(v[0], list(a["split_sizes"]), a["dim"])),
            vjp=_join_vjp(False), view=True, aliases=True)
register_op("UnbindBackward0", "route", attrs=("dim",), facts={"n_out": _n_outputs},
            meta=("out_shapes",),
            forward=lambda v, a: list(v[0].unbind(a["dim"])), vjp=_join_vjp(True),
            view=True, aliases=True)


def _repeat_vjp(rel, a):
    r, reps, shape = rel[0], list(a["repeats"]), list(_in(a))
    shape = [1] * (len(reps) - len(shape)) + shape
    split = []
    for rep, size in zip(reps, shape):
        split += [rep, size]
    g = r.reshape(split).sum(tuple(range(0, len(split), 2)))
    return [g.reshape(_in(a))]


register_op("RepeatBackward0", "route", reads=("repeats",), meta=("in_shapes",),
            forward=lambda v, a: [v[0].repeat(*a["repeats"])], vjp=_repeat_vjp)
register_op("FlipBackward0", "route", attrs=("dims",),
            forward=lambda v, a: [v[0].flip(list(a["dims"]))],
            vjp=lambda rel, a: [rel[0].flip(list(a["dims"]))])
register_op("RollBackward0", "route", attrs=("dims",), reads=("shifts",),
            forward=lambda v, a: [v[0].roll(list(a["shifts"]), list(a["dims"]))],
            vjp=lambda rel, a: [rel[0].roll([-s for s in a["shifts"]], list(a["dims"]))])


def _as_strided(v, a):
    # exact when the input was laid out contiguously (a freshly computed tensor), which is the
    # case autograd creates these nodes for (restriding a reduction's output, explicit as_strided)
    offset = a["storage_offset"]
    return [v[0].contiguous().as_strided(a["size"], a["stride"], 0 if offset is None else offset)]


def _as_strided_vjp(rel, a):
    # each output element reads one input element: add the relevance at the element it read
    # (overlapping windows add up, as the gradient does)
    r, shape = rel[0], _in(a)
    numel = 1
    for s in shape:
        numel *= s
    where = torch.arange(numel, device=r.device).as_strided(
        a["size"], a["stride"], 0 if a["storage_offset"] is None else a["storage_offset"])
    g = r.new_zeros(numel).index_add(0, where.reshape(-1), r.reshape(-1))
    return [g.reshape(shape)]


register_op(["AsStridedBackward0", "AsStridedBackward1"], "route",
            reads=("size", "stride", "storage_offset"), meta=("in_shapes",),
            forward=_as_strided, vjp=_as_strided_vjp, view=True, aliases=True)
register_op("ConstantPadNdBackward0", "route", fills=True, reads=("pad",),
            forward=lambda v, a: [F.pad(v[0], list(a["pad"]))],
            vjp=lambda rel, a: [F.pad(rel[0], [-p for p in a["pad"]])],
            lossy="forward value recomputed with the unsaved pad value taken as 0")


def _index(v, a):
    # a None entry means "this dimension whole" (not a new axis, as it would in Python indexing)
    idx = tuple(slice(None) if i is None else i for i in a["indices"])
    return [v[0][idx]]


register_op("IndexBackward0", "route", reads=("indices",), meta=("in_shapes",), forward=_index,
            vjp=lambda rel, a: [torch.ops.aten.index_put.default(
                _zeros_in(a, rel[0]), list(a["indices"]), rel[0], True)])
register_op("IndexSelectBackward0", "route", attrs=("dim",), reads=("index",),
            meta=("in_shapes",),
            forward=lambda v, a: [v[0].index_select(a["dim"], a["index"])],
            vjp=lambda rel, a: [_zeros_in(a, rel[0]).index_add(a["dim"], a["index"], rel[0])])
register_op("GatherBackward0", "route", attrs=("dim",), reads=("index",), meta=("in_shapes",),
            saved_inputs={0: "_saved_self"},
            forward=lambda v, a: [torch.gather(v[0], a["dim"], a["index"])],
            vjp=lambda rel, a: [_zeros_in(a, rel[0]).scatter_add(a["dim"], a["index"],
                                                                    rel[0])])


def _where(v, a):
    # an operand that does not require grad (e.g. the finfo.min fill of a mask) is not saved:
    # taken as 0 and recorded (exact for a following softmax, which gives those entries nothing)
    x, y = v
    zero = torch.zeros((), dtype=(x if x is not None else y).dtype)
    return [torch.where(a["condition"], zero if x is None else x, zero if y is None else y)]


def _where_vjp(rel, a):
    r, cond = rel[0], a["condition"]
    zero = r.new_zeros(())
    return [torch.where(cond, r, zero), torch.where(cond, zero, r)]


register_op("WhereBackward0", "route", reads=("condition",), forward=_where,
            forward_inputs=(0, 1), vjp=_where_vjp, broadcasts=True,
            hides_value=lambda a: (0, 1))
register_op("MaskedFillBackward0", "route", reads=("mask",), fills=True, forward_inputs=(0,),
            # the fill value is not saved: taken as 0 and recorded, as for `where`
            forward=lambda v, a: [v[0].masked_fill(a["mask"], 0.0)],
            vjp=lambda rel, a: [rel[0].masked_fill(a["mask"], 0.0)],
            lossy="forward value recomputed with the unsaved fill value taken as 0 (exact for "
                  "a following softmax, which gives masked entries nothing)")

_POOL = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")


def _max_pool(v, a):
    x = v[0]
    fn = {3: F.max_pool1d, 4: F.max_pool2d, 5: F.max_pool3d}[x.dim() if x.dim() > 3 else 3]
    return [fn(x, list(a["kernel_size"]), list(a["stride"]), list(a["padding"]),
               list(a["dilation"]), a["ceil_mode"])]


_MAX_POOL_BACKWARD = {2: torch.ops.aten.max_pool2d_with_indices_backward,
                      3: torch.ops.aten.max_pool3d_with_indices_backward}


def _max_pool_vjp(rel, a):
    """Each output position's relevance to the input element its saved index names."""
    r, idx, x = rel[0], a["result1"], a["self"]
    nd = len(a["kernel_size"])
    backward = _MAX_POOL_BACKWARD.get(nd)
    if backward is not None and x.dtype == r.dtype:
        return [backward(r, x, list(a["kernel_size"]), list(a["stride"]), list(a["padding"]),
                         list(a["dilation"]), a["ceil_mode"], idx)]
    flat = r.new_zeros(x.shape[:-nd] + (x.shape[-nd:].numel(),))
    flat = flat.scatter_add(-1, idx.flatten(-nd), r.flatten(-nd))
    return [flat.reshape(x.shape)]


register_op(["MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0",
             "MaxPool1DWithIndicesBackward0"], "route", saved_inputs={0: "_saved_self"},
            attrs=_POOL, reads=("self", "result1"), forward=_max_pool, vjp=_max_pool_vjp)


def _reduce_select(v, a):
    # max/min along a dim: the values at the indices the forward chose (saved), so ties are
    # broken exactly as the forward broke them
    dim, idx = a["dim"], a["indices"]
    if not a["keepdim"]:
        return [v[0].gather(dim, idx.unsqueeze(dim)).squeeze(dim)]
    return [v[0].gather(dim, idx)]


def _selecting_vjp(rel, a):
    return [torch.ops.aten.value_selecting_reduction_backward(
        rel[0], a["dim"], a["indices"], _in(a), a["keepdim"])]


def _scatter_back_vjp(rel, a):
    return [_zeros_in(a, rel[0]).scatter(a["dim"], a["indices"], rel[0])]


register_op(["MaxBackward0", "MinBackward0"], "route", attrs=("dim", "keepdim"),
            reads=("indices",), meta=("in_shapes",), forward=_reduce_select, vjp=_selecting_vjp)
register_op(["KthvalueBackward0", "MedianBackward1"], "route", attrs=("dim", "keepdim"),
            reads=("indices",), meta=("in_shapes",), vjp=_selecting_vjp)
register_op(["TopkBackward0", "SortBackward0"], "route", attrs=("dim",), reads=("indices",),
            meta=("in_shapes",), vjp=_scatter_back_vjp)


def _amax_vjp(rel, a):
    """Ties share equally (autograd's ``evenly_distribute`` / ``scale_grad_by_count``)."""
    r, x, result = rel[0], a["self"], a["result"]
    dims = a.get("dim") or tuple(range(x.dim()))
    dims = tuple(d % x.dim() for d in dims) if x.dim() else ()
    if not a.get("keepdim", False):
        for d in sorted(dims):
            r, result = r.unsqueeze(d), result.unsqueeze(d)
    hit = (x == result).to(r.dtype)
    count = hit.sum(dims, keepdim=True) if dims else hit
    return [hit * (r / count)]


register_op(["MaxBackward1", "MinBackward1"], "route", saved_outputs={0: "_saved_result"},
            reads=("self", "result"), vjp=_amax_vjp)
register_op(["AmaxBackward0", "AminBackward0"], "route", saved_outputs={0: "_saved_result"},
            attrs=("dim", "keepdim"), reads=("self", "result"), vjp=_amax_vjp)


def _nearest(op, scales: tuple[str, ...]):
    def fwd(v, a):
        return [op(v[0], list(a["output_size"]), *[a[s] for s in scales])]
    return fwd


_HW = ("scales_h", "scales_w")
register_op("UpsampleNearest2DBackward0", "route", meta=("in_shapes",),
            reads=("output_size",) + _HW, forward=_nearest(torch.ops.aten.upsample_nearest2d, _HW),
            vjp=lambda rel, a: [torch.ops.aten.upsample_nearest2d_backward(
                rel[0], a["output_size"], _in(a), a["scales_h"], a["scales_w"])])
register_op("UpsampleNearestExact2DBackward0", "route", meta=("in_shapes",),
            reads=("output_size",) + _HW,
            forward=_nearest(torch.ops.aten._upsample_nearest_exact2d, _HW),
            vjp=lambda rel, a: [torch.ops.aten._upsample_nearest_exact2d_backward(
                rel[0], a["output_size"], _in(a), a["scales_h"], a["scales_w"])])
for _name, _op, _scales in (
        ("UpsampleNearest1DBackward0", torch.ops.aten.upsample_nearest1d, ("scales",)),
        ("UpsampleNearest3DBackward0", torch.ops.aten.upsample_nearest3d, ("scales_d",) + _HW),
        ("UpsampleNearestExact1DBackward0", torch.ops.aten._upsample_nearest_exact1d, ("scales",)),
        ("UpsampleNearestExact3DBackward0", torch.ops.aten._upsample_nearest_exact3d,
         ("scales_d",) + _HW)):
    register_op(_name, "route", meta=("in_shapes",), reads=("output_size",) + _scales,
                forward=_nearest(_op, _scales), vjp=autograd_vjp(_nearest(_op, _scales)))
register_op("CopySlices", "copyslices", aliases=True)
register_op("AccumulateGrad", "", leaf=True, aliases=True)
register_op("WeightNormInterfaceBackward0", "route", attrs=("dim",),
            saved_inputs={0: "_saved_v", 1: "_saved_g"}, reads=("v", "g", "result1"),
            forward=lambda v, a: [torch._weight_norm(v[0], v[1], a["dim"])],
            vjp=lambda rel, a: list(torch.ops.aten._weight_norm_interface_backward(
                rel[0].contiguous(), a["v"], a["g"], a["result1"], a["dim"])))
