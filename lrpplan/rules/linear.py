"""Linear ops with two matrix operands (Addmm, Mm, Bmm, Mv, Baddbmm, Convolution).

One operand leads to an attribution target, the other (a weight) does not: the ε-rule family,
``R_x = x ⊙ VJP_x(R / stab(z))``, with Zennit's variants (z⁺, γ, αβ, flat, w², z-box) selected by
the rule set's ``variant``; a bias absorbs its share. Both operands lead to targets (QKᵀ, AV,
dynamic weights): the AttnLRP uniform ε-rule, half of each contribution to each operand.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .base import (Attrs, Decision, NodeInfo, Rule, add_parts, as_rel, dot_sum, into, own_output,
                   register_op, register_rule, stable_div_share)
from .layout import conv_has_bias

T = torch.Tensor


@dataclass(frozen=True)
class Bilinear:
    """How to run and differentiate ``z = f(a, b) + bias`` for one node type, from tensors and
    the node's attributes ``at`` (plain data in the step) alone."""

    a: int                      # input position of the left operand
    b: int                      # input position of the right operand
    bias: Optional[int]         # input position of the bias (None: none)
    fwd: Callable[[T, T, Optional[T], Attrs], T]
    vjp_a: Callable[[T, T, T, Attrs], T]   # (s, a, b, at) -> dz/da^T s
    vjp_b: Callable[[T, T, T, Attrs], T]   # (s, a, b, at) -> dz/db^T s
    #: (bias, z.dim(), at) -> the term ``fwd`` adds to the product, broadcastable to z
    bias_term: Callable[[T, int, Attrs], T] = lambda b, dim, at: b


def _alpha(at: Attrs) -> float:
    return float(at.get("alpha", 1) or 1)


def _beta(at: Attrs) -> float:
    return float(at.get("beta", 1) or 1)


_CONV_ATTRS = ("stride", "padding", "dilation", "transposed", "output_padding", "groups")


def _conv_args(at: Attrs) -> tuple:
    return (list(at["stride"]), list(at["padding"]), list(at["dilation"]), bool(at["transposed"]),
            list(at["output_padding"]), int(at["groups"]))


def _conv_fwd(x, w, b, at):
    stride, padding, dilation, transposed, out_pad, groups = _conv_args(at)
    return torch.convolution(x, w, b, stride, padding, dilation, transposed, out_pad, groups)


def _conv_vjp(s, x, w, at, mask):
    stride, padding, dilation, transposed, out_pad, groups = _conv_args(at)
    grads = torch.ops.aten.convolution_backward(
        s, x, w, None, stride, padding, dilation, transposed, out_pad, groups, mask)
    return grads[0] if mask[0] else grads[1]


def _addmm_fwd(a, b, bias, at):
    z = torch.mm(a, b)
    if _alpha(at) != 1.0:
        z = z * _alpha(at)
    if bias is not None:
        z = z + (bias if _beta(at) == 1.0 else _beta(at) * bias)
    return z


def _mm_vjp_a(s, a, b, at):
    g = s @ b.transpose(-1, -2)
    return g * _alpha(at) if _alpha(at) != 1.0 else g


def _mm_vjp_b(s, a, b, at):
    g = a.transpose(-1, -2) @ s
    return g * _alpha(at) if _alpha(at) != 1.0 else g


def _beta_bias(bias, at):
    return bias if _beta(at) == 1.0 else _beta(at) * bias


def _baddbmm_fwd(a, b, bias, at):
    z = torch.bmm(a, b)
    if _alpha(at) != 1.0:
        z = z * _alpha(at)
    return z if bias is None else z + _beta(at) * bias


