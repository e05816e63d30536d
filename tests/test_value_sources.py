"""Forward values the graph already holds, used instead of recomputation (issue 5).

Each shortcut is checked twice: the plan must actually use it (so the test cannot pass on the
old recomputing path), and the relevance must equal an independent float64 reference (closed
form, or gradient × input where LRP-0 equals it). Where a shortcut must *not* apply, the plan
must not use it and the result must equal the closed form.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import lrpplan
from lrpplan import RuleSet
from lrpplan.plan import Plan, ValueOp

TINY = RuleSet.preset("epsilon", epsilon=1e-12)
EPS = 1e-6


def value_ops(plan: Plan) -> list[ValueOp]:
    out = []
    for s in plan.steps:
        out += list(s.chain)
        for b in s.body:
            out += list(b.chain)
    return out


def kinds(plan: Plan) -> set[str]:
    return {v.kind for v in value_ops(plan)}


def relu_stand_ins(plan: Plan, types: list[str]) -> int:
    """Rule steps of linear/add nodes that read a ReLU's saved result as their own output."""
    n = 0
    for step in plan.iter_rule_steps():
        for op in step.chain:
            if op.kind == "saved" and types[op.node] == "ReluBackward0" \
                    and step.rule in ("linear", "add"):
                n += 1
    return n


def stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.where(z >= 0, z + eps, z - eps)


