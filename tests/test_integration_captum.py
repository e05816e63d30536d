"""lrpplan.integrations.captum.LRP against Captum's own LRP and closed-form references."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lrpplan
from lrpplan.integrations.captum import LRP

captum_attr = pytest.importorskip("captum.attr")

EPS = 1e-9  # Captum's EpsilonRule.STABILITY_FACTOR
RULES = lrpplan.RuleSet.preset("epsilon", epsilon=EPS)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def captum_lrp(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return captum_attr.LRP(model).attribute(*args, **kwargs)


class CNN(nn.Module):
    """Only module types Captum's LRP supports; flattening happens in forward (nn.Flatten has no
    Captum rule)."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=bias)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, bias=bias)
        self.relu2 = nn.ReLU()
        self.fc1 = nn.Linear(6 * 2 * 2, 10, bias=bias)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(10, 3, bias=bias)

    def forward(self, x):
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.relu2(self.conv2(x)).reshape(x.shape[0], -1)
        return self.fc2(self.relu3(self.fc1(x)))


def grad_x_input(model, inputs, select):
    """Gradient × input: equals LRP-ε (ε → 0) on bias-free ReLU networks (independent reference)."""
    xs = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
    grads = torch.autograd.grad(select(model(*xs)).sum(), xs)
    return tuple(g * x.detach() for g, x in zip(grads, xs))


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return CNN().double().eval(), torch.randn(5, 1, 8, 8, dtype=torch.float64)


@pytest.mark.parametrize("target", [1, [0, 1, 2, 0, 1], torch.tensor([2, 2, 0, 1, 0]),
                                    torch.tensor(1), (2,)])
def test_matches_captum_on_bias_free_cnn(cnn, target):
    model, x = cnn
    ref = captum_lrp(model, x, target=target)
    ours = LRP(model, rules=RULES, cache=False).attribute(x, target=target)
    assert ours.shape == x.shape and ours.dtype == x.dtype
    assert rel_err(ours, ref.detach()) <= 1e-6
    idx = torch.as_tensor(target).reshape(-1).expand(5) if not isinstance(target, tuple) \
        else torch.full((5,), target[0])
    gxi = grad_x_input(model, (x,), lambda o: o.gather(1, idx.reshape(-1, 1)))[0]
    assert rel_err(ours, gxi) <= 1e-6


def test_matches_captum_with_biases_and_delta(cnn):
    torch.manual_seed(1)
    model = CNN(bias=True).double().eval()
    x = cnn[1]
    ref, ref_delta = captum_lrp(model, x, target=2, return_convergence_delta=True)
    ours, delta = LRP(model, rules=RULES, cache=False).attribute(
        x, target=2, return_convergence_delta=True)
    assert rel_err(ours, ref.detach()) <= 1e-6
    out = model(x)[:, 2].detach()
    expected = out - ours.reshape(5, -1).sum(1)  # Captum's sign: output − Σ attributions
    assert delta.shape == (5,)
    assert torch.allclose(delta, expected, rtol=0, atol=1e-12)
    assert torch.allclose(delta, ref_delta.detach(), rtol=1e-5, atol=1e-9)
    assert delta.abs().max() > 1e-3  # biases absorb relevance: the check is not vacuous


def test_delta_is_zero_without_biases_and_api_flags(cnn):
    model, x = cnn
    lrp = LRP(model, rules=RULES, cache=False)
    assert lrp.has_convergence_delta() and lrp.multiplies_by_inputs
    attr, delta = lrp.attribute(x, target=0, return_convergence_delta=True)
    out = model(x)[:, 0].detach()
    # only ε = 1e-9 in the stabilisers absorbs relevance
    assert torch.allclose(attr.reshape(5, -1).sum(1), out, rtol=1e-6, atol=1e-7)
    assert torch.allclose(delta, out - attr.reshape(5, -1).sum(1), rtol=0, atol=1e-15)
    assert delta.abs().max() <= 1e-6


def test_plan_is_reused_across_calls(cnn):
    model, x = cnn
    lrp = LRP(model, rules=RULES, cache=False)
    first = lrp.attribute(x, target=1)
    assert lrp.last.cached is False
    x2 = torch.randn_like(x)
    second = lrp.attribute(x2, target=1)
    assert lrp.last.cached is True
    assert rel_err(second, captum_lrp(model, x2, target=1).detach()) <= 1e-6
    assert not torch.allclose(first, second)


