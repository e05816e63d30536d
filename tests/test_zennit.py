"""lrpplan against Zennit (module-hook LRP), the independent reference implementation.

Every comparison runs in float64 on ``model.eval()`` with fixed seeds. Zennit is seeded through
``attr_output = onehot(target) * output``, lrpplan with the same tensor as ``seed=`` (or through
:func:`lrpplan.explain`, which seeds with the selected logit); the input relevance must agree to
``max |a - b| / max |b| <= 1e-4``. Stabiliser parameters are always passed to both explicitly.

Known formula differences (lrpplan vs ``zennit/rules.py``, Zennit 0.5.1) are ``xfail(strict=True)``
with the difference spelled out in the reason.
"""
from __future__ import annotations

import copy

import pytest

zennit = pytest.importorskip("zennit")
torchvision = pytest.importorskip("torchvision")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from zennit import rules as zrules  # noqa: E402
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import (  # noqa: E402
    EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat, LayerMapComposite,
    layer_map_base,
)
from zennit.torchvision import ResNetCanonizer  # noqa: E402
from zennit.types import Convolution  # noqa: E402

import lrpplan  # noqa: E402

pytestmark = pytest.mark.compare

DT = torch.float64
RTOL = 1e-4
CONV = "ConvolutionBackward0"


# --------------------------------------------------------------------------- helpers


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b is the reference)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


