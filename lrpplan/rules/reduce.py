"""Single-input linear maps without bias (sum, mean, average pooling, bilinear upsampling).

ε-rule ``R_x = x ⊙ VJP(R / stab(z))`` where the VJP is the op's gradient (a pure function of the
step's data, :attr:`~lrpplan.rules.base.OpSpec.vjp`) and ``z`` the op's forward output
recomputed from ``x`` (``x`` itself may need a Promise: Sum and Mean save no input).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import (Decision, NodeInfo, Rule, as_rel, autograd_vjp, forward_of, register_op,
                   register_rule, stable_div_share, vjp_of)


@register_rule
class LinearMap(Rule):
    """ε-rule through a bias-free linear map of one input, differentiated by its pure gradient."""

    uses_gradient = True
    name = "linear_map"
    defaults = {"epsilon": 1e-6}

    def absorbs(self, p) -> bool:
        return p["epsilon"] != 0.0  # the ε share (no bias): Σ ε·sign(z)·R/stab(z)

    def decide(self, info: NodeInfo) -> Decision:
        send = (info.live_inputs[0] and not info.none_inputs[0],) + (False,) * (info.n_inputs - 1)
        return Decision(values=(0,), send=send,
                        backward=info.spec is None or info.spec.vjp is None)

    def run(self, rel, x, p):
        r = rel[0]
        v = x[0]
        # forward and VJP in the relevance dtype (a half-precision VJP rounds the relevance it
        # sends: Σ sent would miss Σ received by ~1e-3)
        z = forward_of(p)([as_rel(v, r.dtype)], x)[0]
        s, eps_part = stable_div_share(r, as_rel(z, r.dtype), p["epsilon"])
        g = vjp_of(p, x)([s], x)[0]
        out = [None] * len(p["send"])
        out[0] = as_rel(v, r.dtype) * as_rel(g, r.dtype)
        return out + [eps_part] if eps_part is not None else out


def _dims(a, rank: int) -> tuple[int, ...]:
    d = a.get("dim")
    if d is None or (isinstance(d, (tuple, list)) and len(d) == 0):
        return tuple(range(rank))
    return tuple(x % max(rank, 1) for x in (d if isinstance(d, (tuple, list)) else (d,)))


def _sum_dim(v, a):
    return [v[0].sum(list(a["dim"]), keepdim=a["keepdim"])]


def _mean_dim(v, a):
    return [v[0].mean(list(a["dim"]), keepdim=a["keepdim"])]


def _reduce_vjp(mean: bool):
    """The gradient of a sum (mean) over dims: the relevance expanded back (and divided by the
    number of elements each output averages)."""
    def vjp(rel, a):
        r, shape = rel[0], tuple(a["in_shapes"][0])
        dims = _dims(a, len(shape))
        if not a.get("keepdim", False):
            for d in sorted(dims):
                r = r.unsqueeze(d)
        if mean:
            count = 1
            for d in dims:
                count *= shape[d]
            r = r / count
        return [r.expand(shape)]
    return vjp


def _adaptive_avg(v, a):
    x = v[0]
    size = a["out_shapes"][0]
    nd = {3: 1, 4: 2, 5: 3}.get(len(size), 2)
    fn = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[nd]
    return [fn(x, list(size[-nd:]))]


_AVG = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _avg_pool(fn):
    def fwd(v, a):
        return [fn(v[0], a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                   a["count_include_pad"], a["divisor_override"])]
    return fwd


def _avg_pool_vjp(backward):
    def vjp(rel, a):
        return [backward(rel[0], a["self"].to(rel[0].dtype), a["kernel_size"], a["stride"],
                         a["padding"], a["ceil_mode"], a["count_include_pad"],
                         a["divisor_override"])]
    return vjp


def _upsample(op, scales: tuple[str, ...]):
    """The forward of an interpolating upsampling node, as ATen ran it: the output size and the
    scale factors the node saved (a scale factor maps coordinates differently from the size
    ratio when ``align_corners`` is off)."""
    def fwd(v, a):
        return [op(v[0], list(a["output_size"]), a["align_corners"], *[a[s] for s in scales])]
    return fwd


_HW = ("scales_h", "scales_w")
#: node type -> (ATen forward op, the scale factors it takes)
_UPSAMPLE = {
    "UpsampleLinear1DBackward0": (torch.ops.aten.upsample_linear1d, ("scales",)),
    "UpsampleBilinear2DBackward0": (torch.ops.aten.upsample_bilinear2d, _HW),
    "UpsampleTrilinear3DBackward0": (torch.ops.aten.upsample_trilinear3d,
                                     ("scales_d",) + _HW),
    "UpsampleBicubic2DBackward0": (torch.ops.aten.upsample_bicubic2d, _HW),
    "UpsampleBilinear2DAaBackward0": (torch.ops.aten._upsample_bilinear2d_aa, _HW),
    "UpsampleBicubic2DAaBackward0": (torch.ops.aten._upsample_bicubic2d_aa, _HW),
}


register_op("SumBackward0", "linear_map", meta=("in_shapes",),
            forward=lambda v, a: [v[0].sum()], vjp=_reduce_vjp(False))
register_op("SumBackward1", "linear_map", forward=_sum_dim, attrs=("dim", "keepdim"),
            meta=("in_shapes",), vjp=_reduce_vjp(False))
register_op("MeanBackward0", "linear_map", meta=("in_shapes",),
            forward=lambda v, a: [v[0].mean()], vjp=_reduce_vjp(True))
register_op("MeanBackward1", "linear_map", forward=_mean_dim, attrs=("dim", "keepdim"),
            meta=("in_shapes",), vjp=_reduce_vjp(True))
register_op(["AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool1DBackward0"], "linear_map",
            saved_inputs={0: "_saved_self"}, reads=("self",), meta=("out_shapes",),
            forward=_adaptive_avg,
            vjp=lambda rel, a: [torch.ops.aten._adaptive_avg_pool2d_backward(
                rel[0], a["self"].to(rel[0].dtype))])
register_op("AdaptiveAvgPool3DBackward0", "linear_map", saved_inputs={0: "_saved_self"},
            reads=("self",), meta=("out_shapes",), forward=_adaptive_avg,
            vjp=lambda rel, a: [torch.ops.aten._adaptive_avg_pool3d_backward(
                rel[0], a["self"].to(rel[0].dtype))])
register_op("AvgPool2DBackward0", "linear_map", saved_inputs={0: "_saved_self"},
            reads=("self",), attrs=_AVG, forward=_avg_pool(F.avg_pool2d),
            vjp=_avg_pool_vjp(torch.ops.aten.avg_pool2d_backward))
register_op("AvgPool3DBackward0", "linear_map", saved_inputs={0: "_saved_self"},
            reads=("self",), attrs=_AVG, forward=_avg_pool(F.avg_pool3d),
            vjp=_avg_pool_vjp(torch.ops.aten.avg_pool3d_backward))
for _name, (_op, _scales) in _UPSAMPLE.items():
    register_op(_name, "linear_map", attrs=("align_corners",), reads=("output_size",) + _scales,
                meta=("in_shapes",), forward=_upsample(_op, _scales),
                vjp=autograd_vjp(_upsample(_op, _scales)))


# ---------------------------------------------------------------------------------------------
# reductions that are not linear: each element's share follows its (non-negative) contribution


@register_rule
class ShareRule(Rule):
    """Norms and variances: ``R_x = R · c / Σ c`` with ``c = |x|^p`` (vector norm) or
    ``c = (x − mean)²`` (variance), summed over the reduced dims; ε-stabilised."""

    name = "share"
    defaults = {"epsilon": 1e-6}

    def absorbs(self, p) -> bool:
        return p["epsilon"] != 0.0  # the ε share: Σ ε·R/(Σc + ε), the total Σc being ≥ 0

    def decide(self, info: NodeInfo) -> Decision:
        return Decision(values=(0,), send=(info.live_inputs[0],) + (False,) * (info.n_inputs - 1))

    def run(self, rel, x, p):
        r = rel[0]
        v = as_rel(x[0], r.dtype)
        dims = _dims(x, v.dim())
        if p["node_type"] == "VarBackward0":
            c = (v - v.mean(dims, keepdim=True)) ** 2
        else:
            order = float(x.get("ord", 2.0))
            c = v.abs() ** order if order not in (float("inf"), float("-inf")) else \
                (v.abs() == v.abs().amax(dims, keepdim=True)).to(v.dtype)
        total = c.sum(dims, keepdim=True)
        keep = bool(x.get("keepdim", False))
        if not keep and r.dim() < v.dim():
            for d in sorted(dims):
                r = r.unsqueeze(d)
        s, eps_part = stable_div_share(r, total, p["epsilon"], nonneg=True)
        out = [c * s] + [None] * (len(p["send"]) - 1)
        return out + [eps_part] if eps_part is not None else out


def _vector_norm(v, a):
    dim = a.get("dim")
    dim = None if dim is None or len(dim) == 0 else list(dim)
    return [torch.linalg.vector_norm(v[0], a["ord"], dim, a["keepdim"])]


def _var(v, a):
    dim = a.get("dim")
    dim = None if dim is None else list(dim)
    return [torch.var(v[0], dim, correction=a["correction"], keepdim=a["keepdim"])]


register_op("LinalgVectorNormBackward0", "share", saved_inputs={0: "_saved_self"},
            saved_outputs={0: "_saved_result"}, forward=_vector_norm,
            attrs=("dim", "keepdim", "ord"))
register_op("VarBackward0", "share", saved_inputs={0: "_saved_self"}, forward=_var,
            attrs=("dim", "keepdim", "correction"))