def test_float32_inputs_keep_their_dtype(cnn):
    model, x = cnn
    model, x = model.float(), x.float()
    ours = LRP(model, rules=RULES, cache=False).attribute(x, target=1)
    assert ours.dtype == torch.float32
    assert rel_err(ours, captum_lrp(model, x, target=1).detach()) <= 1e-4


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fa = nn.Linear(4, 5, bias=False)
        self.ra = nn.ReLU()
        self.fb = nn.Linear(3, 5, bias=False)
        self.rb = nn.ReLU()
        self.head = nn.Linear(10, 3, bias=False)

    def forward(self, a, b, scale=None, flag=True):
        h = torch.cat([self.ra(self.fa(a)), self.rb(self.fb(b))], 1)
        if scale is not None:
            h = h * scale
        out = self.head(h)
        return out if flag else -out


def test_tuple_inputs_and_additional_forward_args():
    torch.manual_seed(2)
    model = TwoInputs().double()
    a, b = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    scale = torch.rand(4, 10, dtype=torch.float64) + 0.5
    lrp = LRP(model, rules=RULES, cache=False)
    idx = torch.tensor([0, 1, 2, 1])
    for extra in [None, (None, True)]:
        ours = lrp.attribute((a, b), target=idx.tolist(), additional_forward_args=extra)
        ref = captum_lrp(model, (a, b), target=idx.tolist(), additional_forward_args=extra)
        assert isinstance(ours, tuple) and len(ours) == 2
        for o, r, x in zip(ours, ref, (a, b)):
            assert o.shape == x.shape
            assert rel_err(o, r.detach()) <= 1e-6
    # a non-tensor argument reaches the model in position (flag=False negates the output); the
    # score is then −head(h), whose LRP-0 is gradient × input; Captum's seed ignores the
    # functional negation and returns relevance summing to −score
    neg = lrp.attribute((a, b), target=idx, additional_forward_args=(None, False))
    gxi = grad_x_input(lambda a_, b_: model(a_, b_, None, False), (a, b),
                       lambda o: o.gather(1, idx.reshape(-1, 1)))
    theirs = captum_lrp(model, (a, b), target=idx, additional_forward_args=(None, False))
    for o, g, t in zip(neg, gxi, theirs):
        assert rel_err(o, g) <= 1e-6
        assert rel_err(t.detach(), g) > 1
    # a tensor argument multiplied in forward: lrpplan gives LRP-0 = gradient × input on this
    # bias-free ReLU net; Captum's hooks count the (non-module) product's factor twice
    ours = lrp.attribute((a, b), target=idx, additional_forward_args=scale)
    gxi = grad_x_input(lambda a_, b_: model(a_, b_, scale), (a, b),
                       lambda o: o.gather(1, idx.reshape(-1, 1)))
    theirs = captum_lrp(model, (a, b), target=idx, additional_forward_args=scale)
    for o, g, t in zip(ours, gxi, theirs):
        assert rel_err(o, g) <= 1e-6
        assert rel_err(t.detach(), g) > 1e-2
    # the extra tensor is not attributed and does not take a share of the Mul's relevance
    ours, delta = lrp.attribute((a, b), target=1, additional_forward_args=(scale,),
                                return_convergence_delta=True)
    out = model(a, b, scale)[:, 1].detach()
    assert torch.allclose(ours[0].sum(1) + ours[1].sum(1), out, rtol=1e-6, atol=1e-7)
    assert delta.abs().max() <= 1e-6
    neg = lrp.attribute((a, b), target=1, additional_forward_args=(scale, False))
    assert torch.allclose(neg[0], -ours[0], rtol=1e-9, atol=1e-12)


class SeqModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6, bias=False)
        self.relu = nn.ReLU()
        self.out = nn.Linear(6, 3, bias=False)

    def forward(self, x):  # [B, T, 4] -> [B, T, 3]
        return self.out(self.relu(self.fc(x)))


