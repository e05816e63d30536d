"""Custom ``torch.autograd.Function`` nodes and backward hooks (issue 15).

- a Function gets a rule by its class (``RuleSet.override(F, rule)``,
  ``lrpplan.register_function``), known by its qualified name: two classes with the same
  ``__name__`` neither share a rule nor a plan key;
- a Function without a rule raises ``UnsupportedOperation`` naming its class and module;
- a registered Function's forward replay serves Promise chains (LRP-0 of a bias-free linear
  model through it = gradient × input, float64);
- built-in entries: Bloom's ``GeLUFunction`` (a config-built ``BloomForCausalLM``: trace, replay
  = trace, finite, the ledger closes); a config-built Falcon passes the same checks;
- ``register_full_backward_hook`` / ``register_full_backward_pre_hook`` nodes pass relevance
  through per input: a hooked model gives exactly the hook-free model's relevance (float64), and
  explaining never calls the user's hooks.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpplan
from lrpplan import RuleSet, UnsupportedOperation
from lrpplan.rules.custom import FUNCTIONS

LRP0 = 1e-12


class Double(torch.autograd.Function):
    """2·x: linear, so LRP-0 through it (identity rule) equals gradient × input."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def _same_name_pair():
    """Two different Function classes, both named ``Scale``: ×3 and ×(−1)."""
    def first():
        class Scale(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return 3 * x

            @staticmethod
            def backward(ctx, g):
                return 3 * g
        return Scale

    def second():
        class Scale(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return -x

            @staticmethod
            def backward(ctx, g):
                return -g
        return Scale

    return first(), second()


class _Chain(nn.Module):
    """Linear → f1 → Linear → f2 → Linear, bias-free."""

    def __init__(self, f1, f2) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(4, 6, bias=False), nn.Linear(6, 6, bias=False),
                                  nn.Linear(6, 3, bias=False))
        self.f1, self.f2 = f1, f2

    def forward(self, x):
        return self.c(self.f2.apply(self.b(self.f1.apply(self.a(x)))))


def _gxi(model, x, target):
    x = x.detach().clone().requires_grad_(True)
    score = model(x).gather(-1, torch.as_tensor(target).reshape(-1, 1)).sum()
    (g,) = torch.autograd.grad(score, x)
    return (g * x).detach()


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_function_without_rule_names_its_class_and_module():
    a, b = _same_name_pair()
    model = _Chain(a, b).eval()
    with pytest.raises(UnsupportedOperation) as info:
        lrpplan.explain(model, torch.randn(2, 4), cache=False)
    exc = info.value
    assert exc.node_type == "ScaleBackward"
    # the one next to the output is met first: b, known by its qualified name
    assert exc.function == f"{b.__module__}.{b.__qualname__}" != f"{a.__module__}.{a.__qualname__}"
    msg = str(exc)
    assert "custom autograd Function" in msg and __name__ in msg and "Scale" in msg
    assert "override(Scale" in msg  # by its class


def test_override_by_class_applies_to_that_class_only(float64):
    a, b = _same_name_pair()
    model = float64(_Chain(a, b).eval())
    x = torch.randn(3, 4, dtype=torch.float64)
    only_a = RuleSet.preset("epsilon", epsilon=LRP0).override(a, "identity")
    with pytest.raises(UnsupportedOperation) as info:  # b shares a's name, not its rule
        lrpplan.explain(model, x, rules=only_a, cache=False)
    assert info.value.function == f"{b.__module__}.{b.__qualname__}"
    rules = only_a.override(b, "identity")
    assert set(rules.config()["functions"]) == {f"{a.__module__}.{a.__qualname__}",
                                                f"{b.__module__}.{b.__qualname__}"}
    attr = lrpplan.explain(model, x, rules=rules, cache=False)
    # both are linear: LRP-0 with identity through each is gradient × input
    assert _rel_err(attr.relevance, _gxi(model, x, attr.target)) < 1e-10
    assert attr.ledger.closes()


def test_same_named_classes_do_not_share_a_plan(tmp_path, float64):
    a, b = _same_name_pair()
    rules = (RuleSet.preset("epsilon", epsilon=LRP0).override(a, "identity")
             .override(b, "absorb"))
    x = torch.randn(2, 4, dtype=torch.float64)
    ab = float64(_Chain(a, b).eval())
    ba = float64(_Chain(b, a).eval())
    ba.load_state_dict(ab.state_dict())
    first = lrpplan.explain(ab, x, rules=rules, cache=tmp_path)
    second = lrpplan.explain(ba, x, rules=rules, cache=tmp_path)
    assert first.plan_key != second.plan_key  # the key holds each node's class
    assert not second.cached
    # ab absorbs at its second Function (everything), ba at its first: all relevance absorbed
    # either way, but at different nodes
    absorbed_at = [{r.node for r in res.ledger.rows if r.absorbed} for res in (first, second)]
    assert absorbed_at[0] != absorbed_at[1]


def test_registered_function_forward_serves_promises(float64):
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6, bias=False)
            self.b = nn.Linear(6, 3, bias=False)

        def forward(self, x):
            h = self.a(x)
            return self.b(Double.apply(h) + h)  # the add needs Double's output: saved nowhere

    model = float64(Residual().eval())
    x = torch.randn(3, 4, dtype=torch.float64)
    key = lrpplan.register_function(Double, "identity", forward="apply", replace=True)
    try:
        assert key == f"{__name__}.Double"
        rules = RuleSet.preset("epsilon", epsilon=LRP0)
        attr = lrpplan.explain(model, x, rules=rules, cache=False)
        again = lrpplan.Explainer(model, rules=rules, cache=False, ledger="nodes")
        first, replayed = again(x), again(x)
    finally:
        FUNCTIONS.pop(key)
    assert attr.plan.stats["promises"] >= 1
    assert _rel_err(attr.relevance, _gxi(model, x, attr.target)) < 1e-10
    assert replayed.cached
    assert (replayed.relevance - first.relevance).abs().max() <= 1e-10 * first.relevance.abs().max()
    assert attr.ledger.closes()


