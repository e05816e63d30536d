"""Element-wise ops: unary nonlinearities (identity rule), sums/differences (z-rule), products.

- Unary nonlinearities (ReLU, GELU, SiLU, tanh, exp, rsqrt...): identity, ``R_in = R_out``.
- Add / Sub / Rsub: z-rule. Each operand gets its signed share ``c_i v_i / stab(z) * R``; an operand
  that leads to no attribution target absorbs its share (like a bias). A constant autograd did not
  save (a ``(None, 0)`` edge, a Python scalar) has an unknown value: it is taken as 0, a documented
  assumption recorded with the result.
- Mul / Div of two variables: AttnLRP uniform rule (half each); with one constant operand or a
  broadcast scale (normalisers), everything goes to the full-shape variable operand.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import (Decision, NodeInfo, Rule, add_parts, as_rel, dot_sum, own_output, register_op,
                   register_rule, stable_div_share, sum_to)
from .layout import broadcast_pattern

# ---------------------------------------------------------------------------------------------
# unary nonlinearities: identity rule; forward replays for Promise chains

#: node type -> (forward of the input value and the attributes, saved input, saved output,
#: static attributes, attributes read at run time)
_UNARY = {
    "ReluBackward0": (lambda x, a: torch.relu(x), {}, {0: "_saved_result"}, (), ()),
    "GeluBackward0": (lambda x, a: F.gelu(x, approximate=a["approximate"]),
                      {0: "_saved_self"}, {}, ("approximate",), ()),
    "SiluBackward0": (lambda x, a: F.silu(x), {0: "_saved_self"}, {}, (), ()),
    "TanhBackward0": (lambda x, a: torch.tanh(x), {}, {0: "_saved_result"}, (), ()),
    "SigmoidBackward0": (lambda x, a: torch.sigmoid(x), {}, {0: "_saved_result"}, (), ()),
    "SoftplusBackward0": (lambda x, a: F.softplus(x, a["beta"], a["threshold"]),
                          {0: "_saved_self"}, {}, ("beta", "threshold"), ()),
    "EluBackward0": (lambda x, a: F.elu(x, a["alpha"]), {0: "_saved_self"}, {}, ("alpha",), ()),
    "HardswishBackward0": (lambda x, a: F.hardswish(x), {0: "_saved_self"}, {}, (), ()),
    "HardsigmoidBackward0": (lambda x, a: F.hardsigmoid(x), {0: "_saved_self"}, {}, (), ()),
    "MishBackward0": (lambda x, a: F.mish(x), {0: "_saved_self"}, {}, (), ()),
    "LeakyReluBackward0": (lambda x, a: F.leaky_relu(x, a["negative_slope"]),
                           {0: "_saved_self"}, {}, ("negative_slope",), ()),
    "HardtanhBackward0": (lambda x, a: F.hardtanh(x, a["min_val"], a["max_val"]),
                          {0: "_saved_self"}, {}, ("min_val", "max_val"), ()),
    "ExpBackward0": (lambda x, a: torch.exp(x), {}, {0: "_saved_result"}, (), ()),
    "LogBackward0": (lambda x, a: torch.log(x), {0: "_saved_self"}, {}, (), ()),
    "NegBackward0": (lambda x, a: -x, {}, {}, (), ()),
    "AbsBackward0": (lambda x, a: x.abs(), {0: "_saved_self"}, {}, (), ()),
    "SqrtBackward0": (lambda x, a: torch.sqrt(x), {}, {0: "_saved_result"}, (), ()),
    "RsqrtBackward0": (lambda x, a: torch.rsqrt(x), {}, {0: "_saved_result"}, (), ()),
    "ReciprocalBackward0": (lambda x, a: torch.reciprocal(x), {}, {0: "_saved_result"}, (), ()),
    "PowBackward0": (lambda x, a: torch.pow(x, a["exponent"]), {0: "_saved_self"}, {},
                     ("exponent",), ()),
    "SinBackward0": (lambda x, a: torch.sin(x), {0: "_saved_self"}, {}, (), ()),
    "CosBackward0": (lambda x, a: torch.cos(x), {0: "_saved_self"}, {}, (), ()),
    "ErfBackward0": (lambda x, a: torch.erf(x), {0: "_saved_self"}, {}, (), ()),
    "LogSoftmaxBackward0": (lambda x, a: torch.log_softmax(x, a["dim"]), {}, {}, ("dim",), ()),
    "LogSigmoidBackward0": (lambda x, a: F.logsigmoid(x), {0: "_saved_self"}, {}, (), ()),
    "ClampBackward1": (lambda x, a: torch.clamp(x, a["min"], a["max"]), {0: "_saved_self"}, {},
                       ("min", "max"), ()),
    "ClampMinBackward0": (lambda x, a: torch.clamp_min(x, a["min"]), {0: "_saved_self"}, {},
                          ("min",), ()),
    # a scalar factor may follow the sizes (x / seq_len): read at run time, not in the key
    "MulBackward1": (lambda x, a: x * a["other"], {}, {}, (), ("other",)),
    "DivBackward1": (lambda x, a: x / a["other"], {}, {}, (), ("other",)),
}


def _unary_forward(fn):
    return lambda vals, a: [fn(vals[0], a)]


register_op("PowBackward2", "identity", saved_inputs={0: "_saved_exponent"},
            saved_outputs={0: "_saved_result"}, reads=("self",),
            forward=lambda v, a: [torch.pow(a["self"], v[0])], forward_inputs=(0,))

for _name, (_fn, _saved_in, _saved_out, _attrs, _reads) in _UNARY.items():
    register_op(_name, "identity", saved_inputs=_saved_in, saved_outputs=_saved_out,
                forward=_unary_forward(_fn), forward_inputs=(0,), attrs=_attrs, reads=_reads,
                stands_in=_name == "ReluBackward0")

# ---------------------------------------------------------------------------------------------
# Add / Sub / Rsub: z-rule

#: node type -> coefficient of each input in terms of the saved alpha ("1", "a", "-a", "-1")
_ADD_COEFS = {
    "AddBackward0": ("1", "a"),
    "SubBackward0": ("1", "-a"),
    "RsubBackward0": ("-a", "1"),
    "AddBackward1": ("1",),
    "SubBackward1": ("1",),
    "RsubBackward1": ("-a",),
}


def _coefs(a, node_type: str) -> list[float]:
    alpha = float(a.get("alpha", 1) or 1)
    table = {"1": 1.0, "a": alpha, "-a": -alpha, "-1": -1.0}
    return [table[c] for c in _ADD_COEFS[node_type]]


def _add_forward_of(node_type: str):
    def forward(vals, a):
        return _add_forward(node_type, vals, a)
    return forward


def _add_forward(node_type, vals, a):
    coefs = _coefs(a, node_type)
    out = None
    for c, v in zip(coefs, vals):
        if v is None:  # unsaved constant: taken as 0 (recorded by the caller)
            continue
        term = v if c == 1.0 else c * v
        out = term if out is None else out + term
    return [out]


@register_rule
class ZRule(Rule):
    """``R_i = c_i v_i / stab(sum_j c_j v_j) * R`` over the operands whose values are known."""

    name = "add"
    defaults = {"epsilon": 1e-6}

    def proportional(self, p) -> bool:
        return p.get("mode") == "z"

    def absorbs(self, p) -> bool:
        # "z": the ε share, the shares of known operands not sent (a bias, a branch leading to
        # no target) and of a constant recovered from the output; "pass" conserves
        return p.get("mode") == "z"

    def decide(self, info: NodeInfo) -> Decision:
        send = tuple(l and not n for l, n in zip(info.live_inputs, info.none_inputs))
        share = [i for i in range(info.n_inputs)
                 if not info.none_inputs[i] and (send[i] or info.recoverable(i))]
        unknown = [i for i in range(info.n_inputs) if i not in share]
        scalar_lost = info.n_inputs < 2  # AddBackward1 & co: the Python scalar is not an edge
        assumption = ""
        if (unknown or scalar_lost) and info.output_available():
            # the unsaved constant = output − known operands: it absorbs its share exactly
            return Decision(values=tuple(share), send=send,
                            params={"mode": "z", "share": list(share), "reuse_output": True})
        if unknown or scalar_lost:
            assumption = (f"{info.node_type}: a constant operand autograd did not save is taken "
                          "as 0 (its share of relevance goes to the other operands)")
        if len(share) <= 1:
            # a single known contribution carries all relevance: no values needed
            return Decision(values=(), send=send, params={"mode": "pass"}, assumption=assumption)
        # the output, where a consumer saved it, is the denominator (no summing pass)
        return Decision(values=tuple(share), send=send,
                        params={"mode": "z", "share": list(share), "reuse_output": True},
                        assumption=assumption)

    def run(self, rel, x, p):
        r = rel[0]
        send = p["send"]
        out = [None] * len(send)
        if p["mode"] == "pass":
            for i, s in enumerate(send):
                if s:
                    out[i] = r  # broadcast operands are summed back by the executor (fit_shapes)
            return out
        coefs = _coefs(x, p["node_type"])
        terms = {i: as_rel(x[i], r.dtype) if coefs[i] == 1.0 else
                 coefs[i] * as_rel(x[i], r.dtype) for i in p["share"]}
        z = own_output(x)  # the true output
        # a constant autograd did not save is in the output: its share, z − Σ known terms
        constant = z is not None and (len(send) < 2 or len(p["share"]) < len(send))
        if z is not None and z.dtype != r.dtype and not constant:
            z = None  # rounded (half precision): the sum of the terms in the relevance dtype
        z = as_rel(z, r.dtype) if z is not None else None
        nonneg = z is not None and p.get("output_nonneg", False)
        if z is None:
            for t in terms.values():
                z = t if z is None else z + t
        s, eps_part = stable_div_share(r, z, p["epsilon"], nonneg)
        parts = [eps_part]
        if constant:
            known = None
            for t in terms.values():
                known = t if known is None else known + t
            parts.append(dot_sum(z, s) if known is None else dot_sum(z - known, s))
        for i, t in terms.items():
            if send[i]:
                out[i] = sum_to(t * s, t.shape)
            else:
                parts.append(dot_sum(t, s))  # an operand leading to no target: a bias
        return out + [add_parts(parts, s)]


for _name, _coef in _ADD_COEFS.items():
    register_op(_name, "add", forward=_add_forward_of(_name), attrs=("alpha",), broadcasts=True,
                zero_operands=tuple(range(len(_coef))), meta=("in_shapes",),
                sum_of_two=_name == "AddBackward0")

# ---------------------------------------------------------------------------------------------
# Mul / Div


def _mul_forward(vals, a):
    return [vals[0] * vals[1]]


def _div_forward(vals, a):
    return [vals[0] / vals[1]]


@register_rule
class ProductRule(Rule):
    """Uniform rule for a product of two variables; everything to the full-shape variable
    otherwise; with ``gates="signal"`` (the default) Arras et al.'s signal-take-all rule for a
    gate × signal product: all relevance to the signal, none to the gate.

    ``gates="signal"``: of a ``MulBackward0`` whose one operand is a gate and the other is not
    (:func:`lrpplan.rules.recurrent.gated_signal`), the signal gets all relevance; a signal
    that leads to no explained input (a constant initial state) absorbs it.
    ``gates="uniform"``: gates are operands like any other (AttnLRP's uniform rule, ½ each when
    both are full-shape variables).
    """

    name = "product"
    defaults = {"gates": "signal"}

    def absorbs(self, p) -> bool:
        return bool(p.get("absorb"))  # a gate × constant signal: the constant's share, all

    def decide(self, info: NodeInfo) -> Decision:
        live = [i for i in range(info.n_inputs) if info.live_inputs[i] and not info.none_inputs[i]]
        send = [False] * info.n_inputs
        from .recurrent import gated_signal  # gate × signal: the recurrent rule family
        signal = gated_signal(info)
        if signal is not None and live:
            if signal in live:  # signal-take-all
                send[signal] = True
                return Decision(values=(), send=tuple(send), params={"share": 1.0})
            # the signal is a constant or leads to no explained input: it keeps it all
            return Decision(values=(), send=tuple(send), params={"share": 1.0, "absorb": True})
        if len(live) == 2:
            # decided on the broadcast pattern the plan key records, never on sizes (shapes
            # are given only for ops that broadcast: the ops whose patterns the key holds)
            pats = [broadcast_pattern(info.input_shapes[i], info.output_shapes[0]) for i in live]
            full = [i for i, pat in zip(live, pats) if pat is not None and pat.full]
            if len(full) == 1:  # broadcast scale (normaliser): all to the full-shape operand
                live = full
        for i in live:
            send[i] = True
        return Decision(values=(), send=tuple(send), params={"share": 1.0 / max(len(live), 1)})

    def run(self, rel, x, p):
        r = rel[0]
        share = p["share"]
        out = [None] * len(p["send"])
        for i, s in enumerate(p["send"]):
            if s:
                out[i] = r if share == 1.0 else r * share  # executor sums broadcast dims back
        if p.get("absorb"):
            return out + [r.sum()]
        return out


register_op("MulBackward0", "product", saved_inputs={0: "_saved_self", 1: "_saved_other"},
            forward=_mul_forward, broadcasts=True, meta=("in_shapes",))
register_op("DivBackward0", "product", saved_inputs={0: "_saved_self", 1: "_saved_other"},
            forward=_div_forward, broadcasts=True, meta=("in_shapes",))