BILINEAR: dict[str, Bilinear] = {
    "AddmmBackward0": Bilinear(1, 2, 0, _addmm_fwd, _mm_vjp_a, _mm_vjp_b,
                                lambda b, dim, at: _beta_bias(b, at)),
    "MmBackward0": Bilinear(0, 1, None, lambda a, b, _, at: torch.mm(a, b),
                            lambda s, a, b, at: s @ b.t(), lambda s, a, b, at: a.t() @ s),
    "BmmBackward0": Bilinear(0, 1, None, lambda a, b, _, at: torch.bmm(a, b),
                             _mm_vjp_a, _mm_vjp_b),
    "BaddbmmBackward0": Bilinear(1, 2, 0, _baddbmm_fwd, _mm_vjp_a, _mm_vjp_b,
                                 lambda b, dim, at: _beta(at) * b),
    "MvBackward0": Bilinear(0, 1, None, lambda a, b, _, at: torch.mv(a, b),
                            lambda s, a, b, at: torch.outer(s, b), lambda s, a, b, at: a.t() @ s),
    "ConvolutionBackward0": Bilinear(
        0, 1, 2, _conv_fwd,
        lambda s, a, b, at: _conv_vjp(s, a, b, at, [True, False, False]),
        lambda s, a, b, at: _conv_vjp(s, a, b, at, [False, True, False]),
        lambda b, dim, at: b.reshape((1, -1) + (1,) * (dim - 2))),
}


def bilinear_forward(spec: Bilinear):
    """The forward replay of a node type with a :class:`Bilinear` entry."""
    def fwd(vals, at):
        bias = vals[spec.bias] if spec.bias is not None else None
        return [spec.fwd(vals[spec.a], vals[spec.b], bias, at)]
    return fwd


def _bias_positions(at: Attrs) -> tuple[int, ...]:
    """An addmm's bias (input 0) is always there: an untracked one is a frozen bias."""
    return (0,)


def _conv_bias_positions(at: Attrs) -> tuple[int, ...]:
    return (2,) if at.get("has_bias") else ()


register_op("AddmmBackward0", "linear", saved_inputs={1: "_saved_mat1", 2: "_saved_mat2"},
            forward=bilinear_forward(BILINEAR["AddmmBackward0"]), forward_inputs=(0, 1, 2),
            attrs=("alpha", "beta"), hides_value=_bias_positions)
register_op("MmBackward0", "linear", saved_inputs={0: "_saved_self", 1: "_saved_mat2"},
            forward=bilinear_forward(BILINEAR["MmBackward0"]))
register_op("BmmBackward0", "linear", saved_inputs={0: "_saved_self", 1: "_saved_mat2"},
            forward=bilinear_forward(BILINEAR["BmmBackward0"]))
register_op("BaddbmmBackward0", "linear",
            saved_inputs={1: "_saved_batch1", 2: "_saved_batch2"},
            forward=bilinear_forward(BILINEAR["BaddbmmBackward0"]), attrs=("alpha", "beta"))
register_op("MvBackward0", "linear", saved_inputs={0: "_saved_self", 1: "_saved_vec"},
            forward=bilinear_forward(BILINEAR["MvBackward0"]))
register_op("ConvolutionBackward0", "linear",
            saved_inputs={0: "_saved_input", 1: "_saved_weight"},
            forward=bilinear_forward(BILINEAR["ConvolutionBackward0"]), forward_inputs=(0, 1, 2),
            attrs=_CONV_ATTRS, facts={"has_bias": conv_has_bias}, hides_value=_conv_bias_positions)

# ---------------------------------------------------------------------------------------------
# ε-rule family for x (the operand leading to a target) and w (the one that does not)


def _pos(t: T) -> T:
    return t.clamp(min=0)


def _neg(t: T) -> T:
    return t.clamp(max=0)


# Each variant returns (relevance of x, relevance the node absorbs): the absorbed part from
# the variant's own terms, Σ (bias term + ε·sign(z))·s over every denominator z it divides by.


def _variant_epsilon(run, x, w, b, r, p, z=None):
    return _epsilon(run, x, w, b, [r], p, z)


def _epsilon(run, x, w, b, rel: list, p, z=None):
    """ε-rule taking the relevance out of ``rel``: it is freed before the VJP (peak memory).
    The ε and bias shares are one reduction (:func:`~lrpplan.rules.base.stable_div_share`)."""
    nonneg = z is not None and p.get("output_nonneg", False)
    hidden = _hidden_bias(run, x, w, z, p)
    z = run.fwd(x, w, b) if z is None else z
    s, shares = stable_div_share(rel[0], z, p["epsilon"], nonneg, bias=run.bias_term(b, z.dim()))
    absorbed = add_parts([shares, None if hidden is None else dot_sum(hidden, s)], s)
    rel[0] = z = hidden = None
    g = run.vjp(s, x, w)
    del s
    # the VJP is a fresh tensor: written in place where it may be
    return (g.mul_(x) if g.shape == x.shape and into(g, x) else x * g), absorbed