def test_register_function_refuses_route_and_unknown_rules():
    with pytest.raises(ValueError):
        lrpplan.register_function(Double, "route")
    with pytest.raises(ValueError):
        lrpplan.register_function(Double, "no-such-rule")
    with pytest.raises(TypeError):
        lrpplan.register_function(nn.Linear, "identity")


# ---------------------------------------------------------------------------------------------
# built-in entries: transformers' custom Functions


def _replay_equals_trace(model, *inputs, rtol):
    explainer = lrpplan.Explainer(model, cache=False, ledger="nodes")
    first = explainer(*inputs)
    again = explainer(*inputs)
    assert not first.cached and again.cached
    assert torch.isfinite(first.relevance).all()
    scale = first.relevance.abs().max().clamp(min=1e-30)
    assert (again.relevance - first.relevance).abs().max() <= rtol * scale
    assert first.ledger.closes(), first.ledger.leaks()
    return first


@pytest.mark.zoo
def test_bloom_gelu_function():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    model = transformers.BloomForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    attr = _replay_equals_trace(model, ids, rtol=1e-5)
    assert attr.relevance.shape == ids.shape
    cov = lrpplan.coverage(model, ids)
    assert cov.covered_nodes == cov.nodes
    assert any(r.node_type == "GeLUFunctionBackward" and r.rule == "identity" for r in cov.rows)


@pytest.mark.zoo
def test_falcon():
    """Falcon replays slices with negative ends (read back signed)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4)
    model = transformers.FalconForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    _replay_equals_trace(model, ids, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# backward hooks


class _TwoIn(nn.Module):
    """A module with two tensor inputs: its hook node wraps both (relevance passes per input)."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Linear(6, 6, bias=False)
        self.q = nn.Linear(6, 6, bias=False)

    def forward(self, u, v):
        return torch.relu(self.p(u)) + self.q(v)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 16, 6)
        self.two = _TwoIn()
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        h = self.fc(h)
        return self.out(self.two(h, torch.tanh(h)))


def _hooked(model: _Net, calls: list) -> _Net:
    """A copy of ``model`` with full backward (pre-)hooks that would change any gradient."""
    hooked = _Net().to(next(model.parameters()).dtype)
    hooked.load_state_dict(model.state_dict())
    hooked.eval()
    hooked.conv.register_full_backward_hook(
        lambda mod, gin, gout: (calls.append("conv"), tuple(None if g is None else 0 * g
                                                             for g in gin))[1])
    hooked.two.register_full_backward_pre_hook(
        lambda mod, gout: (calls.append("two-pre"), tuple(7 * g for g in gout))[1])
    hooked.two.register_full_backward_hook(
        lambda mod, gin, gout: (calls.append("two"), tuple(None if g is None else -g
                                                           for g in gin))[1])
    hooked.register_full_backward_hook(lambda mod, gin, gout: calls.append("net"))
    return hooked


@pytest.mark.parametrize("preset", ["epsilon", "epsilon-plus", "epsilon-gamma-box"])
def test_backward_hooks_change_nothing(preset, float64):
    torch.manual_seed(0)
    model = float64(_Net().eval())
    calls: list = []
    hooked = _hooked(model, calls)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    kwargs = {"low": -3.0, "high": 3.0} if preset == "epsilon-gamma-box" else {}
    rules = RuleSet.preset(preset, **kwargs)
    ref = lrpplan.explain(model, x, rules=rules, cache=False)
    explainer = lrpplan.Explainer(hooked, rules=rules, cache=False, ledger="nodes")
    got, again = explainer(x), explainer(x)
    assert calls == []  # explaining never calls the user's hooks
    hook_steps = [s for s in got.plan.iter_rule_steps()
                  if s.params["node_type"] == "BackwardHookFunctionBackward"]
    assert hook_steps and all(s.rule == "passthrough" for s in hook_steps)
    assert any(len(s.rel_out) == 2 for s in hook_steps)  # the two-input module's hook node
    assert torch.equal(got.target, ref.target)
    assert (got.relevance - ref.relevance).abs().max() <= 1e-12 * ref.relevance.abs().max()
    assert again.cached and (again.relevance - got.relevance).abs().max() <= \
        1e-10 * got.relevance.abs().max()
    assert got.ledger.closes()
    # the hooks still work for the user's own backward afterwards
    xi = x.clone().requires_grad_(True)
    hooked(xi).sum().backward()
    assert {"conv", "two-pre", "two", "net"} <= set(calls)
