"""Relevance to several tensors at once (issue 13, point 5): relevance flows on through an
explained intermediate tensor, so each requested tensor gets what it gets when requested alone
(Captum LayerLRP's semantics). References: gradient × input of the score in float64 (LRP-0 on
bias-free ReLU networks with ε → 0), and each tensor requested alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpplan

TINY = lrpplan.RuleSet.preset("epsilon", epsilon=1e-12)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False),
                         nn.ReLU(), nn.Linear(8, 3, bias=False)).double().eval()


def _forward(model, x):
    h1 = model[1](model[0](x))
    h2 = model[3](model[2](h1))
    return h1, h2, model[4](h2)


@pytest.mark.parametrize("order", ["inputs-first", "hidden-first"])
def test_readme_example_input_and_hidden(order):
    model = _mlp()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    h1, _, out = _forward(model, x)
    score = out[:, 0]
    wanted = [x, h1] if order == "inputs-first" else [h1, x]
    both = lrpplan.attribute(score, wanted, rules=TINY, cache=False)
    rel = dict(zip(("x", "h1") if order == "inputs-first" else ("h1", "x"), both.relevance))
    gx, gh = torch.autograd.grad(score.sum(), [x, h1])
    torch.testing.assert_close(rel["x"], (x * gx).detach(), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(rel["h1"], (h1 * gh).detach(), rtol=1e-8, atol=1e-12)
    assert rel["x"].abs().sum() > 0
    assert both.ledger.closes()


def test_each_tensor_gets_what_it_gets_alone_with_biases():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4, requires_grad=True)
    h1, h2, out = _forward(model, x)
    score = out[:, 1]
    together = lrpplan.attribute(score, [x, h1, h2], cache=False).relevance
    for t, got in zip([x, h1, h2], together):
        alone = lrpplan.attribute(score, t, cache=False).relevance
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-7)


def test_replayed_plan_with_intermediate_targets(tmp_path):
    model = _mlp()
    cache = lrpplan.PlanCache(tmp_path)
    results = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
        h1, h2, out = _forward(model, x)
        attr = lrpplan.attribute(out[:, 2], [x, h2], rules=TINY, cache=cache)
        gx, gh = torch.autograd.grad(out[:, 2].sum(), [x, h2])
        torch.testing.assert_close(attr.relevance[0], (x * gx).detach(), rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(attr.relevance[1], (h2 * gh).detach(), rtol=1e-8,
                                   atol=1e-12)
        results.append(attr.cached)
    assert results == [False, True]


def test_residual_branch_tensor_and_input():
    torch.manual_seed(4)
    lin1, lin2 = nn.Linear(6, 6, bias=False).double(), nn.Linear(6, 2, bias=False).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    branch = torch.relu(lin1(x))
    out = lin2(x + branch)
    attr = lrpplan.attribute(out[:, 0], [x, branch], rules=TINY, cache=False)
    alone_x = lrpplan.attribute(out[:, 0], x, rules=TINY, cache=False).relevance
    alone_b = lrpplan.attribute(out[:, 0], branch, rules=TINY, cache=False).relevance
    torch.testing.assert_close(attr.relevance[0], alone_x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attr.relevance[1], alone_b, rtol=1e-10, atol=1e-12)
    # the books end at x: Σ start = Σ at x (+ what ε absorbs, ~0 here)
    assert attr.ledger.at_inputs == pytest.approx(float(out[:, 0].detach().sum()), rel=1e-8)
