"""Declared fallbacks cannot return nonsense (DESIGN invariants 5 and 8).

- ``UnsupportedOperation`` suggests the fallback that fits the node: ``route`` where its gradient
  routes relevance (adaptive max-pool, reflection padding), ``identity`` only for a single input
  of the output's shape, and says so when neither fits;
- following the suggestion gives LRP-0 = gradient × input on a routing op (float64, an
  independent reference);
- a rule whose relevance does not have its input's shape, and ``identity`` on a node with
  several explained inputs, are clear errors at trace time naming the node and the rule.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpplan
from lrpplan import LRPError, RuleSet, UnsupportedOperation
from lrpplan.rules.base import RULES, Decision, Rule, register_rule
from tests.models import Cube

LRP0 = 1e-12  # ε negligible against the activations: LRP-0


def _gxi(model, x, target):
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    score = out.gather(-1, torch.as_tensor(target).reshape(-1, 1)).sum()
    (g,) = torch.autograd.grad(score, x)
    return (g * x).detach()


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _suggested(model, x):
    with pytest.raises(UnsupportedOperation) as info:
        lrpplan.explain(model, x, cache=False)
    return info.value


class _Pooled(nn.Module):
    def __init__(self, pool: nn.Module, dims: int) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.conv = conv(2, 4, 3, padding=1, bias=False)
        self.pool = pool
        self.fc = nn.Linear(4 * (3 if dims == 1 else 9), 5, bias=False)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


@pytest.fixture
def unknown(monkeypatch):
    """Make node types unknown for one test (their op specs hidden), so that the fallback hint
    is tested on ops whose gradient routes, whatever the registry gets to know later."""
    from lrpplan.rules.base import OPS

    def hide(*types):
        for t in types:
            monkeypatch.delitem(OPS, t, raising=False)
    return hide


@pytest.mark.parametrize("dims", [1, 2])
def test_adaptive_max_pool_suggested_fallback_equals_gradient_times_input(dims, float64,
                                                                          unknown):
    unknown("AdaptiveMaxPool2DBackward0")
    pool = nn.AdaptiveMaxPool1d(3) if dims == 1 else nn.AdaptiveMaxPool2d(3)
    model = float64(_Pooled(pool, dims).eval())
    x = torch.randn((2, 2, 10) if dims == 1 else (2, 2, 10, 10), dtype=torch.float64)
    exc = _suggested(model, x)
    ntype = "AdaptiveMaxPool2DBackward0"  # adaptive_max_pool1d runs the 2-D kernel
    assert exc.node_type == ntype
    assert exc.fallback == "route"
    assert f"override({ntype!r}, 'route')" in str(exc)
    rules = RuleSet.preset("epsilon", epsilon=LRP0).override(ntype, exc.fallback)
    attr = lrpplan.explain(model, x, rules=rules, cache=False)
    ref = _gxi(model, x, attr.target)
    assert attr.relevance.shape == x.shape
    assert _rel_err(attr.relevance, ref) <= 1e-8
    assert attr.ledger.closes(rtol=1e-9, atol=1e-12), attr.ledger


def test_reflection_pad_suggested_fallback_has_the_input_shape(float64, unknown):
    unknown("ReflectionPad2DBackward0")
    model = float64(nn.Sequential(nn.ReflectionPad2d(2), nn.Conv2d(3, 4, 3, bias=False),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3, bias=False))
                    .eval())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    exc = _suggested(model, x)
    assert exc.node_type == "ReflectionPad2DBackward0" and exc.fallback == "route"
    rules = RuleSet.preset("epsilon", epsilon=LRP0).override(exc.node_type, exc.fallback)
    attr = lrpplan.explain(model, x, rules=rules, cache=False)
    assert attr.relevance.shape == x.shape
    assert _rel_err(attr.relevance, _gxi(model, x, attr.target)) <= 1e-8
    assert attr.ledger.closes(rtol=1e-9, atol=1e-12)


def test_elementwise_unknown_op_suggests_identity():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.fc2(Cube.apply(self.fc1(x)))

    exc = _suggested(M().eval(), torch.randn(2, 4))
    assert exc.fallback == "identity"
    assert "override('CubeBackward', 'identity')" in str(exc)


def test_neither_identity_nor_route_fits():
    """A product over a dim changes the shape and its gradient does not route relevance."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3))).eval()

    class Prod(nn.Module):
        def forward(self, x):
            return model(x).prod(-1)

    exc = _suggested(Prod().eval(), torch.randn(2, 4))
    assert exc.node_type == "ProdBackward1"
    assert exc.fallback is None
    msg = str(exc)
    assert "Neither" in msg and "'absorb'" in msg and "docs/rules.md" in msg
    assert "'identity')" not in msg  # no override to copy that would give nonsense


class _TwoInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        return a * 2 + b

    @staticmethod
    def backward(ctx, g):
        return 2 * g, g


def test_identity_on_a_node_with_several_explained_inputs_is_an_error():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.out(_TwoInputs.apply(self.fc1(x), self.fc2(x)))

    model, x = M().eval(), torch.randn(2, 4)
    exc = _suggested(model, x)
    assert exc.fallback != "identity"
    rules = RuleSet.preset("epsilon").override("_TwoInputsBackward", "identity")
    with pytest.raises(LRPError, match="_TwoInputsBackward") as info:
        lrpplan.explain(model, x, rules=rules, cache=False)
    assert "'route'" in str(info.value) and "identity" in str(info.value)


@pytest.fixture
def wrong_shape_rule():
    @register_rule
    class _WrongShape(Rule):
        name = "test_wrong_shape"

        def decide(self, info):
            return Decision(values=(), send=(True,) * info.n_inputs)

        def run(self, rel, x, p):
            return [rel[0][:1]] + [None] * (len(p["send"]) - 1)  # one sample: broadcastable

    yield _WrongShape.name
    del RULES[_WrongShape.name]


def test_rule_output_of_the_wrong_shape_is_an_error_at_trace(wrong_shape_rule):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    rules = RuleSet.preset("epsilon").override("TanhBackward0", wrong_shape_rule)
    with pytest.raises(LRPError) as info:
        lrpplan.explain(model, torch.randn(3, 4), rules=rules, cache=False)
    msg = str(info.value)
    assert "TanhBackward0" in msg and wrong_shape_rule in msg and "shape" in msg


def test_identity_on_a_shape_changing_node_is_an_error_at_trace(float64):
    """The old hint (identity) on an adaptive max-pool: relevance 67x off with closes() True."""
    model = float64(_Pooled(nn.AdaptiveMaxPool2d(3), 2).eval())
    x = torch.randn(2, 2, 10, 10, dtype=torch.float64)
    rules = RuleSet.preset("epsilon").override("AdaptiveMaxPool2DBackward0", "identity")
    with pytest.raises(LRPError, match="AdaptiveMaxPool2DBackward0.*identity|identity.*"
                                       "AdaptiveMaxPool2DBackward0"):
        lrpplan.explain(model, x, rules=rules, cache=False)
