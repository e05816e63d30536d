"""Shape and routing ops: relevance follows the gradient's routing (view, permute, cat, index, max...).

These ops move or copy values without mixing them, so the gradient of the op *is* the
relevance-conserving redistribution; the rule calls the autograd node itself.
Also: the declared fallbacks ``identity``/``route``/``absorb`` and the opaque ``CopySlices``.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Decision, MaybeTensor, NodeInfo, Rule, register_op, register_rule


def _dim(v: int) -> int:
    """Saved dims come back as unsigned 64-bit for negatives (e.g. softmax's dim=-1)."""
    return v - (1 << 64) if v >= (1 << 63) else v


def out_shape(node: Any, nr: int = 0) -> list[int]:
    return node._input_metadata[nr].shape


def _send_live(info: NodeInfo) -> tuple[bool, ...]:
    return tuple(live and not none for live, none in zip(info.live_inputs, info.none_inputs))


@register_rule
class Route(Rule):
    """Relevance is routed exactly like the gradient: ``R_in = VJP(R_out)``."""

    name = "route"
    routes_relevance = True

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
        return [g.to(ref.dtype) if (s and g is not None) else None for g, s in zip(grads, send)]


@register_rule
class Identity(Rule):
    """Element-wise ops: all relevance of the output goes to input 0 unchanged."""

    name = "identity"

    def decide(self, info: NodeInfo) -> Decision:
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

    def decide(self, info: NodeInfo) -> Decision:
        return Decision(values=(), send=(False,) * info.n_inputs)

    def run(self, node, rel, vals, p):
        return [None] * len(p["send"])


@register_rule
class CopySlicesRule(Route):
    """In-place write into a view: routed like the gradient (exact for copy_/fill_/masked writes)."""

    name = "copyslices"
    routes_relevance = False  # the written region's values are not the input's

    def decide(self, info: NodeInfo) -> Decision:
        return Decision(
            values=(), send=_send_live(info),
            assumption="CopySlices (in-place op on a view): relevance routed like the gradient; "
                       "exact for copy_/fill_/index assignment, an approximation for in-place "
                       "arithmetic on a view",
        )


# ---------------------------------------------------------------------------------------------
# forward replays (for Promise chains)

def _reshape(node, v):
    return [v[0].reshape(out_shape(node))]


def _slice(node, v):
    return [torch.ops.aten.slice(v[0], _dim(node._saved_dim), node._saved_start, node._saved_end,
                                 node._saved_step)]


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
            forward=lambda n, v: [v[0].flip(list(n._saved_dims))])
register_op("RollBackward0", "route", key_attrs=("dims",),
            forward=lambda n, v: [v[0].roll(list(n._saved_shifts), list(n._saved_dims))])
def _as_strided(node, vals):
    # exact when the input was laid out contiguously (a freshly computed tensor), which is the
    # case autograd creates these nodes for (restriding a reduction's output, explicit as_strided)
    offset = node._saved_storage_offset
    return [vals[0].contiguous().as_strided(node._saved_size, node._saved_stride,
                                             0 if offset is None else offset)]


register_op(["AsStridedBackward0", "AsStridedBackward1"], "route", forward=_as_strided)
register_op("ConstantPadNdBackward0", "route",
            forward=lambda n, v: [torch.nn.functional.pad(v[0], list(n._saved_pad))])
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
register_op("MaskedFillBackward0", "route", forward=_masked_fill, forward_inputs=(0,))
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
register_op(["MaxBackward0", "MinBackward0", "TopkBackward0", "SortBackward0", "KthvalueBackward0",
             "MedianBackward1"], "route", key_attrs=("dim",))
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
            forward=lambda n, v: [torch._weight_norm(v[0], v[1], n._saved_dim)])
