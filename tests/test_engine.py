"""End-to-end tests of the engine on the model zoo (tests/models.py).

References are independent of lrpplan: closed-form ε-LRP written out by hand, gradient × input
(LRP-0 equals it on bias-free piecewise-linear networks), linearity in the seed, a separately cut
model, per-sample runs.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import lrpplan
from lrpplan import (GraphFreedError, InvalidInputError, NonFiniteError, RuleSet,
                     UnsupportedOperation)
from tests.models import (BATCH_COUPLED, BIAS_FREE, Cube, ENGINE_BUGS, MODELS, MLPMean, MLPSum,
                          ResBlockNet, deep_chain, resnet_block_bias_free,
                          weight_sharing_bias_free)

TINY = RuleSet.preset("epsilon", epsilon=1e-12)


def params(registry, exclude=()):
    """One pytest param per model; known engine bugs are strict xfails."""
    out = []
    for name in registry:
        if name in exclude:
            continue
        marks = [pytest.mark.xfail(strict=True, reason=ENGINE_BUGS[name])] \
            if name in ENGINE_BUGS else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def as_tuple(rel):
    return rel if isinstance(rel, tuple) else (rel,)


def expected_shape(x: torch.Tensor) -> torch.Size:
    return x.shape  # float inputs: elementwise; token ids: one relevance per token


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def grad_times_input(model, x: torch.Tensor, target) -> torch.Tensor:
    """x ⊙ ∂score/∂x for the score explain() selects (independent reference)."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    if out.dim() == 0:
        score = out
    else:
        idx = out.detach().argmax(-1) if target is None else torch.as_tensor(target)
        score = out.gather(-1, idx.reshape(-1, 1)).sum()
    (g,) = torch.autograd.grad(score, x)
    return (x * g).detach()


# ---------------------------------------------------------------------------------------------
# every model


@pytest.mark.parametrize("name", params(MODELS))
def test_explain_works_and_ledger_closes(name):
    model, inputs = MODELS[name]()
    attr = lrpplan.explain(model, *inputs, cache=False)
    rel = as_tuple(attr.relevance)
    assert len(rel) == len(inputs)
    for r, x in zip(rel, inputs):
        assert r is not None
        assert r.shape == expected_shape(x)
        assert torch.isfinite(r).all()
        assert r.dtype == torch.float32
    assert attr.ledger.closes(), attr.ledger
    assert attr.cached is False
    assert math.isclose(attr.ledger.start, float(attr.output.double().sum()), rel_tol=1e-6)
    # some relevance reaches the inputs (no model in the zoo absorbs everything)
    assert sum(r.abs().sum().item() for r in rel) > 0


@pytest.mark.parametrize("name", params(BIAS_FREE))
def test_bias_free_models_conserve(name, float64):
    model, inputs = BIAS_FREE[name]()
    model, inputs = float64(model), float64(inputs)
    attr = lrpplan.explain(model, *inputs, rules=TINY, cache=False)
    ledger = attr.ledger
    assert ledger.closes(rtol=1e-9, atol=1e-12), ledger
    assert abs(ledger.start) > 1e-6
    frac = ledger.at_inputs / ledger.start
    assert 0.999 <= frac <= 1.001, ledger
    # the relevance itself sums to the explained score (not only the ledger's copy of it)
    total = sum(r.sum().item() for r in as_tuple(attr.relevance))
    assert total == pytest.approx(ledger.start, rel=1e-3)


@pytest.mark.parametrize("name", params(MODELS, exclude=BATCH_COUPLED))
def test_batch_consistency(name, float64):
    model, inputs = MODELS[name](batch=3)
    model, inputs = float64(model), float64(inputs)
    targets = [0, 2, 1]
    batched = as_tuple(lrpplan.explain(model, *inputs, target=targets, cache=False).relevance)
    for i in range(3):
        alone = lrpplan.explain(model, *(x[i:i + 1] for x in inputs), target=targets[i],
                                cache=False)
        for rb, ra in zip(batched, as_tuple(alone.relevance)):
            assert ra.dtype == torch.float64
            torch.testing.assert_close(rb[i:i + 1], ra, rtol=1e-10, atol=1e-10 * ra.abs().max())


