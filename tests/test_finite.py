"""Relevance is finite wherever the explained output is finite (issue 13, point 2).

- Left-padded decoder batches (the transformers default for generation): under SDPA the pad
  positions' query rows are fully masked; torch's kernels give them output 0, and so must the
  rule (no NaN), and the padded sample gets the relevance it gets alone.
- Fully masked SDPA rows (boolean and float masks, ``is_causal``) against a float64 closed form
  of the AttnLRP / CP-LRP decomposition written here, with exact zeros for what only masked
  rows and keys reach; the rule's own report of what it absorbs against the same closed form.
- Softmax over logits holding ``-inf`` (eager attention), also the math backend's safe softmax
  of fully masked rows, against the closed form ``x ⊙ (R − s ΣR)``.
- A non-finite value that still reaches a result raises :class:`lrpplan.NonFiniteError` naming
  the first node that produced it, on a traced and on a replayed plan.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lrpplan
from lrpplan.testing import rule_inputs
from lrpplan.graph import capture
from lrpplan.rules.base import RULES, Decision, Rule, get_rule, register_rule

DT = torch.float64
EPS = 1e-6


def stab(z, eps=EPS):
    return torch.where(z >= 0, z + eps, z - eps)


# ---------------------------------------------------------------------------------------------
# transformers: left-padded Llama batch


def _llama(impl: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_cache=False, attn_implementation=impl)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_left_padded_llama_batch_is_finite_and_equals_each_sample_alone(impl):
    model = _llama(impl)
    long = torch.tensor([5, 6, 7, 8, 9, 10])
    short = torch.tensor([11, 12, 13])
    pad = len(long) - len(short)
    ids = torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), short]), long])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    # under left padding the last position is the last real token of every sample
    alone_short = lrpplan.explain(model, short[None], cache=False)
    alone_long = lrpplan.explain(model, long[None], attention_mask=torch.ones(1, len(long),
                                                                              dtype=torch.long),
                                 cache=False)
    target = [int(alone_short.target[0]), int(alone_long.target[0])]
    attr = lrpplan.explain(model, ids, attention_mask=mask, target=target, cache=False)
    rel = attr.relevance
    assert torch.isfinite(rel).all(), f"{int(rel.isnan().sum())} NaN in the batch's relevance"
    # the padded sample's score is the one it has alone
    torch.testing.assert_close(attr.output[0], alone_short.output[0], rtol=1e-4, atol=1e-5)
    for got, alone in ((rel[0, pad:], alone_short.relevance[0]),
                       (rel[1], alone_long.relevance[0])):
        err = (got - alone).abs().max().item()
        assert err <= 1e-4 * max(1.0, alone.abs().max().item()), (got, alone)
    # pad positions are reached only through masked keys: nothing arrives there
    assert torch.equal(rel[0, :pad], torch.zeros(pad)), rel[0, :pad]
    assert attr.ledger.closes(), attr.ledger


# ---------------------------------------------------------------------------------------------
# fused SDPA with fully masked rows, against a float64 closed form


def sdpa_reference(q, k, v, keep, add, R, cp=False, eps=EPS):
    """AttnLRP (or CP-LRP) relevance (Rq, Rk, Rv) of SDPA with the keep pattern ``keep`` and an
    additive finite bias ``add``, written with explicit masks: a row with no key kept has
    attention weights 0 (and output 0), as in torch's kernels."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    u = (q @ k.transpose(-1, -2)) * scale
    x = torch.where(keep, u + add, torch.full_like(u, -math.inf))
    alive = keep.any(-1, keepdim=True)
    s = torch.where(alive, torch.softmax(torch.where(alive, x, torch.zeros_like(x)), -1)
                    * keep, torch.zeros_like(x))
    o = s @ v
    so = R / stab(o, eps)
    half = 1.0 if cp else 0.5
    Rv = half * v * (s.transpose(-1, -2) @ so)
    if cp:
        return torch.zeros_like(q), torch.zeros_like(k), Rv
    Rs = half * s * (so @ v.transpose(-1, -2))
    xf = torch.where(keep, u + add, torch.zeros_like(u))
    Rx = torch.where(keep, xf * (Rs - s * Rs.sum(-1, keepdim=True)), torch.zeros_like(u))
    Ru = torch.where(add != 0, u * Rx / stab(xf, eps), Rx)
    su = Ru / stab(u, eps)
    Rq = 0.5 * q * ((su @ k) * scale)
    Rk = 0.5 * k * ((su.transpose(-1, -2) @ q) * scale)
    return Rq, Rk, Rv


B, H, L, D = 2, 2, 5, 4


