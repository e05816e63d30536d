"""Mixture-of-experts (issue 15): the grouped matrix product and the transformers 5 MoE layers.

References, none of them lrpplan's own code:

- the grouped product's ε-rule against a float64 closed form written per group,
  ``R_x = x ⊙ Wᵀ(R / stab(xW))`` (and the weight side, and the uniform rule when both operands
  are explained), for every operand layout of ``torch._grouped_mm``, with empty groups and
  rows past the last offset;
- LRP-0 = gradient × input on a bias-free routed ReLU network built from grouped products, with
  the router's gate held constant (the documented router rule: signal-take-all), written
  densely with one weight per token in float64;
- the transformers MoE models (Qwen2-MoE, Qwen3-MoE, Mixtral, gpt-oss; random weights, 2 layers,
  hidden 32, 4 experts, top-2, vocabulary 100) in their default experts implementation
  (``grouped_mm``) and the per-expert loop (``eager``): trace, replay = trace, a fresh trace,
  finite relevance, the ledger closes without leaks;
- routing depends on values: a plan compiled on one input replays on inputs whose tokens go
  to other experts (other group sizes, other sequence lengths) and equals a fresh trace there.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lrpplan
from lrpplan import RuleSet
from lrpplan import testing as T
from lrpplan.rules import get_rule
from lrpplan.testing import rule_inputs

F32_REPLAY = 1e-5     # replay vs trace, float32 (README invariant 1)
F64 = 1e-12           # the rule in float64 against its closed form


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = float(ref.double().abs().max())
    return float((got.double() - ref.double()).abs().max()) / max(scale, 1e-300)


def stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def offsets(counts) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


# ---------------------------------------------------------------------------------------------
# the grouped product's rule against a per-group closed form (float64)

#: layout -> (shape of a, shape of b, group sizes along the grouped dim, its length)
LAYOUTS = {
    # rows of a grouped (the MoE forward); an empty group; 2 rows past the last offset
    "rows": ((11, 8), (4, 8, 12), [3, 0, 4, 2], 11),
    # columns of b grouped
    "cols": ((4, 6, 8), (8, 12), [4, 0, 4, 4], 12),
    # the shared dim grouped (weight gradients)
    "shared": ((6, 12), (12, 8), [4, 4, 0, 4], 12),
    # 3-D × 3-D: a batched product, no offsets
    "batched": ((3, 4, 8), (3, 8, 4), None, 3),
}


def _groups(layout, counts):
    if counts is None:  # batched: group g is batch entry g
        return [(g, g + 1) for g in range(LAYOUTS[layout][3])]
    ends = torch.tensor(counts).cumsum(0).tolist()
    return list(zip([0] + ends[:-1], ends))


def closed_form(layout, a, b, r, counts, eps, explained):
    """Per group g the ε-rule of ``z_g = a_g b_g``: ``R_a = a ⊙ (R/stab(z)) b_gᵀ``,
    ``R_b = b ⊙ a_gᵀ (R/stab(z))``; ``explained="both"``: half of each (AttnLRP's uniform
    rule). Positions no group covers get nothing. Returns (R_a, R_b, absorbed)."""
    ra, rb = torch.zeros_like(a), torch.zeros_like(b)
    half = 0.5 if explained == "both" else 1.0
    for g, (s, e) in enumerate(_groups(layout, counts)):
        if e == s:
            continue
        if layout == "rows":
            ag, bg, rg = a[s:e], b[g], r[s:e]
        elif layout == "cols":
            ag, bg, rg = a[g], b[:, s:e], r[:, s:e]
        elif layout == "shared":
            ag, bg, rg = a[:, s:e], b[s:e], r[g]
        else:
            ag, bg, rg = a[g], b[g], r[g]
        q = rg / stab(ag @ bg, eps)
        pa, pb = half * ag * (q @ bg.T), half * bg * (ag.T @ q)
        if layout == "rows":
            ra[s:e] += pa
            rb[g] += pb
        elif layout == "cols":
            ra[g] += pa
            rb[:, s:e] += pb
        elif layout == "shared":
            ra[:, s:e] += pa
            rb[s:e] += pb
        else:
            ra[g] += pa
            rb[g] += pb
    sent = (ra.sum() if explained != "b" else 0.0) + (rb.sum() if explained != "a" else 0.0)
    return ra, rb, float(r.sum() - sent)


@pytest.mark.parametrize("explained", ["a", "b", "both"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("eps", [1e-6, 0.3])
def test_grouped_mm_rule_matches_closed_form(layout, explained, eps):
    """The ``linear`` rule at a grouped product, run in float64 on the live node, is the
    per-group ε-rule; Σ sent + absorbed = Σ received."""
    g = torch.Generator().manual_seed(3)
    sa, sb, counts, _ = LAYOUTS[layout]
    a = torch.randn(sa, generator=g).requires_grad_(True)
    b = torch.randn(sb, generator=g).requires_grad_(True)
    z = torch._grouped_mm(a, b, offs=None if counts is None else offsets(counts))
    node = z.grad_fn
    r = torch.randn(z.shape, generator=g, dtype=torch.float64)
    a64, b64 = a.detach().double(), b.detach().double()
    mode = {"a": "a", "b": "b", "both": "bilinear"}[explained]
    x, p = rule_inputs(node, "linear", {0: a64, 1: b64}, mode=mode, epsilon=eps,
                       send=[explained != "b", explained != "a"])
    got_a, got_b, absorbed = get_rule("linear").run([r], x, p)
    want_a, want_b, want_absorbed = closed_form(layout, a64, b64, r, counts, eps, explained)
    if explained != "b":
        assert got_a.shape == a.shape and rel_err(got_a, want_a) <= F64
    else:
        assert got_a is None
    if explained != "a":
        assert got_b.shape == b.shape and rel_err(got_b, want_b) <= F64
    else:
        assert got_b is None
    assert abs(float(absorbed) - want_absorbed) <= F64 * float(r.abs().sum())
    if layout == "rows":  # rows past the last offset: nothing reaches them
        assert explained == "b" or bool((got_a[sum(counts):] == 0).all())


@pytest.mark.parametrize("eps", [1e-6, 0.3])
def test_grouped_mm_epsilon_through_attribute(eps):
    """End to end on a float32 graph: ``attribute`` through one grouped product gives the
    float64 closed form to float32 round-off, and the ledger closes."""
    g = torch.Generator().manual_seed(5)
    sa, sb, counts, _ = LAYOUTS["rows"]
    counts = counts[:-1] + [counts[-1] + 2]  # every row in a group
    x = torch.randn(sa, generator=g).requires_grad_(True)
    w = nn.Parameter(torch.randn(sb, generator=g))
    z = torch._grouped_mm(x, w, offs=offsets(counts))
    r = torch.randn(z.shape, generator=g)
    got = lrpplan.attribute(z, x, seed=r, rules=RuleSet.preset("epsilon", epsilon=eps),
                            cache=False)
    want, _, _ = closed_form("rows", x.detach().double(), w.detach().double(), r.double(),
                             counts, eps, "a")
    assert rel_err(got.relevance, want) <= 1e-5
    assert got.ledger.closes() and got.ledger.leaks() == []


# ---------------------------------------------------------------------------------------------
# a routed ReLU network of grouped products: LRP-0 = gradient × input, the gate held constant


class RoutedReLU(nn.Module):
    """A bias-free MoE layer written the way transformers' ``grouped_mm`` experts are: router
    logits → softmax → top-k → renormalise; tokens sorted by expert, gathered, two grouped
    products with a ReLU between, scaled by their gate, unsorted, summed over the top-k."""

    def __init__(self, d: int = 8, hidden: int = 12, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.k, self.experts = k, experts
        self.router = nn.Parameter(torch.randn(experts, d, generator=g))
        self.w1 = nn.Parameter(torch.randn(experts, d, hidden, generator=g) / d ** 0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, d, generator=g) / hidden ** 0.5)

    def route(self, x):
        logits = x @ self.router.T
        top, idx = torch.softmax(logits, -1).topk(self.k, -1)
        return logits, top / top.sum(-1, keepdim=True), idx

    def forward(self, x, with_logits: bool = False):   # x: [T, d]
        logits, gates, idx = self.route(x)
        ids, perm = idx.reshape(-1).sort()
        counts = torch.bincount(ids, minlength=self.experts)
        offs = counts.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x[perm // self.k], self.w1, offs=offs).relu()
        y = torch._grouped_mm(h, self.w2, offs=offs) * gates.reshape(-1)[perm].unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        out = y[inv].view(x.shape[0], self.k, -1).sum(1)
        return (out, logits) if with_logits else out


def routed_reference(m: RoutedReLU, x: torch.Tensor) -> torch.Tensor:
    """Gradient × input in float64 of ``Σ_t Σ_k g_tk relu(x_t W1[e_tk]) W2[e_tk]``, the gates
    ``g`` detached, written with one weight matrix per (token, slot): no grouping, no sort."""
    x64 = x.detach().double().requires_grad_(True)
    with torch.no_grad():
        _, gates, idx = m.route(x.detach())
    w1, w2 = m.w1.detach().double()[idx], m.w2.detach().double()[idx]    # [T, k, ., .]
    h = torch.einsum("td,tkdh->tkh", x64, w1).relu()
    y = torch.einsum("tkh,tkhe->tke", h, w2) * gates.double().unsqueeze(-1)
    (grad,) = torch.autograd.grad(y.sum(), x64)
    return grad * x64.detach()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_routed_grouped_relu_lrp0_equals_gradient_times_input(seed):
    """LRP-0 on a bias-free ReLU network of grouped products is gradient × input; the router
    (a softmax gate × the expert signal) gets no relevance: the gate is held constant."""
    m = RoutedReLU()
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    out, logits = m(x, with_logits=True)
    lrp0 = RuleSet.preset("epsilon", epsilon=1e-9)  # negligible against |z| ~ 1 in float32
    got = lrpplan.attribute(out, [x, logits], rules=lrp0, cache=False)
    rel_x, rel_logits = got.relevance
    want = routed_reference(m, x)
    assert rel_err(rel_x, want) <= 1e-5
    assert float(rel_x.sum()) == pytest.approx(float(out.detach().sum()), rel=1e-5)
    assert bool((rel_logits == 0).all())      # the router's logits receive nothing
    assert got.ledger.closes() and got.ledger.leaks() == []


# ---------------------------------------------------------------------------------------------
# the transformers 5 MoE models

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

COMMON = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
              use_cache=False, initializer_range=0.2)


def _config(name: str):
    tf = transformers
    if name == "qwen2_moe":
        return tf.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=16, shared_expert_intermediate_size=32)
    if name == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=16, head_dim=8)
    if name == "mixtral":
        return tf.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    if name == "gpt_oss":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tf.GptOssConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                   head_dim=8)
    raise KeyError(name)


def build(name: str, impl: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    kw = {} if impl is None else {"experts_implementation": impl}
    model = transformers.AutoModelForCausalLM.from_config(_config(name), **kw).eval()
    assert model.config._experts_implementation == (impl or "grouped_mm")
    return model


class GptOssMoE(nn.Module):
    """gpt-oss's MoE block alone (router with bias, experts with biases, clamped SwiGLU), its
    token-mixed output as ``[B, T, C]`` logits through a bias-free head."""

    def __init__(self, impl: str) -> None:
        super().__init__()
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
        cfg = _config("gpt_oss")
        cfg._experts_implementation = impl
        torch.manual_seed(0)
        self.mlp = GptOssMLP(cfg)
        for p in self.mlp.parameters():
            nn.init.normal_(p, std=0.2)
        self.head = nn.Linear(32, 10, bias=False)

    def forward(self, x):
        return self.head(self.mlp(x)[0])


def grouped_nodes(model, *inputs) -> int:
    """How many grouped products the graph holds (the default implementation is exercised)."""
    z = torch._grouped_mm(torch.ones(4, 4, requires_grad=True), torch.ones(1, 4, 4),
                          offs=offsets([4]))
    kind = type(z.grad_fn).__name__
    return sum(r.count for r in lrpplan.coverage(model, *inputs).rows if r.node_type == kind)


def check_model(model, inputs, uses_grouped: bool):
    if uses_grouped:
        assert grouped_nodes(model, *inputs) == 4  # 2 layers × (up, down)
    ex = lrpplan.Explainer(model, cache=False, ledger="nodes")
    first, again = ex(*inputs), ex(*inputs)
    fresh = lrpplan.explain(model, *inputs, cache=False)
    assert not first.cached and again.cached
    assert rel_err(again.relevance, first.relevance) <= F32_REPLAY
    assert rel_err(fresh.relevance, first.relevance) <= F32_REPLAY
    assert bool(torch.isfinite(first.relevance).all())
    assert float(first.relevance.abs().sum()) > 0
    for attr in (first, again):
        assert attr.ledger.leaks() == []
        assert attr.ledger.closes()
    return first


MODELS = ["qwen2_moe", "qwen3_moe", "mixtral"]

#: the per-expert loop accumulates with ``index_add_`` into a ``zeros_like`` buffer (an untracked
#: constant written in place): forward replays take it as 0 (``OpSpec.zero_operands``), an
#: assumption the plan records
IMPLS = [pytest.param(None, id="grouped_mm"), pytest.param("eager", id="eager")]


@pytest.mark.zoo
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", MODELS)
def test_moe_model(name, impl):
    model = build(name, impl)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    attr = check_model(model, (ids,), uses_grouped=impl is None)
    assert attr.relevance.shape == ids.shape


@pytest.mark.zoo
@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_gpt_oss_moe_block(impl):
    model = GptOssMoE(impl).eval()
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2))
    attr = check_model(model, (x,), uses_grouped=False)
    assert attr.relevance.shape == x.shape
    assert attr.ledger.absorbed != 0  # the experts' and the router's biases absorb their shares


@pytest.mark.zoo
def test_gpt_oss_model():
    # its attention sinks compute `logits - logits.max(-1).values`: the max comes through the
    # forward replay of MaxBackward0
    model = build("gpt_oss")
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    check_model(model, (ids,), uses_grouped=True)


# ---------------------------------------------------------------------------------------------
# routing depends on values: nothing about it may be in a plan


def routing(model, ids) -> list[torch.Tensor]:
    """Per MoE layer, the experts each token goes to (top-k of the router logits, which the
    model returns; softmax and renormalisation keep the order)."""
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    k = model.config.num_experts_per_tok
    return [logits.topk(k, -1).indices.sort(-1).values for logits in out.router_logits]


def tokens_per_expert(model, ids) -> list[list[int]]:
    n = model.config.num_experts if hasattr(model.config, "num_experts") \
        else model.config.num_local_experts
    return [torch.bincount(r.reshape(-1), minlength=n).tolist() for r in routing(model, ids)]


@pytest.mark.zoo
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral"])
def test_plan_does_not_bake_in_routing(name, impl):
    """Same shapes, other tokens: other experts per token and other group sizes. The plan
    compiled on the first input replays on the second and equals a fresh trace there."""
    model = build(name, impl)
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, 100, (2, 7), generator=g)
    b = torch.randint(0, 100, (2, 7), generator=g)
    assert any(not torch.equal(x, y) for x, y in zip(routing(model, a), routing(model, b)))
    assert tokens_per_expert(model, a) != tokens_per_expert(model, b)   # other offsets
    ex = lrpplan.Explainer(model, cache=False, ledger="nodes")
    ex(a)
    got = ex(b)
    fresh = lrpplan.explain(model, b, cache=False)
    if impl is None:  # one graph structure for every routing: the plan is replayed
        assert got.cached
    assert rel_err(got.relevance, fresh.relevance) <= F32_REPLAY
    assert got.ledger.closes() and got.ledger.leaks() == []


@pytest.mark.zoo
@pytest.mark.parametrize("name", MODELS)
def test_moe_shape_invariance(name):
    """A plan compiled at one batch size / sequence length replays at others (routing changes
    with them) and equals a fresh trace, from memory and from the disk cache."""
    model = build(name)

    def make(batch, seq):
        return torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(seq))

    rows = T.assert_shape_invariance(model, make, [(1, 1), (2, 5), (1, 8)], first=[1],
                                     require_replay=True)
    assert max(r.error for r in rows) <= F32_REPLAY