def onehot_times(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Zennit's usual ``attr_output``: the selected logit, zero elsewhere."""
    hot = torch.zeros_like(out).scatter_(1, target[:, None], 1.0)
    return hot * out


def zennit_rel(model, x, composite, target=None):
    """Input relevance from Zennit; ``target=None`` seeds with the whole output."""
    def attr_output(out):
        return out if target is None else onehot_times(out, target)
    with Gradient(model=model, composite=composite) as attributor:
        _, rel = attributor(x.clone(), attr_output)
    return rel.detach()


def lrpplan_rel(model, x, rules, target=None):
    """Input relevance from lrpplan.attribute with the same seed as :func:`zennit_rel`."""
    xx = x.clone().requires_grad_(True)
    out = model(xx)
    seed = out.detach() if target is None else onehot_times(out.detach(), target)
    return lrpplan.attribute(out, xx, seed=seed, rules=rules, cache=False).relevance


def eps_composite(eps, canonizers=None):
    """Pure ε: Epsilon on every convolution and dense layer, Zennit's base map elsewhere
    (Pass on activations / BatchNorm, Norm on Sum / AvgPool)."""
    return LayerMapComposite(
        layer_map_base(eps) + [(Convolution, zrules.Epsilon(eps)), (nn.Linear, zrules.Epsilon(eps))],
        canonizers=canonizers)


def custom_rules(eps, conv=None, dense=None):
    """A RuleSet: ε everywhere, with variant parameters for convolutions / all linear nodes."""
    rule_params = {"linear": {"epsilon": eps, **(dense or {})},
                   "linear_map": {"epsilon": eps}, "add": {"epsilon": eps}}
    type_params = {CONV: {"epsilon": eps, **conv}} if conv else {}
    return lrpplan.RuleSet("custom", rule_params, type_params)


def randomize_biases(model, std):
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.bias is not None:
                mod.bias.normal_(0.0, std)
    return model


def small_cnn(seed=0):
    """conv-relu-conv-relu-maxpool-conv-relu-maxpool-flatten-linear-relu-linear, 16x16 input."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    ).to(DT).eval()


def inputs(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT)


TARGET = torch.tensor([3, 7])


# --------------------------------------------------------------------------- stabiliser


@pytest.mark.parametrize("eps", [1e-6, 0.1])
def test_stabilizer_zero_denominator_counts_as_positive(eps):
    """Zennit's core.stabilize: ``sign = (input == 0) + input.sign()``, so z = 0 gets +eps.
    z = [0, -1, 2] with seed [1, 1, 1]: R_x = x * W^T (R / (z + eps*sign(z)))."""
    lin = nn.Linear(2, 3, bias=True).to(DT).eval()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, -1.0], [2.0, 1.0]], dtype=DT))
        lin.bias.copy_(torch.tensor([0.0, 1.0, -1.0], dtype=DT))
    x = torch.tensor([[1.0, 1.0]], dtype=DT)       # z = [0, -1, 2]
    z = torch.tensor([0.0, -1.0, 2.0], dtype=DT)
    s = 1.0 / (z + eps * torch.tensor([1.0, -1.0, 1.0], dtype=DT))
    expected = (x * (s @ lin.weight)).detach()

    model = nn.Sequential(lin)
    seed = torch.ones(1, 3, dtype=DT)
    with Gradient(model=model, composite=LayerMapComposite([(nn.Linear, zrules.Epsilon(eps))])) as at:
        _, rz = at(x.clone(), lambda out: seed)
    xx = x.clone().requires_grad_(True)
    rl = lrpplan.attribute(model(xx), xx, seed=seed, rules=custom_rules(eps), cache=False).relevance
    assert torch.allclose(rz, expected, rtol=1e-12, atol=0)   # the reference is what we think
    assert torch.allclose(rl, expected, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- single layers

EPS_L = 0.01  # a stabiliser large enough that a misplaced epsilon shows

ZENNIT_RULES = {
    "epsilon": lambda: zrules.Epsilon(EPS_L),
    "zplus": lambda: zrules.ZPlus(stabilizer=EPS_L),
    "alphabeta": lambda: zrules.AlphaBeta(alpha=2.0, beta=1.0, stabilizer=EPS_L),
    "gamma": lambda: zrules.Gamma(gamma=0.25, stabilizer=EPS_L),
    "flat": lambda: zrules.Flat(stabilizer=EPS_L),
    "wsquare": lambda: zrules.WSquare(stabilizer=EPS_L),
    "zbox": lambda: zrules.ZBox(low=-3.0, high=3.0, stabilizer=EPS_L),
}
LRP_PARAMS = {"alpha": 2.0, "beta": 1.0, "gamma": 0.25, "low": -3.0, "high": 3.0}

GAMMA_REASON = (
    "formula differs from zennit.rules.Gamma: Zennit's generalised gamma picks the branch by the "
    "sign of the true output z = Wx+b (gradient_mapper masks `outputs[4] > 0.` / `outputs[4] < 0.`, "
    "z == 0 gets no relevance); for z > 0 it uses x+ * (W + g*W+) [+ b + g*b+] plus "
    "x- * (W + g*W-) (param_modifiers GammaMod(gamma, min=0.) / GammaMod(gamma, max=0., "
    "zero_params=bias)), for z < 0 it uses x+ * (W + g*W-) [+ b + g*b-] plus x- * (W + g*W+); "
    "lrpplan _variant_gamma always uses x * (W + g*W+) + (b + g*b+) for every output and input sign"
)
WSQUARE_REASON = (
    "formula differs from zennit.rules.WSquare: Zennit squares every parameter, bias included "
    "(`ParamMod((lambda param, _: param ** 2), zero_params=zero_params)`, bias not zeroed), so "
    "z = sum_i w_ij^2 + b_j^2; lrpplan _variant_wsquare drops the bias (run.fwd(ones_x, w2, None))"
)

# (variant, input sign, bias, all outputs positive, xfail reason or None)
LAYER_CASES = [
    ("epsilon", "mixed", True, False, None),
    ("zplus", "mixed", True, False, None),
    ("zplus", "positive", True, False, None),
    ("zplus", "mixed", False, False, None),
    ("alphabeta", "mixed", True, False, None),
    ("alphabeta", "positive", True, False, None),
    ("flat", "mixed", True, False, None),
    ("zbox", "mixed", True, False, None),
    ("wsquare", "mixed", False, False, None),
    ("wsquare", "mixed", True, False, None),
    # generalised γ: Zennit's branches follow the sign of z; negative inputs and outputs too
    ("gamma", "positive", True, True, None),
    ("gamma", "positive", True, False, None),
    ("gamma", "mixed", True, True, None),
    ("gamma", "mixed", True, False, None),
]


def _layer_params():
    for kind in ("conv", "linear"):
        for variant, sign, bias, allpos, reason in LAYER_CASES:
            cid = f"{kind}-{variant}-{sign}-{'bias' if bias else 'nobias'}{'-zpos' if allpos else ''}"
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(kind, variant, sign, bias, allpos, id=cid, marks=marks)


@pytest.mark.parametrize("kind,variant,sign,bias,allpos", list(_layer_params()))
def test_single_layer_rule_matches_zennit(kind, variant, sign, bias, allpos):
    torch.manual_seed(0)
    if kind == "conv":
        layer = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=bias)
        x = inputs((2, 3, 7, 7))
    else:
        layer = nn.Linear(12, 6, bias=bias)
        x = inputs((2, 12))
    layer = layer.to(DT).eval()
    if bias:
        with torch.no_grad():
            layer.bias.normal_(0.0, 1.0)
    if sign == "positive":
        x = x.abs()
    if allpos:
        with torch.no_grad():   # a large positive bias makes every z > 0
            layer.bias.uniform_(20.0, 30.0)
    model = nn.Sequential(layer)
    if allpos:
        assert (model(x) > 0).all()

    comp = LayerMapComposite([(nn.Conv2d, ZENNIT_RULES[variant]()),
                              (nn.Linear, ZENNIT_RULES[variant]())])
    rz = zennit_rel(model, x, comp)
    rl = lrpplan_rel(model, x, custom_rules(EPS_L, dense={"variant": variant, **LRP_PARAMS}))
    assert rz.abs().max() > 0
    assert torch.isfinite(rl).all()
    err = rel_err(rl, rz)
    assert err <= RTOL, f"{kind}/{variant}: relative error {err:.3g}"


# --------------------------------------------------------------------------- small CNN

def _zennit_preset(name, eps):
    if name == "epsilon":
        return eps_composite(eps)
    if name == "epsilon-plus":
        return EpsilonPlus(epsilon=eps, stabilizer=eps)
    if name == "epsilon-alpha2-beta1":
        return EpsilonAlpha2Beta1(epsilon=eps, stabilizer=eps)
    if name == "epsilon-gamma-box":
        return EpsilonGammaBox(low=-3.0, high=3.0, epsilon=eps, gamma=0.25, stabilizer=eps)
    if name == "epsilon-plus-flat":
        return EpsilonPlusFlat(epsilon=eps, stabilizer=eps)
    raise KeyError(name)


def _lrpplan_preset(name, eps):
    extra = {"low": -3.0, "high": 3.0} if name == "epsilon-gamma-box" else {}
    return lrpplan.RuleSet.preset(name, epsilon=eps, **extra)


PRESETS = ["epsilon", "epsilon-plus", "epsilon-alpha2-beta1", "epsilon-gamma-box",
           "epsilon-plus-flat"]


@pytest.mark.parametrize("eps", [1e-6, 0.05])
@pytest.mark.parametrize("preset", PRESETS)
def test_small_cnn_presets(preset, eps):
    model = small_cnn()
    x = inputs((2, 3, 16, 16))
    rz = zennit_rel(model, x, _zennit_preset(preset, eps), TARGET)
    rl = lrpplan_rel(model, x, _lrpplan_preset(preset, eps), TARGET)
    assert rz.abs().max() > 0
    err = rel_err(rl, rz)
    assert err <= RTOL, f"{preset} eps={eps}: relative error {err:.3g}"


def test_small_cnn_explain_seeds_like_attr_output():
    """lrpplan.explain(target=...) seeds with the selected logit, like onehot * output."""
    model = small_cnn()
    x = inputs((2, 3, 16, 16))
    rz = zennit_rel(model, x, EpsilonPlus(epsilon=1e-6, stabilizer=1e-6), TARGET)
    att = lrpplan.explain(model, x, target=TARGET,
                          rules=lrpplan.RuleSet.preset("epsilon-plus", epsilon=1e-6), cache=False)
    with torch.no_grad():
        logits = model(x)
    assert torch.allclose(att.output, logits[torch.arange(2), TARGET], rtol=1e-12, atol=0)
    assert rel_err(att.relevance, rz) <= RTOL


def test_adaptive_avgpool_matches_zennit_norm_rule():
    """A genuinely averaging AdaptiveAvgPool2d (overlapping 8 -> 3 windows): Zennit's Norm rule
    (layer_map_base) vs lrpplan's ε-rule through the pool, with an ε large enough to matter."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(54, 10),
    ).to(DT).eval()
    x = inputs((2, 3, 8, 8))
    for preset in ("epsilon", "epsilon-plus"):
        rz = zennit_rel(model, x, _zennit_preset(preset, 0.1), TARGET)
        rl = lrpplan_rel(model, x, lrpplan.RuleSet.preset(preset, epsilon=0.1), TARGET)
        assert rel_err(rl, rz) <= RTOL, preset