def test_tuple_targets_on_multidimensional_output():
    torch.manual_seed(3)
    model = SeqModel().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    lrp = LRP(model, rules=RULES, cache=False)
    for target in [(2, 1), [(0, 0), (4, 2), (1, 1)]]:
        ours = lrp.attribute(x, target=target)
        ref = captum_lrp(model, x, target=target)
        assert rel_err(ours, ref.detach()) <= 1e-6
    ours = lrp.attribute(x, target=(2, 1))
    assert ours[:, [0, 1, 3, 4]].abs().max() == 0  # only position 2 feeds that score


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6, bias=False)
        self.relu = nn.ReLU()
        self.out = nn.Linear(6, 1, bias=False)

    def forward(self, x):
        return self.out(self.relu(self.fc(x)))


def test_target_none_semantics():
    torch.manual_seed(4)
    model = Scalar().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    ours, delta = LRP(model, rules=RULES, cache=False).attribute(x, return_convergence_delta=True)
    ref = captum_lrp(model, x)
    assert rel_err(ours, ref.detach()) <= 1e-6
    assert torch.allclose(ours.sum(1), model(x)[:, 0].detach(), rtol=1e-6, atol=1e-7)
    # None with several outputs per sample: Captum raises an AssertionError, so does the drop-in
    many = SeqModel().double()
    with pytest.raises(AssertionError):
        captum_lrp(many, x[:, None].expand(6, 2, 4))
    with pytest.raises(AssertionError):
        LRP(many, cache=False).attribute(x[:, None].expand(6, 2, 4))
    with pytest.raises(lrpplan.InvalidInputError):
        LRP(many, cache=False).attribute(x[:, None].expand(6, 2, 4), target=[0, 1])


def test_import_does_not_need_captum():
    import subprocess
    import sys
    code = ("import sys; sys.modules['captum'] = None; "
            "from lrpplan.integrations.captum import LRP; print(LRP.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "LRP"


# ------------------------------------------------------------------ where Captum's LRP fails


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6, bias=False)
        self.relu = nn.ReLU()
        self.out = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.out(x + self.relu(self.fc(x)))


def test_residual_block_lrpplan_correct_captum_wrong():
    torch.manual_seed(5)
    model = Residual().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    out = model(x)[:, 0].detach()
    gxi = grad_x_input(model, (x,), lambda o: o[:, 0])[0]  # LRP-0 on a bias-free ReLU net
    theirs, their_delta = captum_lrp(model, x, target=0, return_convergence_delta=True)
    # Captum silently multiplies the skip path's relevance twice: conservation and the
    # reference both fail
    assert their_delta.abs().max() > 1e-2 * out.abs().max()
    assert rel_err(theirs.detach(), gxi) > 1e-2
    lrp = LRP(model, rules=RULES, cache=False)
    ours, delta = lrp.attribute(x, target=0, return_convergence_delta=True)
    assert torch.isfinite(ours).all()
    assert rel_err(ours, gxi) <= 1e-6
    assert delta.abs().max() <= 1e-6
    assert lrp.last.ledger.closes()


class Attention(nn.Module):
    def __init__(self, softmax_module: bool) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4, bias=False)
        self.k = nn.Linear(4, 4, bias=False)
        self.v = nn.Linear(4, 4, bias=False)
        self.softmax = nn.Softmax(-1) if softmax_module else None
        self.out = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(1, 2) / 2.0
        att = self.softmax(scores) if self.softmax is not None else torch.softmax(scores, -1)
        return self.out((att @ self.v(x)).mean(1))


def test_attention_block_captum_raises_lrpplan_explains():
    torch.manual_seed(6)
    model = Attention(softmax_module=True).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="no rule defined"):
        captum_lrp(model, x, target=0)
    lrp = LRP(model, cache=False)
    ours, delta = lrp.attribute(x, target=0, return_convergence_delta=True)
    assert ours.shape == x.shape and torch.isfinite(ours).all()
    assert ours.abs().sum() > 0
    ledger = lrp.last.ledger
    assert ledger.closes()
    out = model(x)[:, 0].detach()
    assert ledger.start == pytest.approx(float(out.sum()), rel=1e-9, abs=1e-12)
    assert ledger.at_inputs == pytest.approx(float(ours.sum()), rel=1e-9, abs=1e-12)
    # delta (Captum's output − Σ attributions) is what the ledger books as absorbed
    assert float(delta.sum()) == pytest.approx(ledger.absorbed, rel=1e-6, abs=1e-9)


