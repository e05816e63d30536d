"""Single-input linear maps without bias (sum, mean, average pooling, bilinear upsampling).

ε-rule ``R_x = x ⊙ VJP(R / stab(z))`` where the VJP is the autograd node itself and ``z`` the
op's forward output recomputed from ``x`` (``x`` itself may need a Promise: Sum and Mean save
no input).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Decision, NodeInfo, Rule, as_rel, register_op, register_rule, stable_div_share
from .routing import _dim, out_shape


@register_rule
class LinearMap(Rule):
    """ε-rule through a bias-free linear map of one input, differentiated by the node itself."""

    name = "linear_map"
    defaults = {"epsilon": 1e-6}

    def absorbs(self, p) -> bool:
        return p["epsilon"] != 0.0  # the ε share (no bias): Σ ε·sign(z)·R/stab(z)

    def decide(self, info: NodeInfo) -> Decision:
        send = (info.live_inputs[0] and not info.none_inputs[0],) + (False,) * (info.n_inputs - 1)
        return Decision(values=(0,), send=send)

    def run(self, node, rel, vals, p):
        r = rel[0]
        x = vals[0]
        # forward and VJP in the relevance dtype where the node allows it (a half-precision
        # VJP rounds the relevance it sends: Σ sent would miss Σ received by ~1e-3)
        z = p["forward"](node, [as_rel(x, r.dtype)])[0]
        s, eps_part = stable_div_share(r, as_rel(z, r.dtype), p["epsilon"])
        try:
            g = node(s)
        except RuntimeError:  # kernels that insist on the forward dtype
            g = node(s.to(x.dtype))
        g = g[0] if isinstance(g, tuple) else g
        out = [None] * len(p["send"])
        out[0] = as_rel(x, r.dtype) * as_rel(g, r.dtype)
        return out + [eps_part] if eps_part is not None else out


def _dims(n):
    d = n._saved_dim
    return [_dim(x) for x in d] if isinstance(d, (tuple, list)) else [_dim(d)]


def _sum_dim(n, v):
    return [v[0].sum(_dims(n), keepdim=n._saved_keepdim)]


def _mean_dim(n, v):
    return [v[0].mean(_dims(n), keepdim=n._saved_keepdim)]


def _adaptive_avg(n, v):
    x = v[0]
    size = out_shape(n)
    nd = {3: 1, 4: 2, 5: 3}.get(len(size), 2)
    fn = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[nd]
    return [fn(x, size[-nd:])]


def _avg_pool2d(n, v):
    return [F.avg_pool2d(v[0], n._saved_kernel_size, n._saved_stride, n._saved_padding,
                         n._saved_ceil_mode, n._saved_count_include_pad, n._saved_divisor_override)]


def _avg_pool3d(n, v):
    return [F.avg_pool3d(v[0], n._saved_kernel_size, n._saved_stride, n._saved_padding,
                         n._saved_ceil_mode, n._saved_count_include_pad, n._saved_divisor_override)]


def _upsample(mode):
    def fwd(n, v):
        size = out_shape(n)
        nd = len(size) - 2
        kwargs = {"align_corners": n._saved_align_corners}
        if mode.endswith("_aa"):
            return [F.interpolate(v[0], size=size[-nd:], mode=mode[:-3], antialias=True, **kwargs)]
        return [F.interpolate(v[0], size=size[-nd:], mode=mode, **kwargs)]
    return fwd


register_op("SumBackward0", "linear_map", forward=lambda n, v: [v[0].sum()])
register_op("SumBackward1", "linear_map", forward=_sum_dim, key_attrs=("dim", "keepdim"))
register_op("MeanBackward0", "linear_map", forward=lambda n, v: [v[0].mean()])
register_op("MeanBackward1", "linear_map", forward=_mean_dim, key_attrs=("dim", "keepdim"))
register_op(["AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool1DBackward0",
             "AdaptiveAvgPool3DBackward0"], "linear_map", saved_inputs={0: "_saved_self"},
            forward=_adaptive_avg)
register_op("AvgPool2DBackward0", "linear_map", saved_inputs={0: "_saved_self"},
            forward=_avg_pool2d, key_attrs=("kernel_size", "stride", "padding"))
register_op("AvgPool3DBackward0", "linear_map", saved_inputs={0: "_saved_self"},
            forward=_avg_pool3d, key_attrs=("kernel_size", "stride", "padding"))
register_op(["UpsampleBilinear2DBackward0", "UpsampleLinear1DBackward0",
             "UpsampleTrilinear3DBackward0"], "linear_map",
            forward=_upsample("bilinear"), key_attrs=("align_corners",))
register_op("UpsampleBicubic2DBackward0", "linear_map", forward=_upsample("bicubic"),
            key_attrs=("align_corners",))
register_op("UpsampleBilinear2DAaBackward0", "linear_map", forward=_upsample("bilinear_aa"),
            key_attrs=("align_corners",))
register_op("UpsampleBicubic2DAaBackward0", "linear_map", forward=_upsample("bicubic_aa"),
            key_attrs=("align_corners",))


# ---------------------------------------------------------------------------------------------
# reductions that are not linear: each element's share follows its (non-negative) contribution


def _reduce_dims(node, x):
    d = getattr(node, "_saved_dim", None)
    if d is None or (isinstance(d, (tuple, list)) and len(d) == 0):
        return tuple(range(x.dim()))
    return tuple(_dim(v) for v in (d if isinstance(d, (tuple, list)) else [d]))


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

    def run(self, node, rel, vals, p):
        r = rel[0]
        x = as_rel(vals[0], r.dtype)
        dims = _reduce_dims(node, x)
        if p["node_type"] == "VarBackward0":
            c = (x - x.mean(dims, keepdim=True)) ** 2
        else:
            order = float(getattr(node, "_saved_ord", 2.0))
            c = x.abs() ** order if order not in (float("inf"), float("-inf")) else \
                (x.abs() == x.abs().amax(dims, keepdim=True)).to(x.dtype)
        total = c.sum(dims, keepdim=True)
        keep = bool(getattr(node, "_saved_keepdim", False))
        if not keep and r.dim() < x.dim():
            for d in sorted(d % x.dim() for d in dims):
                r = r.unsqueeze(d)
        s, eps_part = stable_div_share(r, total, p["epsilon"], nonneg=True)
        out = [c * s] + [None] * (len(p["send"]) - 1)
        return out + [eps_part] if eps_part is not None else out


def _vector_norm(n, v):
    dim = getattr(n, "_saved_dim", None)
    dim = None if dim is None or len(dim) == 0 else [_dim(d) for d in dim]
    return [torch.linalg.vector_norm(v[0], n._saved_ord, dim, n._saved_keepdim)]


def _var(n, v):
    dim = getattr(n, "_saved_dim", None)
    dim = None if dim is None else [_dim(d) for d in dim]
    return [torch.var(v[0], dim, correction=n._saved_correction, keepdim=n._saved_keepdim)]


register_op("LinalgVectorNormBackward0", "share", saved_inputs={0: "_saved_self"},
            saved_outputs={0: "_saved_result"}, forward=_vector_norm,
            key_attrs=("dim", "keepdim"))
register_op("VarBackward0", "share", saved_inputs={0: "_saved_self"}, forward=_var,
            key_attrs=("dim", "keepdim"))