def test_small_cnn_epsilon_gamma():
    eps = 1e-6
    model = small_cnn()
    x = inputs((2, 3, 16, 16))
    comp = LayerMapComposite(layer_map_base(eps) + [
        (Convolution, zrules.Gamma(gamma=0.25, stabilizer=eps)), (nn.Linear, zrules.Epsilon(eps))])
    rz = zennit_rel(model, x, comp, TARGET)
    rl = lrpplan_rel(model, x, lrpplan.RuleSet.preset("epsilon-gamma", epsilon=eps, gamma=0.25),
                     TARGET)
    assert rel_err(rl, rz) <= RTOL


def _single_conv_net():
    """Only the first layer is a convolution, so lrpplan's per-node-type selection can express
    Zennit's first-layer composites."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10),
    ).to(DT).eval()


@pytest.mark.parametrize("which", ["epsilon-plus-flat", "epsilon-gamma-box"])
def test_first_layer_composites(which):
    eps = 0.01
    model = _single_conv_net()
    x = inputs((2, 3, 8, 8))
    if which == "epsilon-plus-flat":
        comp = EpsilonPlusFlat(epsilon=eps, stabilizer=eps)
        conv = {"variant": "flat"}
    else:
        comp = EpsilonGammaBox(low=-3.0, high=3.0, epsilon=eps, gamma=0.25, stabilizer=eps)
        conv = {"variant": "zbox", "low": -3.0, "high": 3.0}
    rz = zennit_rel(model, x, comp, TARGET)
    rl = lrpplan_rel(model, x, custom_rules(eps, conv=conv), TARGET)
    assert rel_err(rl, rz) <= RTOL


def test_small_cnn_frozen_parameters():
    """Frozen weights and biases (requires_grad False): autograd keeps neither the linear
    layers' inputs nor the biases; explain() runs the forward on grad-requiring stand-ins
    (functional_call), so the result equals Zennit's and the model stays frozen."""
    model = small_cnn().requires_grad_(False)
    x = inputs((2, 3, 16, 16))
    rz = zennit_rel(model, x, EpsilonPlus(epsilon=1e-6, stabilizer=1e-6), TARGET)
    attr = lrpplan.explain(model, x, target=TARGET,
                           rules=lrpplan.RuleSet.preset("epsilon-plus", epsilon=1e-6), cache=False)
    assert rel_err(attr.relevance, rz) <= RTOL
    assert not any(p.requires_grad for p in model.parameters())


