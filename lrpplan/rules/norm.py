"""Normalisation layers with the normaliser treated as a constant (AttnLRP identity rule).

- LayerNorm / GroupNorm: ``y = (x − μ) · rstd · w + b``; ε-rule through the *centring* map
  ``x ↦ (x − mean(x)) · rstd · w``: ``R_x = x ⊙ (c − mean(c))`` with ``c = w · rstd · R/stab(y)``.
  The bias absorbs its share.
- BatchNorm: an affine map per channel ``y = a·x + (b − a·μ)`` with fixed statistics (running
  statistics in eval, the saved batch statistics in train mode, so each sample keeps its own
  relevance); ``R_x = a·x · R/stab(y)``.
"""
from __future__ import annotations

import torch

from .base import (Decision, NodeInfo, Rule, add_parts, as_rel, into, own_output, register_op,
                   register_rule, stable_div_share)


_LN_READS = ("input", "result1", "result2", "weight", "bias")


def _layer_norm_parts(a, dtype):
    x = as_rel(a["input"], dtype)
    k = len(a["normalized_shape"])
    mean = a["result1"]
    # a half-precision mean is rounded: the exact mean keeps the centring map's relevance equal
    # to Σ (y − b)·s (conservation); the same mean up to that rounding
    mean = as_rel(mean, dtype) if mean.dtype == dtype else \
        x.mean(tuple(range(-k, 0)), keepdim=True)
    rstd = as_rel(a["result2"], dtype)
    w = a["weight"]
    b = a["bias"]
    scale = rstd if w is None else rstd * as_rel(w, dtype)
    return x, k, mean, scale, (None if b is None else as_rel(b, dtype))


def _layer_norm_forward(vals, a):
    x, k, mean, scale, b = _layer_norm_parts(a, a["input"].dtype)
    y = (x - mean) * scale
    return [y if b is None else y + b]


@register_rule
class CentredNorm(Rule):
    """LayerNorm and GroupNorm: ε-rule through the centring map with a constant rstd."""

    name = "centred_norm"
    defaults = {"epsilon": 1e-6}

    def absorbs(self, p) -> bool:
        return True  # the bias and ε shares: Σ (b + ε·sign(y))·R/stab(y)

    def decide(self, info: NodeInfo) -> Decision:
        send = (info.live_inputs[0],) + (False,) * (info.n_inputs - 1)
        if info.node_type == "NativeGroupNormBackward0":
            values = (2,) if info.n_inputs > 2 and not info.none_inputs[2] else ()
            return Decision(values=values, send=send)
        # the output, where a consumer saved it (the next linear layer does), is the
        # denominator: no recomputation
        return Decision(values=(), send=send, params={"reuse_output": True})

    def run(self, rel, x, p):
        r = rel[0]
        if p["node_type"] == "NativeGroupNormBackward0":
            rx, absorbed = _group_norm_rel(x, r, p["epsilon"])
            return [rx, None, None][:len(p["send"])] + [absorbed]
        v, k, mean, scale, b = _layer_norm_parts(x, r.dtype)
        y = own_output(x)
        nonneg = y is not None and p.get("output_nonneg", False)
        if y is None or y.dtype != r.dtype:  # rounded (half precision): recomputed
            y = (v - mean) * scale
            if b is not None:
                y = y + b
            nonneg = False
        s, shares = stable_div_share(r, y, p["epsilon"], nonneg, bias=b)
        c = scale * s
        dims = tuple(range(-k, 0))
        out = [None] * len(p["send"])
        out[0] = v * (c - c.mean(dims, keepdim=True))
        return out + [add_parts([shares], s)]


_GN_READS = ("input", "result1", "result2", "weight", "N")


def _group_norm_parts(a, dtype):
    x = as_rel(a["input"], dtype)
    N, C, G = int(a["N"]), int(a["C"]), int(a["group"])
    xg = x.reshape(N, G, -1)
    mean = a["result1"]
    mean = as_rel(mean, dtype).reshape(N, G, 1) if mean.dtype == dtype else \
        xg.mean(-1, keepdim=True)  # exact where the saved one is rounded (half precision)
    rstd = as_rel(a["result2"], dtype).reshape(N, G, 1)
    bshape = (1, C) + (1,) * (x.dim() - 2)
    w = a["weight"]
    wc = torch.ones(bshape, dtype=dtype, device=x.device) if w is None else \
        as_rel(w, dtype).reshape(bshape)
    return x, xg, mean, rstd, wc, bshape


def _group_norm_rel(a, r, eps):
    x, xg, mean, rstd, wc, bshape = _group_norm_parts(a, r.dtype)
    y = ((xg - mean) * rstd).reshape(x.shape) * wc
    bias = a.get(2)
    if bias is not None:
        bias = as_rel(bias, r.dtype).reshape(bshape)
        y = y + bias
    s, shares = stable_div_share(r, y, eps, bias=bias)
    absorbed = add_parts([shares], s)
    c = (wc * s).reshape(xg.shape) * rstd
    return (xg * (c - c.mean(-1, keepdim=True))).reshape(x.shape), absorbed