def _hidden_bias(run, x, w, z, p):
    """The bias autograd did not keep, where the output that includes it is given: no
    own-terms form (the value is saved nowhere), so it is read off as ``z − f(x, w)`` (one more
    forward pass, only for such layers)."""
    if z is None or not p.get("hidden_bias"):
        return None
    return z - run.fwd(x, w, None)


def _variant_gamma(run, x, w, b, r, p, z=None):
    """Generalised γ-rule (Zennit's ``Gamma``): the branch follows the sign of the output.

    z > 0: contributions x⁺(w + γw⁺) + (b + γb⁺) and x⁻(w + γw⁻); z < 0: x⁺(w + γw⁻) + (b + γb⁻)
    and x⁻(w + γw⁺); z = 0 receives nothing (absorbed).
    """
    g, eps = p["gamma"], p["epsilon"]
    xp, xn = _pos(x), _neg(x)
    w_up, w_dn = w + g * _pos(w), w + g * _neg(w)
    b_up = None if b is None else b + g * _pos(b)
    b_dn = None if b is None else b + g * _neg(b)
    z = run.fwd(x, w, b) if z is None else z
    z_up = run.fwd(xp, w_up, b_up) + run.fwd(xn, w_dn, None)
    z_dn = run.fwd(xp, w_dn, b_dn) + run.fwd(xn, w_up, None)
    up, dn = (z > 0).to(r.dtype), (z < 0).to(r.dtype)
    s_up, e_up = stable_div_share(up * r, z_up, eps)
    s_dn, e_dn = stable_div_share(dn * r, z_dn, eps)
    absorbed = add_parts([e_up, e_dn, run.bias_dot(s_up, b_up), run.bias_dot(s_dn, b_dn),
                          ((1 - up - dn) * r).sum()], r)
    return (xp * run.vjp(s_up, x, w_up) + xn * run.vjp(s_up, x, w_dn)
            + xp * run.vjp(s_dn, x, w_dn) + xn * run.vjp(s_dn, x, w_up)), absorbed


def _signed_parts(run, x, w, b, r, eps, positive: bool = True):
    """Zennit's ZPlus contributions w⁺x⁺ + w⁻x⁻ + b⁺ (``positive``), or the negative ones
    w⁻x⁺ + w⁺x⁻ + b⁻ that the β term of αβ uses; with the share they absorb."""
    xp, xn = _pos(x), _neg(x)
    wa, wb = (_pos(w), _neg(w)) if positive else (_neg(w), _pos(w))
    bb = None if b is None else (_pos(b) if positive else _neg(b))
    z = run.fwd(xp, wa, bb) + run.fwd(xn, wb, None)
    s, eps_part = stable_div_share(r, z, eps)
    absorbed = add_parts([eps_part, run.bias_dot(s, bb)], s)
    return xp * run.vjp(s, x, wa) + xn * run.vjp(s, x, wb), absorbed


def _variant_zplus(run, x, w, b, r, p, z=None):
    return _signed_parts(run, x, w, b, r, p["epsilon"])


def _variant_alphabeta(run, x, w, b, r, p, z=None):
    alpha, beta = p["alpha"], p["beta"]
    pos, a_pos = _signed_parts(run, x, w, b, r, p["epsilon"])
    out, absorbed = alpha * pos, alpha * a_pos
    if beta:
        neg, a_neg = _signed_parts(run, x, w, b, r, p["epsilon"], positive=False)
        out, absorbed = out - beta * neg, absorbed - beta * a_neg
    if alpha - beta != 1.0:  # α − β ≠ 1 scales the relevance by design
        absorbed = absorbed + (1.0 - alpha + beta) * r.sum()
    return out, absorbed


