"""Softmax: AttnLRP rule ``R_x = x ⊙ (R − s · Σ R)`` along the softmax dim (no mask baked in).

``x`` (the logits) is saved nowhere by autograd (Softmax saves only its result), so it comes
through a Promise. Where the Promise cannot be resolved, the logits are reconstructed as
``log(s)`` — exact up to a per-row constant — and that assumption is recorded with the result.
Positions with ``s == 0`` (masked) get no relevance.
"""
from __future__ import annotations

import torch

from .base import Decision, NodeInfo, Rule, as_rel, register_op, register_rule
from .routing import _dim


def softmax_relevance(x: torch.Tensor, s: torch.Tensor, r: torch.Tensor, dim: int) -> torch.Tensor:
    """AttnLRP softmax rule; masked entries (s == 0, x = -inf) receive 0."""
    out = x * (r - s * r.sum(dim, keepdim=True))
    return torch.where(s > 0, out, torch.zeros((), dtype=out.dtype, device=out.device))


@register_rule
class SoftmaxRule(Rule):
    name = "softmax"

    def proportional(self, p) -> bool:
        return True

    def decide(self, info: NodeInfo) -> Decision:
        send = (info.live_inputs[0],)
        if info.recoverable(0):
            return Decision(values=(0,), send=send, params={"logits": "value"})
        return Decision(values=(), send=send, params={"logits": "log_result"},
                        assumption=f"{info.node_type}: softmax input saved nowhere; logits "
                                   "reconstructed as log(softmax), exact up to a per-row constant")

    def run(self, node, rel, vals, p):
        r = rel[0]
        s = as_rel(node._saved_result, r.dtype)
        dim = _dim(node._saved_dim)
        if p["logits"] == "value":
            x = as_rel(vals[0], r.dtype)
        else:
            x = torch.log(s)
        return [softmax_relevance(x, s, r, dim)]


register_op(["SoftmaxBackward0", "SafeSoftmaxBackward0"], "softmax",
            saved_outputs={0: "_saved_result"}, key_attrs=("dim",),
            forward=lambda n, v: [torch.softmax(v[0], _dim(n._saved_dim))])