def _hooks_empty(model: nn.Module) -> None:
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs"):
            hooks = getattr(m, attr, None)
            assert not hooks, f"{name or 'model'}.{attr} = {hooks}"
    for p in model.parameters():
        assert not getattr(p, "_backward_hooks", None)
    mod = torch.nn.modules.module
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        assert not getattr(mod, attr, None), attr


@pytest.mark.parametrize("name", params(MODELS))
def test_model_and_inputs_untouched(name):
    model, inputs = MODELS[name]()
    state = copy.deepcopy(model.state_dict())
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    # one caller tensor that requires grad, to check its .grad stays None
    inputs = tuple(x.requires_grad_(True) if x.is_floating_point() else x for x in inputs)
    before = [x.detach().clone() for x in inputs]
    lrpplan.explain(model, *inputs, cache=False)
    for x, b in zip(inputs, before):
        assert torch.equal(x.detach(), b)
        assert x.grad is None
        assert x.requires_grad == x.is_floating_point()
        assert x.grad_fn is None
    after = model.state_dict()
    assert state.keys() == after.keys()
    for k in state:
        assert torch.equal(state[k], after[k]), k
    for n, p in model.named_parameters():
        assert p.grad is None, n
        assert p.requires_grad == req[n]
    assert not model.training
    _hooks_empty(model)


# ---------------------------------------------------------------------------------------------
# independent value references


def test_epsilon_rule_matches_closed_form_on_two_layer_mlp(float64):
    """R_x = x ⊙ W1ᵀ[(h ⊙ W2ᵀ[R_z / stab(z)]) / stab(z1)] with biases and a sizeable ε."""
    eps = 0.05
    model = float64(nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4)).eval())
    x = torch.randn(3, 5, dtype=torch.float64)
    attr = lrpplan.explain(model, x, rules=RuleSet.preset("epsilon", epsilon=eps), cache=False)

    def stab(z):
        return z + eps * torch.where(z >= 0, 1.0, -1.0).double()

    w1, b1 = model[0].weight.detach(), model[0].bias.detach()
    w2, b2 = model[2].weight.detach(), model[2].bias.detach()
    z1 = x @ w1.T + b1
    h = z1.clamp(min=0)
    z2 = h @ w2.T + b2
    t = z2.argmax(-1)
    r2 = torch.zeros_like(z2)
    r2[torch.arange(3), t] = z2[torch.arange(3), t]
    r_h = h * ((r2 / stab(z2)) @ w2)
    r_x = x * ((r_h / stab(z1)) @ w1)
    torch.testing.assert_close(attr.relevance, r_x, rtol=1e-12, atol=1e-14)
    assert torch.equal(attr.target, t)


@pytest.mark.parametrize("factory", [MLPSum, MLPMean], ids=["sum", "mean"])
def test_full_reduction_output_lrp0_equals_grad_times_input(factory, float64):
    """attribute() on a 0-d output (full .sum()/.mean()): bias-free ReLU net -> LRP-0 = x ⊙ ∇."""
    torch.manual_seed(3)
    model = float64(factory(bias=False).eval())
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    out = model(x)
    assert out.dim() == 0
    attr = lrpplan.attribute(out, x, rules=TINY, cache=False)
    (g,) = torch.autograd.grad(model(x), x)
    torch.testing.assert_close(attr.relevance, (x * g).detach(), rtol=1e-6, atol=1e-12)
    assert attr.ledger.at_inputs == pytest.approx(out.item(), rel=1e-9)


