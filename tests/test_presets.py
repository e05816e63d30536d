"""Rule presets, first-layer rules, per-module rules and CP-LRP, against closed forms."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrpplan

DT = torch.float64
EPS = 1e-6


def _stab(z, eps=EPS):
    return torch.where(z >= 0, z + eps, z - eps)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).to(DT).eval()


def _variants(attr):
    return [(s.params["node_type"], s.params.get("variant")) for s in attr.plan.iter_rule_steps()
            if s.params["node_type"] in ("ConvolutionBackward0", "AddmmBackward0")]


@pytest.mark.parametrize("preset,first,conv,dense", [
    ("epsilon-gamma-box", "zbox", "gamma", "epsilon"),
    ("epsilon-plus-flat", "flat", "zplus", "epsilon"),
    ("epsilon-plus", "zplus", "zplus", "epsilon"),
])
def test_first_layer_choice(preset, first, conv, dense):
    params = {"low": -3.0, "high": 3.0} if preset == "epsilon-gamma-box" else {}
    attr = lrpplan.explain(_cnn(), torch.randn(2, 3, 5, 5, dtype=DT),
                           rules=lrpplan.RuleSet.preset(preset, **params), cache=False)
    # plan order: dense first (closest to the output), then conv2, then the first conv
    assert _variants(attr) == [("AddmmBackward0", dense), ("ConvolutionBackward0", conv),
                               ("ConvolutionBackward0", first)]


def test_zbox_needs_bounds():
    with pytest.raises(TypeError, match="low, high"):
        lrpplan.RuleSet.preset("epsilon-gamma-box")


def test_per_channel_zbox_bounds_match_closed_form():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3).to(DT)
    x = torch.randn(1, 2, 4, 4, dtype=DT, requires_grad=True)
    low, high = [-1.0, -2.0], [1.0, 2.0]
    rules = lrpplan.RuleSet.preset("epsilon-gamma-box", low=torch.tensor(low), high=high)
    y = conv(x)
    r = torch.randn_like(y)
    got = lrpplan.attribute(y, x, seed=r, rules=rules, cache=False).relevance
    lo = torch.tensor(low, dtype=DT).view(1, 2, 1, 1).expand_as(x)
    hi = torch.tensor(high, dtype=DT).view(1, 2, 1, 1).expand_as(x)
    w, b = conv.weight.detach(), conv.bias.detach()
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    z = F.conv2d(x.detach(), w, b) - F.conv2d(lo, wp, b.clamp(min=0)) \
        - F.conv2d(hi, wn, b.clamp(max=0))
    s = r / _stab(z)
    xd = x.detach()
    g = lambda weight: torch.nn.grad.conv2d_input(x.shape, weight, s)  # noqa: E731
    want = xd * g(w) - lo * g(wp) - hi * g(wn)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_module_rules_follow_module_paths_and_leave_no_hooks():
    model = _cnn()
    x = torch.randn(2, 3, 5, 5, dtype=DT)
    rules = lrpplan.RuleSet.preset("epsilon").module("2", variant="zplus")
    attr = lrpplan.explain(model, x, rules=rules, cache=False)
    assert _variants(attr) == [("AddmmBackward0", "epsilon"), ("ConvolutionBackward0", "zplus"),
                               ("ConvolutionBackward0", "epsilon")]
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    # the same choice through node types: z+ on every conv except the first
    ref = lrpplan.explain(model, x, rules=lrpplan.RuleSet(
        "ref", type_params={"ConvolutionBackward0": {"variant": "zplus"}},
        first_params={"ConvolutionBackward0": {"variant": "epsilon"}}), cache=False)
    torch.testing.assert_close(attr.relevance, ref.relevance, rtol=1e-12, atol=1e-14)
    # different module rules, different plan key
    other = lrpplan.explain(model, x, rules=lrpplan.RuleSet.preset("epsilon").module(
        "0", variant="zplus"), cache=False)
    assert other.plan_key != attr.plan_key


class _Attention(nn.Module):
    """x -> q, k, v -> softmax(q kᵀ/√d) v, explicit or through SDPA."""

    def __init__(self, d=4, sdpa=False):
        super().__init__()
        torch.manual_seed(2)
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.sdpa = sdpa

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v)
        s = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        return s @ v


@pytest.mark.parametrize("sdpa", [False, True])
def test_cp_lrp_sends_relevance_through_values_only(sdpa):
    model = _Attention(sdpa=sdpa).to(DT)
    x = torch.randn(2, 5, 4, dtype=DT, requires_grad=True)
    out = model(x)
    r = torch.randn_like(out)
    got = lrpplan.attribute(out, x, seed=r, rules="cp-lrp", cache=False).relevance
    # closed form: attention weights constant; o = s v, v = x Wvᵀ
    xd = x.detach()
    q, k = xd @ model.q.weight.T.detach(), xd @ model.k.weight.T.detach()
    s = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)
    v = xd @ model.v.weight.T.detach()
    o = s @ v
    r_v = v * (s.transpose(-1, -2) @ (r / _stab(o)))
    want = xd * ((r_v / _stab(v)) @ model.v.weight.detach())
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sdpa", [False, True])
def test_attnlrp_preset_equals_the_default_rules(sdpa):
    model = _Attention(sdpa=sdpa).to(DT)
    x = torch.randn(2, 5, 4, dtype=DT)
    a = lrpplan.explain(model, x, target=lambda o: o.sum((1, 2)), rules="attnlrp", cache=False)
    b = lrpplan.explain(model, x, target=lambda o: o.sum((1, 2)), rules="epsilon", cache=False)
    torch.testing.assert_close(a.relevance, b.relevance, rtol=0, atol=0)
    assert a.plan_key != b.plan_key  # the rule configuration is part of the key


def _conv_bn_and_folded():
    """conv → BatchNorm (eval) and the same map with the BatchNorm folded into the conv."""
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1).to(DT)
    bn = nn.BatchNorm2d(4).to(DT).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.5, 1.5)  # negative scales flip which weights count as positive
        bn.bias.uniform_(-0.2, 0.2)
    a = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    folded = nn.Conv2d(3, 4, 3, padding=1).to(DT)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * a.view(-1, 1, 1, 1))
        folded.bias.copy_((conv.bias - bn.running_mean) * a + bn.bias)
    return nn.Sequential(conv, bn, nn.ReLU()).eval(), nn.Sequential(folded, nn.ReLU()).eval()


def test_conv_batchnorm_epsilon_equals_the_folded_conv_but_gamma_does_not():
    """Documented difference from Zennit (which merges BatchNorm into the conv first): lrpplan
    applies the conv's rule to the conv alone and the ε-rule to the BatchNorm's affine map.

    For ε (LRP-0 in the limit) that composition equals the rule on the folded conv; for γ it
    does not, because γ favours positive weights and the BatchNorm scale changes their sign and
    size. The preset parameters and this test make the difference visible."""
    unfolded, folded = _conv_bn_and_folded()
    x = torch.randn(2, 3, 5, 5, dtype=DT)
    target = lambda o: o.sum((1, 2, 3))  # noqa: E731
    eps = lrpplan.RuleSet.preset("epsilon", epsilon=1e-12)
    r_u = lrpplan.explain(unfolded, x, target=target, rules=eps, cache=False).relevance
    r_f = lrpplan.explain(folded, x, target=target, rules=eps, cache=False).relevance
    torch.testing.assert_close(r_u, r_f, rtol=1e-7, atol=1e-9)
    gamma = lrpplan.RuleSet.preset("epsilon-gamma", epsilon=1e-12)
    g_u = lrpplan.explain(unfolded, x, target=target, rules=gamma, cache=False).relevance
    g_f = lrpplan.explain(folded, x, target=target, rules=gamma, cache=False).relevance
    assert (g_u - g_f).abs().max() > 1e-3 * g_f.abs().max()