def _group_norm_forward(vals, a):
    x, xg, mean, rstd, wc, bshape = _group_norm_parts(a, a["input"].dtype)
    y = ((xg - mean) * rstd).reshape(x.shape) * wc
    if len(vals) > 2 and vals[2] is not None:
        y = y + vals[2].reshape(bshape)
    return [y]


def _bn_affine(a, op: str, dtype, bias=None):
    """Per-channel scale and shift with ``y = scale·x + shift`` (broadcast shape (1,C,1..));
    ``bias``: the affine bias (None: none, or one autograd did not keep)."""
    x = a["input"]
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    training = bool(a.get("training", False))
    if op == "CudnnBatchNormBackward0":
        training = training or a["running_mean"] is None
    if training:
        mean = as_rel(a["result1"], dtype)
        invstd = as_rel(a["result2"], dtype)
    else:
        eps = float(a.get("eps", a.get("epsilon", 1e-5)))
        mean = as_rel(a["running_mean"], dtype)
        invstd = torch.rsqrt(as_rel(a["running_var"], dtype) + eps)
    w = a["weight"]
    scale = invstd if w is None else invstd * as_rel(w, dtype)
    if bias is None:
        shift = (scale * mean).neg_()
    else:
        shift = torch.addcmul(as_rel(bias, dtype), scale, mean, value=-1.0)
    return scale.reshape(shape), shift.reshape(shape)


@register_rule
class AffineNorm(Rule):
    """BatchNorm: ε-rule through ``y = a·x + c`` with fixed statistics; ``c`` absorbs."""

    name = "affine_norm"
    defaults = {"epsilon": 1e-6}

    def absorbs(self, p) -> bool:
        return True  # the shift and ε shares: Σ (b − a·μ + ε·sign(y))·R/stab(y)

    def decide(self, info: NodeInfo) -> Decision:
        send = (info.live_inputs[0],) + (False,) * (info.n_inputs - 1)
        values = (2,) if info.n_inputs > 2 and not info.none_inputs[2] else ()
        return Decision(values=values, send=send, params={"reuse_output": True})

    def run(self, rel, x, p):
        r = rel[0]
        v = as_rel(x["input"], r.dtype)
        bias = x.get(2)
        a, shift = _bn_affine(x, p["node_type"], r.dtype, bias)
        ax = a * v
        y = own_output(x)  # the output where the graph holds it
        if y is not None and y.dtype != r.dtype and bias is not None:
            y = None  # rounded (half precision): recomputed in the relevance dtype
        nonneg = y is not None and p.get("output_nonneg", False)
        if bias is None and y is not None and not nonneg:
            # a bias autograd did not keep is in the given output: no own-terms form, so the
            # shift is read off the output at one position per channel (y − a·x there)
            first = (0, slice(None)) + (0,) * (v.dim() - 2)
            shift = (as_rel(y[first], r.dtype) - ax[first]).reshape(shift.shape)
        if y is None:
            y = ax + shift
        s, shares = stable_div_share(r, as_rel(y, r.dtype), p["epsilon"], nonneg, bias=shift)
        out = [None] * len(p["send"])
        out[0] = ax.mul_(s) if into(ax, s) else ax * s
        return out + [add_parts([shares], s)]


def _bn_forward(op: str):
    def forward(vals, a):
        x = a["input"]
        scale, shift = _bn_affine(a, op, x.dtype, vals[2] if len(vals) > 2 else None)
        return [torch.addcmul(shift, x, scale)]
    return forward


_BN_READS = ("input", "weight", "running_mean", "running_var", "result1", "result2")

register_op("NativeLayerNormBackward0", "centred_norm", saved_inputs={0: "_saved_input"},
            forward=_layer_norm_forward, forward_inputs=(), attrs=("normalized_shape",),
            reads=_LN_READS)
register_op("NativeGroupNormBackward0", "centred_norm", saved_inputs={0: "_saved_input"},
            forward=_group_norm_forward, forward_inputs=(2,), attrs=("C", "group"),
            reads=_GN_READS)
register_op("NativeBatchNormBackward0", "affine_norm", saved_inputs={0: "_saved_input"},
            forward=_bn_forward("NativeBatchNormBackward0"), forward_inputs=(2,),
            attrs=("training", "eps"), reads=_BN_READS)
for _name in ("CudnnBatchNormBackward0", "MiopenBatchNormBackward0"):
    register_op(_name, "affine_norm", saved_inputs={0: "_saved_input"},
                forward=_bn_forward(_name), forward_inputs=(2,), attrs=("training", "epsilon"),
                reads=_BN_READS)