def test_frozen_bias_in_a_user_graph_is_a_recorded_assumption():
    """attribute() on a graph built with frozen parameters cannot see the biases: the rule takes
    them as 0 and says so in the result's assumptions."""
    model = small_cnn().requires_grad_(False)
    x = inputs((2, 3, 16, 16)).requires_grad_(True)
    with pytest.warns(lrpplan.LRPWarning, match="requires_grad"):
        attr = lrpplan.attribute(model(x).sum(), x, cache=False)
    assert any("taken as 0" in a for a in attr.assumptions)
    assert attr.plan.stats["constants_taken_as_zero"] >= 1


# --------------------------------------------------------------------------- VGG16


@pytest.fixture(scope="module")
def vgg16():
    """torchvision VGG16, random init with random biases, 32x32 input: the features end at
    1x1 and AdaptiveAvgPool2d(7) upsamples it to 7x7 (Zennit: Norm rule; lrpplan: ε-rule)."""
    torch.manual_seed(0)
    model = torchvision.models.vgg16(num_classes=10).to(DT).eval()
    return randomize_biases(model, 0.05)


@pytest.mark.parametrize("preset", PRESETS)
def test_vgg16_presets(vgg16, preset):
    eps = 1e-6
    x = inputs((2, 3, 32, 32))
    rz = zennit_rel(vgg16, x, _zennit_preset(preset, eps), TARGET)
    if preset == "epsilon-plus":   # also through explain's own seeding
        rl = lrpplan.explain(vgg16, x, target=TARGET, cache=False,
                             rules=_lrpplan_preset(preset, eps)).relevance
    else:
        rl = lrpplan_rel(vgg16, x, _lrpplan_preset(preset, eps), TARGET)
    assert rz.abs().max() > 0
    err = rel_err(rl, rz)
    assert err <= RTOL, f"VGG16 {preset}: relative error {err:.3g}"


