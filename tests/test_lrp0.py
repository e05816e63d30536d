"""LRP-0 with ε = 0 exactly: gradient × input on bias-free ReLU networks, no 0/0 where a ReLU's
result stands in for the linear output it alone consumes."""
from __future__ import annotations

import torch
from torch import nn

import lrpplan


def test_epsilon_zero_equals_gradient_times_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False),
                          nn.ReLU(), nn.Linear(8, 3, bias=False)).double().eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    attr = lrpplan.explain(model, x, target=1, cache=False,
                           rules=lrpplan.RuleSet.preset("epsilon", epsilon=0.0))
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xx)[:, 1].sum(), xx)
    torch.testing.assert_close(attr.relevance, x * g, rtol=1e-10, atol=1e-14)
    assert attr.ledger.closes()
