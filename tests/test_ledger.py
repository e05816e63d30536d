"""The conservation ledger is a check that can fail (DESIGN invariants 2 and 8).

Each rule reports what its node absorbs from its own terms; the ledger compares that with the
node's inflow − outflow. Deliberately wrong fallbacks that create or destroy relevance leak and
``closes()`` is False; correct models close with no leak, and a single linear layer's reported
absorption equals the closed form Σ_j (b_j + ε·sign(z_j))·R_j / stab(z_j) in float64.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpplan
from lrpplan import RuleSet
from lrpplan.errors import LRPError
from lrpplan.rules.base import RULES, Decision, Rule, register_rule


def _scaling_rule(name: str, factor: float):
    """A test-only fallback that claims to conserve but multiplies relevance by ``factor``."""

    class _Scale(Rule):
        def decide(self, info):
            return Decision(values=(), send=tuple(i == 0 for i in range(info.n_inputs)))

        def run(self, rel, x, p):
            return [rel[0] * factor] + [None] * (len(p["send"]) - 1)

    _Scale.name = name
    register_rule(_Scale)
    return name


@pytest.fixture
def wrong_rules():
    names = [_scaling_rule("test_times36", 36.0), _scaling_rule("test_half", 0.5)]
    yield names
    for name in names:
        del RULES[name]


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("rule, factor", [("test_times36", 36.0), ("test_half", 0.5)])
def test_a_fallback_that_creates_or_destroys_relevance_leaks(wrong_rules, rule, factor):
    model, x = _mlp(), torch.randn(4, 6)
    rules = RuleSet.preset("epsilon").override("TanhBackward0", rule)
    attr = lrpplan.explain(model, x, rules=rules, cache=False)
    led = attr.ledger
    leaks = led.leaks()
    assert [r.node_type for r in leaks] == ["TanhBackward0"]
    (row,) = leaks
    assert row.absorbed == 0.0  # the rule claims to conserve
    assert row.outflow == pytest.approx(factor * row.inflow, rel=1e-5)
    assert row.residual == pytest.approx((1 - factor) * row.inflow, rel=1e-5)
    assert not led.closes()
    assert "leaks=1" in repr(led) and "TanhBackward0" in repr(led)

    # the same through a replayed plan: its totals do not close, and with the per-node detail
    # (ledger="nodes") the node is named again
    explainer = lrpplan.Explainer(model, rules=rules, cache=False)
    explainer(x)
    again = explainer(x)
    assert again.cached and not again.ledger.detail
    assert not again.ledger.closes()
    with pytest.raises(LRPError, match="ledger='nodes'"):
        again.ledger.leaks()
    detailed = lrpplan.Explainer(model, rules=rules, cache=False, ledger="nodes")
    detailed(x)
    again = detailed(x)
    assert again.cached and again.ledger.detail
    assert [r.node_type for r in again.ledger.leaks()] == ["TanhBackward0"]
    assert not again.ledger.closes()


def test_absorb_fallback_books_its_whole_inflow():
    model, x = _mlp(), torch.randn(4, 6)
    rules = RuleSet.preset("epsilon").override("ReluBackward0", "absorb")
    led = lrpplan.explain(model, x, rules=rules, cache=False).ledger
    (row,) = [r for r in led.rows if r.node_type == "ReluBackward0"]
    assert row.outflow == 0.0 and row.absorbed == pytest.approx(row.inflow, rel=1e-6)
    assert led.at_inputs == 0.0
    assert led.closes() and not led.leaks()


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = nn.functional.max_pool2d(h, 2)
        h = torch.relu(self.bn2(self.conv2(nn.functional.pad(h, (1, 1, 1, 1)))))
        return self.fc(h.flatten(1))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU(),
                                                  nn.Linear(8, 8)) for _ in range(3))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h.mean(0, keepdim=True).expand_as(h) * 0.1 + h)


def _with_stats(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)
    return model


@pytest.mark.parametrize("preset", ["epsilon", "epsilon-plus", "epsilon-gamma",
                                    "epsilon-alpha2-beta1", "epsilon-plus-flat", "zplus"])
@pytest.mark.parametrize("make, shape", [(_mlp, (4, 6)), (_CNN, (2, 3, 8, 8)),
                                         (_Residual, (4, 5))], ids=["mlp", "cnn-bn", "residual"])
def test_correct_models_have_no_leak(make, shape, preset, float64):
    model = float64(_with_stats(make()).eval())
    x = torch.randn(shape, dtype=torch.float64)
    led = lrpplan.explain(model, x, rules=RuleSet.preset(preset, epsilon=0.05), cache=False).ledger
    assert led.leaks(rtol=1e-9, atol=1e-12) == [], led.leaks(rtol=1e-9, atol=1e-12)
    assert led.closes(rtol=1e-9, atol=1e-12), led
    assert abs(led.absorbed) > 1e-6  # biases and ε do absorb, and the books say so


def test_linear_layer_absorption_equals_the_closed_form(float64):
    eps = 0.1
    layer = float64(nn.Linear(5, 3))
    x = torch.randn(4, 5, dtype=torch.float64)
    attr = lrpplan.explain(layer, x, rules=RuleSet.preset("epsilon", epsilon=eps), cache=False)
    (row,) = [r for r in attr.ledger.rows if r.node_type == "AddmmBackward0"]

    with torch.no_grad():
        z = x @ layer.weight.T + layer.bias
        r = torch.zeros_like(z)
        idx = torch.arange(4)
        r[idx, attr.target] = z[idx, attr.target]
        sign = torch.where(z >= 0, 1.0, -1.0).double()
        s = r / (z + eps * sign)
        bias_share = (layer.bias * s).sum().item()
        eps_share = (eps * sign * s).sum().item()
    assert row.absorbed == pytest.approx(bias_share + eps_share, rel=1e-12, abs=1e-15)
    assert abs(eps_share) > 1e-3 and abs(bias_share) > 1e-3
    assert row.inflow == pytest.approx(r.sum().item(), rel=1e-12)
    assert row.residual == pytest.approx(0.0, abs=1e-12)
    assert attr.ledger.closes(rtol=1e-12, atol=1e-14)


def test_relevance_on_an_edge_that_leads_nowhere_is_booked(float64):
    fc = float64(nn.Linear(4, 3))
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    other = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out, unrelated = fc(x), (other * 2).sum(1)
    attr = lrpplan.attribute([out, unrelated], x, cache=False)
    led = attr.ledger
    assert led.start == pytest.approx(out.sum().item() + unrelated.sum().item(), rel=1e-12)
    assert led.closes(rtol=1e-9, atol=1e-12), led
    assert not led.leaks(rtol=1e-9, atol=1e-12)


def test_a_constant_concatenated_absorbs_its_share(float64):
    """A class token (a parameter, not explained) concatenated to the input: the route rule
    books the relevance routed to it as absorbed."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cls = nn.Parameter(torch.randn(1, 1, 4))
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
            return self.fc(torch.tanh(h).sum(1))

    model = float64(M().eval())
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    led = lrpplan.explain(model, x, cache=False).ledger
    (row,) = [r for r in led.rows if r.node_type == "CatBackward0"]
    assert abs(row.absorbed) > 1e-6 and row.residual == pytest.approx(0.0, abs=1e-12)
    assert led.closes(rtol=1e-9, atol=1e-12)