# --------------------------------------------------------------------------- ResNet (informational)


def _input_times_gradient(model, x, target):
    xx = x.clone().requires_grad_(True)
    out = model(xx)
    (g,) = torch.autograd.grad(out[torch.arange(len(x)), target].sum(), xx)
    return (g * x).detach()


def test_resnet18_informational(capsys):
    """Zennit (ResNetCanonizer + ε LayerMap) vs lrpplan ε on resnet18 at 64x64: only reported.

    They are not expected to agree to 1e-4. Zennit's MergeBatchNorm folds BatchNorm into the
    conv and then leaves the BatchNorm as ``x / sqrt(1 + bn.eps)`` (running_var := 1, eps kept),
    so the canonized model is not the original one (ReLU masks can flip); and the folded conv has
    one ε-stabilised division where lrpplan has two (conv, then BatchNorm). With ``bn.eps = 0``
    the canonizer is exact and the two agree closely. As ε -> 0 lrpplan tends to input x gradient
    of the original model, Zennit to input x gradient of the canonized one.
    """
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(DT).eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.1)
    reference = copy.deepcopy(model.state_dict())
    x = inputs((2, 3, 64, 64))
    lines = []
    for bn_eps, eps in ((1e-5, 1e-6), (1e-5, 1e-9), (0.0, 1e-9)):
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.eps = bn_eps
        canonized = copy.deepcopy(model)
        ResNetCanonizer().apply(canonized)   # a throw-away copy
        gi_canon = _input_times_gradient(canonized, x, TARGET)
        gi = _input_times_gradient(model, x, TARGET)
        rz = zennit_rel(model, x, eps_composite(eps, canonizers=[ResNetCanonizer()]), TARGET)
        rl = lrpplan.explain(model, x, target=TARGET, cache=False,
                             rules=lrpplan.RuleSet.preset("epsilon", epsilon=eps)).relevance
        assert torch.isfinite(rz).all() and torch.isfinite(rl).all()
        lines.append(
            f"resnet18 bn.eps={bn_eps:g} eps={eps:g}: rel. diff lrpplan vs zennit "
            f"{rel_err(rl, rz):.3g} | lrpplan vs x*grad(model) {rel_err(rl, gi):.3g} | "
            f"zennit vs x*grad(canonized) {rel_err(rz, gi_canon):.3g}")
    # the canonizer was reverted: the model holds its own parameters again
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    with capsys.disabled():
        print("\n" + "\n".join(lines))