def _variant_flat(run, x, w, b, r, p, z=None):
    ones_x, ones_w = torch.ones_like(x), torch.ones_like(w)
    z = run.fwd(ones_x, ones_w, None)
    s, eps_part = stable_div_share(r, z, p["epsilon"])
    return run.vjp(s, ones_x, ones_w), add_parts([eps_part], s)


def _variant_wsquare(run, x, w, b, r, p, z=None):
    ones_x, w2 = torch.ones_like(x), w * w
    b2 = None if b is None else b * b  # Zennit squares the bias too
    z = run.fwd(ones_x, w2, b2)
    s, eps_part = stable_div_share(r, z, p["epsilon"])
    return run.vjp(s, ones_x, w2), add_parts([eps_part, run.bias_dot(s, b2)], s)


def _bound(value, x: T) -> T:
    """A z-box bound: a number, or per-channel numbers broadcast along dim 1."""
    if isinstance(value, (list, tuple)):
        t = torch.tensor(value, dtype=x.dtype, device=x.device)
        return t.view((1, -1) + (1,) * (x.dim() - 2)).expand_as(x)
    return torch.full_like(x, value)


def _variant_zbox(run, x, w, b, r, p, z=None):
    low, high = _bound(p["low"], x), _bound(p["high"], x)
    wp, wn = _pos(w), _neg(w)
    bp = None if b is None else _pos(b)
    bn = None if b is None else _neg(b)
    hidden = _hidden_bias(run, x, w, z, p)
    # the bias terms cancel in the denominator (b − b⁺ − b⁻ = 0): only ε and a hidden bias absorb
    z = (run.fwd(x, w, b) if z is None else z) - run.fwd(low, wp, bp) - run.fwd(high, wn, bn)
    s, eps_part = stable_div_share(r, z, p["epsilon"])
    absorbed = add_parts([eps_part, None if hidden is None else dot_sum(hidden, s)], s)
    return x * run.vjp(s, x, w) - low * run.vjp(s, low, wp) - high * run.vjp(s, high, wn), \
        absorbed


#: variants whose relevance for the activation is ``x ⊙ (finite factors)``
_X_PROPORTIONAL_VARIANTS = frozenset({"epsilon", "gamma", "zplus", "alphabeta"})

VARIANTS = {
    "epsilon": _variant_epsilon,
    "gamma": _variant_gamma,
    "zplus": _variant_zplus,
    "alphabeta": _variant_alphabeta,
    "flat": _variant_flat,
    "wsquare": _variant_wsquare,
    "zbox": _variant_zbox,
}


_SOFTMAX = ("SoftmaxBackward0", "SafeSoftmaxBackward0")


def p_attention(info: NodeInfo) -> str:
    return str(info.params.get("attention", "attnlrp"))


class _Oriented:
    """Presents ``z = f(x, w)`` with x either the left or the right operand."""

    __slots__ = ("spec", "at", "x_is_a")

    def __init__(self, spec: Bilinear, at: Attrs, x_is_a: bool) -> None:
        self.spec, self.at, self.x_is_a = spec, at, x_is_a

    def fwd(self, x: T, w: T, b: Optional[T]) -> T:
        if self.x_is_a:
            return self.spec.fwd(x, w, b, self.at)
        return self.spec.fwd(w, x, b, self.at)

    def vjp(self, s: T, x: T, w: T) -> T:
        if self.x_is_a:
            return self.spec.vjp_a(s, x, w, self.at)
        return self.spec.vjp_b(s, w, x, self.at)

    def bias_term(self, b: Optional[T], dim: int) -> Optional[T]:
        """The bias as ``fwd`` adds it, broadcastable to the output (``None`` without one)."""
        return None if b is None else self.spec.bias_term(b, dim, self.at)

    def bias_dot(self, s: T, b: Optional[T]) -> Optional[T]:
        """Σ (bias term)·s: the share the bias absorbs (``None`` without a bias)."""
        return None if b is None else dot_sum(self.bias_term(b, s.dim()), s)