def grad_times_input(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    score = out.gather(-1, target.reshape(-1, 1)).sum()
    (g,) = torch.autograd.grad(score, x)
    return (x * g).detach()


def node_types(model: nn.Module, x: torch.Tensor) -> list[str]:
    from lrpplan.graph import capture
    with torch.enable_grad():
        out = model(x.detach().requires_grad_(True))
        score = out.gather(-1, out.argmax(-1, keepdim=True))  # [B, 1], as explain picks it
        ge = torch.autograd.graph.get_gradient_edge(score)
        return capture([(ge.node, ge.output_nr)]).types


# ---------------------------------------------------------------------------------------------
# the _base of a saved view; a view's input from its output


class SquaredHeads(nn.Module):
    """``score = Σ_j y_j²`` with ``y = W x + b`` seen only through views by the squaring."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        q = y.view(-1, 2, 4).transpose(1, 2)  # the pow saves this view of y
        return q.pow(2).sum(dim=(1, 2)).unsqueeze(-1)


def test_linear_output_from_the_base_of_a_saved_view():
    torch.manual_seed(0)
    model = SquaredHeads().double()
    x = torch.randn(3, 6, dtype=torch.float64)
    attr = lrpplan.explain(model, x, target=0, cache=False)
    assert "base" in kinds(attr.plan)
    types = node_types(model, x)
    assert not [op for op in value_ops(attr.plan)  # the matmul is not recomputed
                if op.kind == "fwd" and types[op.node] == "AddmmBackward0"]
    # closed form: sum rule R_{y_j²} = y_j² · S / stab(S), pow passes it on, then the ε-rule
    with torch.no_grad():
        y = model.lin(x)
        s_tot = (y * y).sum(-1, keepdim=True)
        r_y = y * y * s_tot / stab(s_tot, EPS)
        ref = x * ((r_y / stab(y, EPS)) @ model.lin.weight)
    torch.testing.assert_close(attr.relevance, ref, rtol=1e-12, atol=1e-14)


class TinyHead(nn.Module):
    """A bias-free projection of 3-D hidden states (``matmul`` → ``Mm`` + ``UnsafeView``)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(5, 7, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)


def test_lm_head_output_from_the_selected_logits():
    torch.manual_seed(1)
    model = TinyHead().double()
    h = torch.randn(2, 4, 5, dtype=torch.float64)
    attr = lrpplan.explain(model, h, cache=False)  # explains the last position
    assert {"base", "unview"} <= kinds(attr.plan)
    assert "fwd" not in kinds(attr.plan)
    with torch.no_grad():
        z = model(h)[:, -1]  # [2, 7]
        k = z.argmax(-1)
        zk = z.gather(-1, k[:, None])
        w = model.head.weight[k]  # [2, 5]
        ref = torch.zeros_like(h)
        ref[:, -1] = h[:, -1] * w * (zk / stab(zk, EPS))
    torch.testing.assert_close(attr.relevance, ref, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# an addition's operand as output minus the other operand


class Residual(nn.Module):
    """``head(h + W2 relu(W1 h))``: the head saves the sum, ``W1`` saves ``h``."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.w1 = nn.Linear(6, 12, bias=bias)
        self.w2 = nn.Linear(12, 6, bias=bias)
        self.head = nn.Linear(6, 4, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h + self.w2(torch.relu(self.w1(h))))


def test_residual_branch_from_output_minus_residual_lrp0():
    torch.manual_seed(2)
    model = Residual(bias=False).double()
    h = torch.randn(5, 6, dtype=torch.float64)
    attr = lrpplan.explain(model, h, rules=TINY, cache=False)
    assert "sub" in kinds(attr.plan)
    assert attr.plan.stats["promises"] == 0  # the branch is not replayed
    ref = grad_times_input(model, h, attr.target)
    torch.testing.assert_close(attr.relevance, ref, rtol=1e-6, atol=1e-9)


def test_residual_branch_from_output_minus_residual_closed_form():
    torch.manual_seed(3)
    model = Residual(bias=True).double()
    h = torch.randn(4, 6, dtype=torch.float64)
    attr = lrpplan.explain(model, h, cache=False)
    assert "sub" in kinds(attr.plan)
    with torch.no_grad():
        a1 = torch.relu(model.w1(h))
        b = model.w2(a1)
        s = h + b
        out = model.head(s)
        k = out.argmax(-1)
        zk = out.gather(-1, k[:, None])
        r_s = s * model.head.weight[k] * (zk / stab(zk, EPS))       # head, ε-rule
        r_h = h * r_s / stab(s, EPS)                                  # z-rule at the add
        r_b = b * r_s / stab(s, EPS)
        r_a1 = a1 * ((r_b / stab(b, EPS)) @ model.w2.weight)          # w2
        z1 = model.w1(h)
        r_h = r_h + h * ((r_a1 / stab(z1, EPS)) @ model.w1.weight)    # relu passes, w1
    torch.testing.assert_close(attr.relevance, r_h, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# relu(z) for z


def vgg_like(bias: bool) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.ReLU(inplace=True),
        nn.Conv2d(6, 8, 3, padding=1, bias=bias), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10, bias=bias), nn.ReLU(inplace=True),
        nn.Linear(10, 5, bias=bias))


def test_relu_result_stands_in_for_the_conv_output_lrp0():
    torch.manual_seed(4)
    model = vgg_like(bias=False).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    attr = lrpplan.explain(model, x, rules=TINY, cache=False)
    assert relu_stand_ins(attr.plan, node_types(model, x)) == 3  # both convs, the hidden linear
    assert "fwd" not in kinds(attr.plan)
    ref = grad_times_input(model, x, attr.target)
    torch.testing.assert_close(attr.relevance, ref, rtol=1e-6, atol=1e-9)


def test_relu_stand_in_equals_the_recomputed_output_with_biases_and_epsilon(monkeypatch):
    torch.manual_seed(5)
    model = vgg_like(bias=True).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    rules = RuleSet.preset("epsilon", epsilon=0.05)
    fast = lrpplan.explain(model, x, rules=rules, cache=False)
    assert relu_stand_ins(fast.plan, node_types(model, x)) == 3
    # the same explanation with the stand-in switched off: z recomputed by the rule itself
    monkeypatch.setattr(lrpplan.trace.PlanCompiler, "_stand_in", lambda self, n: None)
    slow = lrpplan.explain(model, x, rules=rules, cache=False)
    assert relu_stand_ins(slow.plan, node_types(model, x)) == 0
    torch.testing.assert_close(fast.relevance, slow.relevance, rtol=1e-12, atol=1e-15)


class LinRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x)))


def test_no_relu_stand_in_when_the_seed_is_not_zero_where_the_relu_is():
    torch.manual_seed(6)
    fc = nn.Linear(4, 6).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    z = fc(x)
    y = torch.relu(z)
    seed = torch.rand(5, 6, dtype=torch.float64) + 0.5  # nonzero where relu(z) = 0 too
    attr = lrpplan.attribute(y, x, seed=seed, cache=False)
    assert not any(op.kind == "saved" and op.attr == "_saved_result"
                   for op in value_ops(attr.plan))
    with torch.no_grad():
        ref = x * ((seed / stab(z, EPS)) @ fc.weight)
    torch.testing.assert_close(attr.relevance, ref, rtol=1e-12, atol=1e-14)


def test_no_relu_stand_in_when_the_consumer_rule_is_not_x_proportional(monkeypatch):
    torch.manual_seed(7)
    model = LinRelu().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    rules = RuleSet.preset("epsilon").module("out", variant="flat")
    attr = lrpplan.explain(model, x, rules=rules, cache=False)
    assert relu_stand_ins(attr.plan, node_types(model, x)) == 0
    # flat sends relevance to units whose activation is 0: the exact z is needed there
    with torch.no_grad():
        z = model.fc(x)
        out = model(x)
        k = out.argmax(-1)
        zk = out.gather(-1, k[:, None])
        n_in = z.shape[-1]
        r_a = (zk / stab(torch.full_like(zk, float(n_in)), EPS)).expand(-1, n_in)
        ref = x * ((r_a / stab(z, EPS)) @ model.fc.weight)
    torch.testing.assert_close(attr.relevance, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("preset", ["epsilon-plus", "epsilon-alpha2-beta1"])
def test_relu_stand_in_under_other_presets_equals_recomputation(preset, monkeypatch):
    torch.manual_seed(8)
    model = vgg_like(bias=True).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fast = lrpplan.explain(model, x, rules=preset, cache=False)
    assert relu_stand_ins(fast.plan, node_types(model, x)) > 0
    monkeypatch.setattr(lrpplan.trace.PlanCompiler, "_stand_in", lambda self, n: None)
    slow = lrpplan.explain(model, x, rules=preset, cache=False)
    torch.testing.assert_close(fast.relevance, slow.relevance, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# memory: nothing an explanation leaves behind keeps the autograd graph alive


class SquareSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.seen: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x)
        self.seen.append(weakref.ref(z))  # the graph (MulBackward0) saves z, nothing else does
        return (z * z).sum(-1, keepdim=True)


def test_no_reference_cycle_keeps_the_graph_alive():
    model = SquareSum()
    explainer = lrpplan.Explainer(model, cache=False)
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):  # a trace, then a replay
            attr = explainer(torch.randn(3, 4))
            del attr
            assert model.seen[-1]() is None, "the autograd graph outlived the explanation"
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------------
# the SDPA rule works one sample and a few heads at a time


def test_sdpa_relevance_is_the_same_in_chunks_of_one_head(monkeypatch):
    from lrpplan.rules import attention
    torch.manual_seed(9)
    q = torch.randn(2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)  # grouped-query
    v = torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    mask[..., 0, 1:] = float("-inf")

    def run():
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                             enable_gqa=True)
        assert "ScaledDotProduct" in type(o.grad_fn).__name__  # the fused node, not a decomposition
        return lrpplan.attribute(o.sum(-1), (q, k, v), cache=False).relevance

    monkeypatch.setattr(attention, "_CHUNK_ELEMENTS", {"cpu": 1 << 30})
    whole = run()
    monkeypatch.setattr(attention, "_CHUNK_ELEMENTS", {"cpu": 5 * 5 * 4})  # one sample a chunk
    samples = run()
    monkeypatch.setattr(attention, "_CHUNK_ELEMENTS", {"cpu": 1})  # one head per chunk
    heads = run()
    for chunked in (samples, heads):
        for a, b in zip(whole, chunked):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
