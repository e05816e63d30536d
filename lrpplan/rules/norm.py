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

from .base import (Decision, NodeInfo, Rule, add_parts, as_rel, dot_sum, own_output, register_op,
                   register_rule, stable_div_share)


def _layer_norm_parts(n, dtype):
    x = as_rel(n._saved_input, dtype)
    k = len(n._saved_normalized_shape)
    mean = n._saved_result1
    # a half-precision mean is rounded: the exact mean keeps the centring map's relevance equal
    # to Σ (y − b)·s (conservation); the same mean up to that rounding
    mean = as_rel(mean, dtype) if mean.dtype == dtype else \
        x.mean(tuple(range(-k, 0)), keepdim=True)
    rstd = as_rel(n._saved_result2, dtype)
    w = n._saved_weight
    b = n._saved_bias
    scale = rstd if w is None else rstd * as_rel(w, dtype)
    return x, k, mean, scale, (None if b is None else as_rel(b, dtype))


def _layer_norm_forward(n, vals):
    x, k, mean, scale, b = _layer_norm_parts(n, n._saved_input.dtype)
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
        values = (2,) if info.node_type == "NativeGroupNormBackward0" and info.n_inputs > 2 \
            and not info.none_inputs[2] else ()
        return Decision(values=values, send=send)

    def run(self, node, rel, vals, p):
        r = rel[0]
        if p["node_type"] == "NativeGroupNormBackward0":
            rx, absorbed = _group_norm_rel(node, r, vals, p["epsilon"])
            return [rx, None, None][:len(p["send"])] + [absorbed]
        x, k, mean, scale, b = _layer_norm_parts(node, r.dtype)
        y = (x - mean) * scale
        if b is not None:
            y = y + b
        s, eps_part = stable_div_share(r, y, p["epsilon"])
        absorbed = add_parts([eps_part, None if b is None else dot_sum(b, s)], s)
        c = scale * s
        dims = tuple(range(-k, 0))
        out = [None] * len(p["send"])
        out[0] = x * (c - c.mean(dims, keepdim=True))
        return out + [absorbed]


def _group_norm_rel(n, r, vals, eps):
    x = as_rel(n._saved_input, r.dtype)
    N, C, G = int(n._saved_N), int(n._saved_C), int(n._saved_group)
    shape = x.shape
    xg = x.reshape(N, G, -1)
    mean = n._saved_result1
    mean = as_rel(mean, r.dtype).reshape(N, G, 1) if mean.dtype == r.dtype else \
        xg.mean(-1, keepdim=True)  # exact where the saved one is rounded (half precision)
    rstd = as_rel(n._saved_result2, r.dtype).reshape(N, G, 1)
    w = n._saved_weight
    bshape = (1, C) + (1,) * (len(shape) - 2)
    wc = torch.ones(bshape, dtype=r.dtype, device=r.device) if w is None else \
        as_rel(w, r.dtype).reshape(bshape)
    y = ((xg - mean) * rstd).reshape(shape) * wc
    bias = vals[2] if len(vals) > 2 else None
    if bias is not None:
        bias = as_rel(bias, r.dtype).reshape(bshape)
        y = y + bias
    s, eps_part = stable_div_share(r, y, eps)
    absorbed = add_parts([eps_part, None if bias is None else dot_sum(bias, s)], s)
    c = (wc * s).reshape(N, G, -1) * rstd
    return (xg * (c - c.mean(-1, keepdim=True))).reshape(shape), absorbed


def _group_norm_forward(n, vals):
    x = n._saved_input
    N, C, G = int(n._saved_N), int(n._saved_C), int(n._saved_group)
    xg = x.reshape(N, G, -1)
    y = ((xg - n._saved_result1.reshape(N, G, 1)) * n._saved_result2.reshape(N, G, 1))
    y = y.reshape(x.shape)
    bshape = (1, C) + (1,) * (x.dim() - 2)
    if n._saved_weight is not None:
        y = y * n._saved_weight.reshape(bshape)
    if len(vals) > 2 and vals[2] is not None:
        y = y + vals[2].reshape(bshape)
    return [y]


def _bn_affine(n, dtype):
    """Per-channel scale ``a`` and shift ``c`` with ``y = a·x + c`` (broadcast shape (1,C,1..))."""
    x = n._saved_input
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    training = bool(getattr(n, "_saved_training", False))
    if type(n).__name__ == "CudnnBatchNormBackward0":
        training = training or n._saved_running_mean is None
    if training:
        mean = as_rel(n._saved_result1, dtype)
        invstd = as_rel(n._saved_result2, dtype)
    else:
        eps = float(getattr(n, "_saved_eps", getattr(n, "_saved_epsilon", 1e-5)))
        mean = as_rel(n._saved_running_mean, dtype)
        invstd = torch.rsqrt(as_rel(n._saved_running_var, dtype) + eps)
    w = n._saved_weight
    a = invstd if w is None else invstd * as_rel(w, dtype)
    return a.reshape(shape), mean.reshape(shape), shape


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

    def run(self, node, rel, vals, p):
        r = rel[0]
        x = as_rel(node._saved_input, r.dtype)
        a, mean, shape = _bn_affine(node, r.dtype)
        ax = a * x
        y = own_output(vals, p)  # the output where the graph holds it
        bias = vals[2] if len(vals) > 2 else None
        if y is not None and y.dtype != r.dtype and bias is not None:
            y = None  # rounded (half precision): recomputed in the relevance dtype
        nonneg = y is not None and p.get("output_nonneg", False)
        shift = -a * mean  # y = a·x + shift
        if bias is not None:
            shift = shift + as_rel(bias, r.dtype).reshape(shape)
        elif y is not None and not nonneg:
            # a bias autograd did not keep is in the given output: no own-terms form, so the
            # shift is read off the output at one position per channel (y − a·x there)
            first = (0, slice(None)) + (0,) * (x.dim() - 2)
            shift = (as_rel(y[first], r.dtype) - ax[first]).reshape(shape)
        if y is None:
            y = ax - a * mean
            if bias is not None:
                y = y + as_rel(bias, r.dtype).reshape(shape)
        s, eps_part = stable_div_share(r, as_rel(y, r.dtype), p["epsilon"], nonneg)
        absorbed = add_parts([eps_part, dot_sum(shift, s)], s)
        out = [None] * len(p["send"])
        out[0] = ax.mul_(s)
        return out + [absorbed]


def _bn_forward(n, vals):
    x = n._saved_input
    a, mean, shape = _bn_affine(n, x.dtype)
    y = a * (x - mean)
    if len(vals) > 2 and vals[2] is not None:
        y = y + vals[2].reshape(shape)
    return [y]


register_op("NativeLayerNormBackward0", "centred_norm", saved_inputs={0: "_saved_input"},
            forward=_layer_norm_forward, forward_inputs=(), key_attrs=("normalized_shape",))
register_op("NativeGroupNormBackward0", "centred_norm", saved_inputs={0: "_saved_input"},
            forward=_group_norm_forward, forward_inputs=(2,), key_attrs=("group",))
register_op(["NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0"],
            "affine_norm", saved_inputs={0: "_saved_input"}, forward=_bn_forward,
            forward_inputs=(2,), key_attrs=("training",))