def _mask_case(kind: str):
    """(attn_mask, is_causal, keep [B,1,L,L], add [B,1,L,L], dead query rows, dead keys)."""
    torch.manual_seed(1)
    keep = torch.ones(B, 1, L, L, dtype=torch.bool)
    add = torch.zeros(B, 1, L, L, dtype=DT)
    dead_rows, dead_keys = [], []
    if kind == "causal":
        keep &= torch.ones(L, L, dtype=torch.bool).tril()
        return None, True, keep, add, dead_rows, dead_keys
    # sample 0: query row 1 masked entirely, key 3 masked for every query; sample 1: row 4
    keep[0, :, 1] = False
    keep[0, :, :, 3] = False
    keep[1, :, 4] = False
    dead_rows, dead_keys = [(0, 1), (1, 4)], [(0, 3)]
    if kind == "bool":
        return keep, False, keep, add, dead_rows, dead_keys
    bias = torch.randn(B, 1, L, L, dtype=DT)
    bias[..., ::2, :] = 0.0  # a float mask adds nothing on some rows
    add = torch.where(keep, bias, torch.zeros_like(bias))
    mask = torch.where(keep, bias, torch.full_like(bias, -math.inf))
    return mask, False, keep, add, dead_rows, dead_keys


@pytest.mark.parametrize("preset", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
def test_sdpa_fully_masked_rows_get_zero_and_the_rest_matches_a_closed_form(kind, preset):
    mask, causal, keep, add, dead_rows, dead_keys = _mask_case(kind)
    torch.manual_seed(2)
    q, k, v = (torch.randn(B, H, L, D, dtype=DT, requires_grad=True) for _ in range(3))
    c = torch.randn(B, H, L, D, dtype=DT)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    assert torch.isfinite(o).all()
    R = (c * o).detach()
    attr = lrpplan.attribute(o, [q, k, v], seed=R, rules=preset, cache=False)
    rel = attr.relevance
    for t in rel:
        assert torch.isfinite(t).all(), f"{int(t.isnan().sum())} NaN"
    ref = sdpa_reference(q.detach(), k.detach(), v.detach(), keep, add, R, cp=preset == "cp-lrp")
    for got, want in zip(rel, ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for b, row in dead_rows:  # a fully masked query reaches nothing
        assert torch.equal(rel[0][b, :, row], torch.zeros(H, D, dtype=DT))
    for b, key in dead_keys:  # nor does a key every query masks
        assert torch.equal(rel[1][b, :, key], torch.zeros(H, D, dtype=DT))
        assert torch.equal(rel[2][b, :, key], torch.zeros(H, D, dtype=DT))
    # the rule's own report of what it absorbs (ε shares, softmax residual, float-mask share)
    node = o.grad_fn
    rule = get_rule("sdpa")
    send = (preset != "cp-lrp",) * 2 + (True,) + (False,) * (len(node.next_functions) - 3)
    x, p = rule_inputs(node, "sdpa", send=send, epsilon=EPS,
                       attention="cp" if preset == "cp-lrp" else "attnlrp")
    assert rule.absorbs(p)
    with torch.no_grad():  # as the executor runs rules
        out = rule.run([R, None], x, p)
    assert len(out) == len(send) + 1
    absorbed = out[-1]
    assert absorbed.dim() == 0 and absorbed.dtype == DT
    want = R.sum() - sum(t.sum() for t in ref)
    torch.testing.assert_close(absorbed, want, rtol=1e-9, atol=1e-12)


def test_sdpa_fully_masked_rows_fp32_are_finite():
    """The fp32 path of the fused kernel (the dtype transformers runs in)."""
    mask, _, keep, *_ = _mask_case("bool")
    torch.manual_seed(3)
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    attr = lrpplan.attribute(o, [q, k, v], cache=False)
    for t in attr.relevance:
        assert torch.isfinite(t).all()
    assert torch.isfinite(torch.tensor(attr.ledger.absorbed))


# ---------------------------------------------------------------------------------------------
# softmax over -inf


def softmax_reference(x, s, R):
    """``x ⊙ (R − s ΣR)`` on the entries with weight, 0 on the masked ones."""
    live = s > 0
    xf = torch.where(live, x, torch.zeros_like(x))
    return torch.where(live, xf * (R - s * R.sum(-1, keepdim=True)), torch.zeros_like(x))


def test_softmax_with_minus_inf_logits_matches_the_closed_form():
    torch.manual_seed(4)
    logits = torch.randn(2, 3, 6, dtype=DT)
    masked = torch.zeros(2, 3, 6, dtype=torch.bool)
    masked[..., 0] = True
    masked[0, 1, :5] = True  # one entry left
    masked[1, 2, 2:4] = True
    x = logits.masked_fill(masked, -math.inf).requires_grad_(True)
    s = torch.softmax(x, -1)
    R = (torch.randn(2, 3, 6, dtype=DT) * s).detach()
    attr = lrpplan.attribute(s, x, seed=R, cache=False)
    assert torch.isfinite(attr.relevance).all()
    torch.testing.assert_close(attr.relevance, softmax_reference(x.detach(), s.detach(), R),
                               rtol=1e-12, atol=1e-14)
    assert torch.equal(attr.relevance[masked], torch.zeros(int(masked.sum()), dtype=DT))
    # the rule's report: the Taylor residual R (1 + Σ s x) − Σ x R, plus what reaches s = 0
    rule = get_rule("softmax")
    xs, p = rule_inputs(s.grad_fn, "softmax", {0: x.detach()}, send=(True,), logits="value")
    assert rule.absorbs(p)
    R2 = R + masked * 0.25  # relevance arriving at masked entries is dropped, and booked
    with torch.no_grad():
        out = rule.run([R2], xs, p)
    assert len(out) == 2 and out[1].dim() == 0
    want = R2.sum() - softmax_reference(x.detach(), s.detach(), R2).sum()
    torch.testing.assert_close(out[1], want, rtol=1e-12, atol=1e-12)


def test_math_backend_attention_with_fully_masked_rows():
    """Eager attention as torch's math backend runs it: additive -inf mask, safe softmax
    (fully masked rows get weight 0): finite, dead rows zero, equal to the fused kernel's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    mask, _, keep, add, dead_rows, dead_keys = _mask_case("bool")
    torch.manual_seed(5)
    q, k, v = (torch.randn(B, H, L, D, dtype=DT, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert "SafeSoftmaxBackward0" in capture([(o.grad_fn, 0)]).types
    R = o.detach() * 0.5
    attr = lrpplan.attribute(o, [q, k, v], seed=R, rules=lrpplan.RuleSet.preset("attnlrp",
                                                                              epsilon=1e-14),
                             cache=False)
    for t in attr.relevance:
        assert torch.isfinite(t).all()
    for b, row in dead_rows:
        assert torch.equal(attr.relevance[0][b, :, row], torch.zeros(H, D, dtype=DT))
    # ε → 0: the decomposed graph and the closed form agree
    ref = sdpa_reference(q.detach(), k.detach(), v.detach(), keep, add, R, eps=1e-14)
    for got, want in zip(attr.relevance, ref):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# NonFiniteError names the node


class _PoisonRule(Rule):
    """Test-only: identity, except that the first element of the relevance becomes NaN."""

    name = "test_poison_nan"

    def decide(self, info):
        return Decision(values=(), send=(info.live_inputs[0],) + (False,) * (info.n_inputs - 1))

    def run(self, rel, x, p):
        r = rel[0].clone()
        r.view(-1)[0] = math.nan
        return [r] + [None] * (len(p["send"]) - 1)


@pytest.fixture
def poison_rule():
    register_rule(_PoisonRule)
    try:
        yield _PoisonRule.name
    finally:
        RULES.pop(_PoisonRule.name, None)


def test_non_finite_relevance_raises_naming_the_first_node(poison_rule):
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    rules = lrpplan.RuleSet.preset("epsilon").override("ReluBackward0", poison_rule)
    x = torch.randn(2, 4, requires_grad=True)
    h1 = model[1](model[0](x))
    h2 = model[3](model[2](h1))
    out = model[4](h2)
    graph = capture([(out.grad_fn, 0)])
    # the ReLU nearest the output runs first; the other one only receives its NaN
    first = next(i for i, n in enumerate(graph.nodes) if n is h2.grad_fn)
    sound = lrpplan.attribute(out, x, cache=False)  # the same graph with sound rules
    assert torch.isfinite(sound.relevance).all()
    with pytest.raises(lrpplan.NonFiniteError) as info:
        lrpplan.attribute(out, x, rules=rules, cache=False)
    msg = str(info.value)
    assert "ReluBackward0" in msg and f"#{first} " in msg, msg
    assert info.value.node == first and info.value.node_type == "ReluBackward0"
    # a replayed plan reports the same node
    explainer = lrpplan.Explainer(model, rules=rules, cache=False)
    for cached in (False, True):
        with pytest.raises(lrpplan.NonFiniteError) as info:
            explainer(torch.randn(3, 4))
        assert info.value.node_type == "ReluBackward0", str(info.value)
        assert "ReluBackward0" in str(info.value)