def _bn_zero_mean_unit_var(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
                m.bias.zero_()
    return model


def test_lrp0_equals_grad_times_input_on_bias_free_resnet_block(float64):
    model, (x,) = resnet_block_bias_free(batch=3)
    model = float64(_bn_zero_mean_unit_var(model))
    x = float64(x)
    attr = lrpplan.explain(model, x, rules=TINY, cache=False)
    ref = grad_times_input(model, x, attr.target)
    assert max_rel_err(attr.relevance, ref) <= 1e-6
    assert attr.ledger.at_inputs == pytest.approx(attr.ledger.start, rel=1e-6)


def test_weight_sharing(float64):
    """A Linear used twice: LRP-0 on the bias-free ReLU net equals gradient × input."""
    model, (x,) = weight_sharing_bias_free(batch=4)
    model, x = float64(model), float64(x)
    # the shared module really is called twice: its weight's AccumulateGrad has two consumers
    out = model(x.clone().requires_grad_(True))
    attr = lrpplan.attribute(out.sum(), model.shared.weight, cache=False)
    assert attr.relevance.shape == model.shared.weight.shape
    uses = 0
    for row in attr.ledger.rows:
        uses += row.node_type == "TBackward0"
    assert uses == 2

    attr = lrpplan.explain(model, x, rules=TINY, cache=False)
    ref = grad_times_input(model, x, attr.target)
    assert max_rel_err(attr.relevance, ref) <= 1e-6
    assert attr.ledger.closes()


def test_two_thousand_layer_chain(float64):
    """No recursion limit: 2,000 x (Linear(4, 4) + tanh), checked against a loop reference."""
    model, (x,) = deep_chain(batch=2)
    attr = lrpplan.explain(model, x, cache=False)
    assert torch.isfinite(attr.relevance).all()
    assert attr.ledger.closes()
    assert attr.ledger.at_inputs / attr.ledger.start >= 0.99
    assert attr.plan.stats["nodes"] > 4 * 2000

    # float64 ε-LRP reference written as a loop (tanh: identity; linear: ε-rule, zero bias)
    model, x = float64(model), float64(x)
    eps = 1e-9
    attr = lrpplan.explain(model, x, rules=RuleSet.preset("epsilon", epsilon=eps), cache=False)
    acts = [x]
    zs = []
    with torch.no_grad():
        a = x
        for layer in model.layers:
            z = layer(a)
            zs.append(z)
            a = torch.tanh(z)
            acts.append(a)
        t = a.argmax(-1)
        r = torch.zeros_like(a)
        r[torch.arange(len(t)), t] = a[torch.arange(len(t)), t]
        for layer, z, a_in in zip(reversed(model.layers), reversed(zs), reversed(acts[:-1])):
            r = a_in * ((r / (z + eps * torch.where(z >= 0, 1.0, -1.0).double())) @ layer.weight)
    torch.testing.assert_close(attr.relevance, r, rtol=1e-9, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# graphs the user built: attribute() on outputs and intermediates


def test_backward_still_works_after_attribute():
    model, (x,) = MODELS["resnet_block"](batch=2)
    x = x.requires_grad_(True)
    out = model(x)
    attr = lrpplan.attribute(out, x, cache=False)
    assert attr.relevance.shape == x.shape
    assert x.grad is None and all(p.grad is None for p in model.parameters())
    out.sum().backward()  # the user's own graph is intact
    # reference gradients from an independent forward pass
    x2 = x.detach().clone().requires_grad_(True)
    ref = torch.autograd.grad(model(x2).sum(), [x2, *model.parameters()])
    torch.testing.assert_close(x.grad, ref[0])
    for p, g in zip(model.parameters(), ref[1:]):
        torch.testing.assert_close(p.grad, g)


def test_backward_still_works_after_attribute_on_attention():
    model, (x,) = MODELS["sdpa_attention_causal"](batch=2)
    x = x.requires_grad_(True)
    out = model(x)
    lrpplan.attribute(out[:, -1].max(-1).values, x, cache=False)
    out[:, -1].sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x2)[:, -1].sum(), x2)
    torch.testing.assert_close(x.grad, g)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = self.trunk(x)
        return self.a(h), self.b(h)


