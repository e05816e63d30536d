"""Softmax: AttnLRP rule ``R_x = x ⊙ (R − s · Σ R)`` along the softmax dim (no mask baked in).

``x`` (the logits) is saved nowhere by autograd (Softmax saves only its result), so it comes
through a Promise. Where the Promise cannot be resolved, the logits are reconstructed as
``log(s)`` — exact up to a per-row constant — and that assumption is recorded with the result.
Positions with ``s == 0`` (masked, ``x = -inf``; also rows a safe softmax gave all zeros) get no
relevance, and relevance reaching them is dropped; a row whose weights are NaN (a plain softmax
over ``-inf`` only, whose output the model masked out afterwards) gets none either.

The rule does not conserve: it reports what it absorbs (:meth:`SoftmaxRule.absorbs`), from its
own terms per row, ``ΣR · (1 + Σ_{s>0} s x) − Σ_{s>0} x R`` (the Taylor residual, including the
relevance dropped at masked entries).
"""
from __future__ import annotations

import torch

from .base import Decision, NodeInfo, Rule, as_rel, register_op, register_rule


def softmax_relevance(x: torch.Tensor, s: torch.Tensor, r: torch.Tensor, dim: int,
                      absorbed: bool = False):
    """AttnLRP softmax rule; masked entries (s == 0, x = -inf) and NaN weights receive 0.

    ``absorbed``: also return the relevance the rule absorbs (0-d), from its own terms.
    """
    live = s > 0  # False at masked entries and at NaN weights (a row of -inf only)
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    s_live = torch.where(live, s, zero)
    x_live = torch.where(live, x, zero)
    del live
    r_sum = r.sum(dim, keepdim=True)
    out = (r - s_live * r_sum).mul_(x_live)
    if not absorbed:
        return out
    x_mean = s_live.mul_(x_live).sum(dim, keepdim=True)
    x_dot_r = torch.dot(x_live.reshape(-1), r.reshape(-1)) if x_live.shape == r.shape \
        else (x_live * r).sum()
    return out, (r_sum * x_mean.add_(1.0)).sum() - x_dot_r


@register_rule
class SoftmaxRule(Rule):
    name = "softmax"

    def proportional(self, p) -> bool:
        return True

    def absorbs(self, p) -> bool:
        """The Taylor residual and the relevance dropped at masked entries: reported by
        :meth:`run`."""
        return True

    def decide(self, info: NodeInfo) -> Decision:
        send = (info.live_inputs[0],)
        if info.recoverable(0):
            return Decision(values=(0,), send=send, params={"logits": "value"})
        return Decision(values=(), send=send, params={"logits": "log_result"},
                        assumption=f"{info.node_type}: softmax input saved nowhere; logits "
                                   "reconstructed as log(softmax), exact up to a per-row constant")

    def run(self, rel, x, p):
        r = rel[0]
        s = as_rel(x["result"], r.dtype)
        logits = as_rel(x[0], r.dtype) if p["logits"] == "value" else torch.log(s)
        out, absorbed = softmax_relevance(logits, s, r, x["dim"], absorbed=True)
        return [out, absorbed]


register_op(["SoftmaxBackward0", "SafeSoftmaxBackward0"], "softmax",
            saved_outputs={0: "_saved_result"}, attrs=("dim",), reads=("result",),
            forward=lambda v, a: [torch.softmax(v[0], a["dim"])])
