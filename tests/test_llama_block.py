"""AttnLRP and CP-LRP on a Llama-style block, against a hand-written float64 propagation.

The block: RMSNorm → q, k, v → causal softmax attention → o-projection → residual; RMSNorm →
SwiGLU MLP → residual; a head on the last position. The reference below applies, layer by layer,
the rules AttnLRP prescribes (ε-rule on linear layers, z-rule on residual sums, uniform rule on
the products q kᵀ, s v and silu(g)·u, the softmax rule, identity through the normalisers) with
plain tensor algebra; CP-LRP treats the attention weights as constants.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrpplan

DT = torch.float64
EPS = 1e-6


def stab(z):
    return torch.where(z >= 0, z + EPS, z - EPS)


class LlamaBlock(nn.Module):
    def __init__(self, d=8, hidden=12, n_out=5):
        super().__init__()
        torch.manual_seed(0)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.wg, self.wu = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.wd = nn.Linear(hidden, d, bias=False)
        self.head = nn.Linear(d, n_out, bias=False)
        self.n1 = nn.Parameter(torch.rand(d) + 0.5)
        self.n2 = nn.Parameter(torch.rand(d) + 0.5)

    @staticmethod
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def forward(self, x):
        t = x.shape[1]
        h = self.rms(x, self.n1)
        q, k, v = self.wq(h), self.wk(h), self.wv(h)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        s = torch.softmax(scores.masked_fill(causal, float("-inf")), -1)
        x2 = x + self.wo(s @ v)
        h2 = self.rms(x2, self.n2)
        y = x2 + self.wd(F.silu(self.wg(h2)) * self.wu(h2))
        return self.head(y[:, -1])


def reference(m: LlamaBlock, x: torch.Tensor, target: int, cp: bool) -> torch.Tensor:
    """Hand-written AttnLRP / CP-LRP propagation of the target logit to x."""
    W = {n: getattr(m, n).weight.detach() for n in ("wq", "wk", "wv", "wo", "wg", "wu", "wd",
                                                    "head")}
    t, d = x.shape[1], x.shape[2]
    h = m.rms(x, m.n1.detach())
    q, k, v = h @ W["wq"].T, h @ W["wk"].T, h @ W["wv"].T
    qk = q @ k.transpose(-1, -2)
    causal = torch.ones(t, t, dtype=torch.bool).triu(1)
    s = torch.softmax((qk / math.sqrt(d)).masked_fill(causal, float("-inf")), -1)
    a = s @ v
    o = a @ W["wo"].T
    x2 = x + o
    h2 = m.rms(x2, m.n2.detach())
    g, u = h2 @ W["wg"].T, h2 @ W["wu"].T
    mm = F.silu(g) * u
    dd = mm @ W["wd"].T
    y = x2 + dd
    z = y[:, -1] @ W["head"].T
    r_z = torch.zeros_like(z)
    r_z[:, target] = z[:, target]
    # head (ε) on the last position
    r_y = torch.zeros_like(y)
    r_y[:, -1] = y[:, -1] * ((r_z / stab(z)) @ W["head"])
    # residual y = x2 + dd (z-rule)
    r_x2 = x2 * r_y / stab(y)
    r_dd = dd * r_y / stab(y)
    # down projection, uniform on the gate product, identity through silu, g/u projections
    r_mm = mm * ((r_dd / stab(dd)) @ W["wd"])
    r_g = r_u = 0.5 * r_mm
    r_h2 = h2 * ((r_g / stab(g)) @ W["wg"]) + h2 * ((r_u / stab(u)) @ W["wu"])
    r_x2 = r_x2 + r_h2  # RMSNorm: identity (normaliser and weight constant)
    # residual x2 = x + o
    r_x = x * r_x2 / stab(x2)
    r_o = o * r_x2 / stab(x2)
    r_a = a * ((r_o / stab(o)) @ W["wo"])
    sa = r_a / stab(a)
    if cp:
        r_v = v * (s.transpose(-1, -2) @ sa)
        r_q = r_k = torch.zeros_like(q)
    else:
        r_s = 0.5 * s * (sa @ v.transpose(-1, -2))
        r_v = 0.5 * v * (s.transpose(-1, -2) @ sa)
        logits = (qk / math.sqrt(d))
        r_logits = torch.where(s > 0, logits * (r_s - s * r_s.sum(-1, keepdim=True)),
                               torch.zeros((), dtype=DT))
        sq = r_logits / stab(qk)  # division by √d: identity; uniform rule on q kᵀ
        r_q = 0.5 * q * (sq @ k)
        r_k = 0.5 * k * (sq.transpose(-1, -2) @ q)
    r_h = h * ((r_q / stab(q)) @ W["wq"] + (r_k / stab(k)) @ W["wk"] + (r_v / stab(v)) @ W["wv"])
    return r_x + r_h


@pytest.mark.parametrize("preset", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("seed", [0, 1])
def test_llama_block_matches_hand_written_propagation(preset, seed):
    model = LlamaBlock().to(DT).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 8, dtype=DT, generator=g)
    target = 3
    attr = lrpplan.explain(model, x, target=target, rules=preset, cache=False)
    want = reference(model, x, target, cp=(preset == "cp-lrp"))
    torch.testing.assert_close(attr.relevance, want, rtol=1e-8, atol=1e-11)
    assert attr.ledger.closes()