def test_functional_attention_captum_reuse_of_module_raises():
    """The same Linear used twice (shared Q/K projection) is rejected by Captum's LRP."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qk = nn.Linear(4, 4, bias=False)
            self.out = nn.Linear(4, 2, bias=False)

        def forward(self, x):
            att = torch.softmax(self.qk(x) @ self.qk(x).transpose(1, 2), -1)
            return self.out((att @ x).mean(1))

    torch.manual_seed(7)
    model = Shared().double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="more than once"):
        captum_lrp(model, x, target=1)
    lrp = LRP(model, cache=False)
    ours = lrp.attribute(x, target=1)
    assert torch.isfinite(ours).all() and lrp.last.ledger.closes()


# -- the multi-target extension: K targets per sample, one replay ------------------------------

def test_multi_target_tensor_equals_captum_per_target(cnn):
    torch.manual_seed(5)
    model = CNN(bias=True).double().eval()
    x = cnn[1]
    targets = torch.tensor([[0, 2], [1, 1], [2, 0], [0, 1], [2, 1]])
    lrp = LRP(model, rules=RULES, cache=False)
    ours, delta = lrp.attribute(x, target=targets, return_convergence_delta=True)
    assert ours.shape == (5, 2, *x.shape[1:]) and ours.dtype == x.dtype
    assert delta.shape == (5, 2)
    for k in range(2):
        ref, ref_delta = captum_lrp(model, x, target=targets[:, k], return_convergence_delta=True)
        assert rel_err(ours[:, k], ref.detach()) <= 1e-6
        assert torch.allclose(delta[:, k], ref_delta.detach(), rtol=1e-5, atol=1e-9)
        # and one-by-one through the drop-in itself (float64: 1e-10)
        single = lrp.attribute(x, target=targets[:, k])
        assert torch.allclose(ours[:, k], single, rtol=0, atol=1e-10 * single.abs().max())
    out = model(x).gather(1, targets).detach()
    assert torch.allclose(delta, out - ours.reshape(5, 2, -1).sum(2), rtol=0, atol=1e-12)
    assert delta.abs().max() > 1e-3  # biases absorb relevance: the check compares something
    for form in (targets, targets.tolist()):  # Captum rejects both forms: no meaning changes
        with pytest.raises(Exception):
            captum_lrp(model, x, target=form)


def test_multi_target_lists_of_tuples_on_sequence_output():
    torch.manual_seed(6)
    model = SeqModel().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    target = [[(0, 0), (4, 2), (1, 1)], [(2, 1), (2, 2), (3, 0)], [(4, 0), (0, 2), (1, 1)]]
    lrp = LRP(model, rules=RULES, cache=False)
    ours = lrp.attribute(x, target=target)
    assert ours.shape == (3, 3, 5, 4)
    for k in range(3):
        ref = captum_lrp(model, x, target=[row[k] for row in target])
        assert rel_err(ours[:, k], ref.detach()) <= 1e-6
    # positions differ per target: target (0, 4, 2) of sample 0 sees only position 4
    assert ours[0, 1, [0, 1, 2, 3]].abs().max() == 0 and ours[0, 1, 4].abs().max() > 0


def test_multi_target_tuple_inputs_and_ints_in_lists():
    torch.manual_seed(7)
    model = TwoInputs().double()
    a, b = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    target = [[0, 1, 2], [2, 2, 1], [1, 0, 0], [0, 2, 1]]
    ours = LRP(model, rules=RULES, cache=False).attribute((a, b), target=target)
    assert ours[0].shape == (4, 3, 4) and ours[1].shape == (4, 3, 3)
    for k in range(3):
        ref = captum_lrp(model, (a, b), target=[row[k] for row in target])
        for o, r in zip(ours, ref):
            assert rel_err(o[:, k], r.detach()) <= 1e-6


@pytest.mark.parametrize("target, match", [
    (torch.tensor([[0, 1]] * 4), "B = 5"),
    (torch.tensor([[0.0, 1.0]] * 5), "integer"),
    ([[0, 1]] * 4 + [[0]], "same number"),
    ([[0, "a"]] * 5, "not valid"),
    ([[(0, 1)]] * 5, "does not pick one value"),
])
def test_multi_target_rejections(cnn, target, match):
    model, x = cnn
    with pytest.raises(lrpplan.InvalidInputError, match=match):
        LRP(model, cache=False).attribute(x, target=target)
    # Captum itself rejects these forms (no Captum call changes meaning under the extension)
    with pytest.raises(Exception):
        captum_lrp(model, x, target=target)