@register_rule
class LinearRule(Rule):
    """ε-family rule for weight × activation; uniform ε-rule for activation × activation."""

    name = "linear"
    defaults = {"variant": "epsilon", "epsilon": 1e-6, "gamma": 0.25, "alpha": 2.0,
                "beta": 1.0, "low": -3.0, "high": 3.0, "attention": "attnlrp"}

    def proportional(self, p) -> bool:
        return p.get("mode") == "bilinear" or p.get("variant") in _X_PROPORTIONAL_VARIANTS

    def absorbs(self, p) -> bool:
        return True  # bias, ε and (γ, αβ) branch shares

    def decide(self, info: NodeInfo) -> Decision:
        spec = BILINEAR[info.node_type]
        send = [False] * info.n_inputs
        la = info.live_inputs[spec.a] and not info.none_inputs[spec.a]
        lb = info.live_inputs[spec.b] and not info.none_inputs[spec.b]
        send[spec.a], send[spec.b] = la, lb
        values = [spec.a, spec.b]
        if spec.bias is not None and not info.none_inputs[spec.bias]:
            values.append(spec.bias)
        if la and lb and p_attention(info) == "cp":
            # CP-LRP: the operand that comes from a softmax (attention weights) is a constant
            if info.source_type(spec.a) in _SOFTMAX:
                la = send[spec.a] = False
            elif info.source_type(spec.b) in _SOFTMAX:
                lb = send[spec.b] = False
        mode = "bilinear" if (la and lb) else ("a" if la else "b")
        assumption = ""
        if spec.bias is not None and info.none_inputs[spec.bias] and \
                spec.bias in (info.spec.hides_value(info.attrs) if info.spec.hides_value else ()):
            assumption = (f"{info.node_type}: its bias does not require grad, so autograd did "
                          "not keep it, nor did any consumer keep the layer's output: the bias "
                          "is taken as 0")
        params = {"mode": mode, "reuse_output": True}
        if assumption:
            params["hidden_bias"] = True  # the output, where given, includes the bias
        return Decision(values=tuple(values), send=tuple(send),
                        params=params, assumption=assumption,
                        lost_constant=bool(assumption))

    def run(self, rel, x, p):
        spec = BILINEAR[p["node_type"]]
        r = rel[0]
        a, b = as_rel(x[spec.a], r.dtype), as_rel(x[spec.b], r.dtype)
        bias = None
        if spec.bias is not None and x.get(spec.bias) is not None:
            bias = as_rel(x[spec.bias], r.dtype)
        out = [None] * len(p["send"])
        mode = p["mode"]
        run = _Oriented(spec, x, mode != "b")
        z_saved = own_output(x)  # the forward output, when the graph holds it
        if z_saved is not None and z_saved.dtype != r.dtype and not p.get("hidden_bias"):
            # a half-precision output is rounded: recomputed in the relevance dtype, the
            # denominator is the sum the numerators add up to (conservation to float round-off)
            z_saved = None
        if mode == "bilinear":
            z = as_rel(z_saved, r.dtype) if z_saved is not None else run.fwd(a, b, bias)
            hidden = None if z_saved is None or not p.get("hidden_bias") else \
                z - run.fwd(a, b, None)  # no own-terms form: see _hidden_bias
            s, shares = stable_div_share(
                r, z, p["epsilon"], z_saved is not None and p.get("output_nonneg", False),
                bias=run.bias_term(bias, z.dim()))
            absorbed = add_parts([shares, None if hidden is None else dot_sum(hidden, s)], s)
            out[spec.a] = 0.5 * a * run.vjp(s, a, b)
            out[spec.b] = 0.5 * b * spec.vjp_b(s, a, b, x)
            return out + [absorbed]
        xa, w = (a, b) if mode == "a" else (b, a)
        z = as_rel(z_saved, r.dtype) if z_saved is not None else None
        if p["variant"] == "epsilon":
            del r  # the executor's list holds the only other reference: _epsilon drops it
            y, absorbed = _epsilon(run, xa, w, bias, rel, p, z)
        else:
            y, absorbed = VARIANTS[p["variant"]](run, xa, w, bias, r, p, z)
        out[spec.a if mode == "a" else spec.b] = y
        return out + [absorbed]