def test_several_outputs_at_once_is_the_sum_of_single_outputs(float64):
    """LRP is linear in the seed: explaining (o1, o2) together = explaining each and adding."""
    model = float64(TwoHeads().eval())
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    o1, o2 = model(x)
    both = lrpplan.attribute([o1, o2], x, cache=False)
    one = lrpplan.attribute(o1, x, cache=False)
    two = lrpplan.attribute(o2, x, cache=False)
    torch.testing.assert_close(both.relevance, one.relevance + two.relevance, rtol=1e-10,
                               atol=1e-12)
    assert both.ledger.start == pytest.approx(o1.sum().item() + o2.sum().item(), rel=1e-12)
    assert both.ledger.closes()
    # explicit seeds: a one-hot seed on o1 and zeros on o2 equal explaining o1[:, 0] alone
    s1 = torch.zeros_like(o1)
    s1[:, 0] = o1[:, 0].detach()
    seeded = lrpplan.attribute([o1, o2], x, seed=[s1, torch.zeros_like(o2)], cache=False)
    single = lrpplan.attribute(o1[:, 0], x, cache=False)
    torch.testing.assert_close(seeded.relevance, single.relevance, rtol=1e-10, atol=1e-12)


def _resnet_tail(model: ResBlockNet, h: torch.Tensor) -> torch.Tensor:
    """ResBlockNet.forward after the stem (+ReLU), written out separately."""
    out = model.relu(model.bn1(model.conv1(h)))
    out = model.bn2(model.conv2(out))
    out = out + h
    out = torch.relu(out)
    return model.fc(torch.flatten(model.pool(out), 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_intermediate_tensor_as_input_equals_cut_model(dtype):
    """Relevance at a hidden activation (feeding a residual block through two paths) equals the
    relevance a separately built model starting at that activation gives."""
    model, (x,) = MODELS["resnet_block"](batch=2)
    model, x = model.to(dtype), x.to(dtype)
    h = torch.relu(model.stem(x.requires_grad_(True)))
    out = model.fc(torch.flatten(model.pool(torch.relu(
        model.bn2(model.conv2(model.relu(model.bn1(model.conv1(h))))) + h)), 1))
    attr = lrpplan.attribute(out, h, cache=False)
    assert attr.relevance.shape == h.shape

    h_leaf = h.detach().clone().requires_grad_(True)
    cut = lrpplan.attribute(_resnet_tail(model, h_leaf), h_leaf, cache=False)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert max_rel_err(attr.relevance, cut.relevance) <= tol
    # and the intermediate can be explained together with the leaf it came from
    both = lrpplan.attribute(out, [x, h], cache=False)
    assert isinstance(both.relevance, tuple) and both.relevance[1].shape == h.shape


def test_hidden_cnn_features_as_input_equal_cut_model():
    """A hidden activation of the VGG-style CNN (after the conv features) as the input."""
    model, (x,) = MODELS["vgg_cnn"](batch=2)
    feats = model.features(x.requires_grad_(True))
    out = model.classifier(feats)
    attr = lrpplan.attribute(out, feats, cache=False)
    leaf = feats.detach().clone().requires_grad_(True)
    cut = lrpplan.attribute(model.classifier(leaf), leaf, cache=False)
    assert max_rel_err(attr.relevance, cut.relevance) <= 1e-6


# ---------------------------------------------------------------------------------------------
# clear errors


def _mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def test_error_output_without_grad_fn():
    x = torch.randn(2, 4, requires_grad=True)
    with torch.no_grad():
        out = _mlp()(x)
    with pytest.raises(InvalidInputError, match="grad_fn"):
        lrpplan.attribute(out, x, cache=False)


def test_error_input_not_in_graph():
    model = _mlp()
    x = torch.randn(2, 4, requires_grad=True)
    out = model(x)
    other = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(InvalidInputError, match="not part of"):
        lrpplan.attribute(out, other, cache=False)
    with pytest.raises(InvalidInputError):
        lrpplan.attribute(out, torch.randn(2, 4), cache=False)  # no grad at all
    with pytest.raises(InvalidInputError):
        lrpplan.attribute(out, x.detach(), cache=False)


@pytest.mark.parametrize("target", [3, -4, [0, 3], [0, 1, 2]], ids=str)
def test_error_target_out_of_range(target):
    with pytest.raises(InvalidInputError):
        lrpplan.explain(_mlp(), torch.randn(2, 4), target=target, cache=False)


def test_error_graph_freed_by_backward():
    model = _mlp()
    x = torch.randn(2, 4, requires_grad=True)
    out = model(x)
    out.sum().backward()
    with pytest.raises(GraphFreedError, match="retain_graph"):
        lrpplan.attribute(out, x, cache=False)
    # retain_graph=True keeps it explainable
    out = model(x)
    out.sum().backward(retain_graph=True)
    assert torch.isfinite(lrpplan.attribute(out, x, cache=False).relevance).all()


class _NaNOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.log(self.fc(x) - 100.0)  # log of a negative number: NaN


def test_error_nan_output():
    with pytest.raises(NonFiniteError):
        lrpplan.explain(_NaNOut().eval(), torch.randn(2, 4), cache=False)
    x = torch.randn(2, 4, requires_grad=True)
    out = _mlp()(x) * float("inf")
    with pytest.raises(NonFiniteError):
        lrpplan.attribute(out, x, cache=False)


class _IgnoresInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(1, 4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.p.expand(x.shape[0], 4))


class _OneHot(nn.Module):
    """Integer input used without an embedding: relevance cannot reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, ids):
        return self.fc(F.one_hot(ids, 5).to(self.fc.weight.dtype)).sum(1)


def test_error_no_input_can_receive_relevance():
    with pytest.raises(InvalidInputError):
        lrpplan.explain(_IgnoresInput().eval(), torch.randn(2, 4), cache=False)
    with pytest.raises(InvalidInputError, match="no input can receive relevance"):
        lrpplan.explain(_OneHot().eval(), torch.randint(0, 5, (2, 3)), cache=False)


class _CustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(Cube.apply(self.fc1(x)))


def test_unknown_custom_function_raises_then_declared_fallback_works(float64):
    model = _CustomOp().eval()
    x = torch.randn(2, 4)
    with pytest.raises(UnsupportedOperation) as info:
        lrpplan.explain(model, x, cache=False)
    assert "CubeBackward" in str(info.value)
    assert info.value.node_type == "CubeBackward"
    assert "override" in str(info.value)

    rules = lrpplan.RuleSet.preset("epsilon").override("CubeBackward", "identity")
    attr = lrpplan.explain(model, x, rules=rules, cache=False)
    assert attr.relevance.shape == x.shape and torch.isfinite(attr.relevance).all()
    assert attr.ledger.closes()

    # identity through the cube: same as the ε-rule chain written out by hand
    model, x = float64(model), float64(x)
    eps = 1e-6
    attr = lrpplan.explain(model, x, rules=RuleSet.preset("epsilon", epsilon=eps)
                           .override("CubeBackward", "identity"), cache=False)

    def stab(z):
        return z + eps * torch.where(z >= 0, 1.0, -1.0).double()

    with torch.no_grad():
        z1 = model.fc1(x)
        h = z1 ** 3
        z2 = model.fc2(h)
        t = z2.argmax(-1)
        r2 = torch.zeros_like(z2)
        r2[torch.arange(2), t] = z2[torch.arange(2), t]
        r_h = h * ((r2 / stab(z2)) @ model.fc2.weight)
        r_x = x * ((r_h / stab(z1)) @ model.fc1.weight)
    torch.testing.assert_close(attr.relevance, r_x, rtol=1e-10, atol=1e-14)
