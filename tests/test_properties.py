"""Property-based tests over generated models (``lrpplan.testing`` + hypothesis).

Properties (DESIGN.md invariants 1-3 and the rules' closed forms):

- the conservation ledger closes on every model (Σ start = Σ at inputs + Σ absorbed);
- bias-free models (activations with f(0) = 0) without attention, under the ε-rule with
  ε = 1e-12 in float64, put ≥ 0.999 of the start relevance on the inputs; with attention,
  relevance is created or absorbed only at softmax nodes (the AttnLRP softmax rule is not
  conservative by design);
- relevance is finite;
- a replayed plan gives the relevance of a traced run (another batch size);
- the plan's msgpack round trip is exact;
- the fingerprint is equal for the same architecture with other weights and inputs, and differs
  when the structure differs (a random pair, and a one-block structural mutation);
- each sample of a batch gets the relevance it gets alone (float64);
- the ε-rule of a single linear / convolution layer equals a float64 closed form written here.

The hypothesis profile comes from ``HYPOTHESIS_PROFILE`` (default ``"ci"``: derandomised, 40
examples per property); ``HYPOTHESIS_PROFILE=long`` runs 500 per property.

Known engine bugs: examples that hit them are rejected (not counted) by :func:`known_bugs`, and
each bug gets a deterministic minimal repro marked ``xfail(strict=True)``, so its fix shows up as
an XPASS (then delete the repro's mark and the entry in ``KNOWN_BUGS``). None is open now: the
repros below are regression tests of bugs these properties found.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from hypothesis import assume, given, reject
from hypothesis import strategies as st
from torch import nn

import lrpplan
from lrpplan import RuleSet
from lrpplan.plan import decode, encode
from lrpplan import testing as T
from lrpplan.testing import Architecture, Block

PROFILE = T.profile()

# ---------------------------------------------------------------------------------------------
# known engine bugs


def _walk(blocks) -> Iterator[Block]:
    for b in blocks:
        if b is None:
            continue
        yield b
        if isinstance(b, (T.Residual, T.Shared)):
            yield from _walk(b.body)


#: (reason, exception types, predicate on the architecture)
KNOWN_BUGS: list[tuple[str, tuple[type, ...], Callable[[Architecture], bool]]] = []


@contextlib.contextmanager
def known_bugs(arch: Architecture) -> Iterator[None]:
    """Reject the example when it fails with a known engine bug this architecture can hit."""
    try:
        yield
    except Exception as exc:
        for _reason, etype, applies in KNOWN_BUGS:
            if isinstance(exc, etype) and applies(arch):
                reject()
        raise


# ---------------------------------------------------------------------------------------------
# helpers


def model_and_inputs(data, arch: Architecture, dtype: torch.dtype, seed: int = 0, **kw):
    model = T.build(arch, dtype, seed=seed)
    return model, data.draw(T.inputs_for(model, **kw), label="inputs")


def relevances(attr) -> list[torch.Tensor]:
    rel = attr.relevance
    return [r for r in (rel if isinstance(rel, tuple) else (rel,)) if r is not None]


def explained_scores(model: nn.Module, inputs) -> torch.Tensor:
    """The argmax score per sample, as :func:`lrpplan.explain` selects it."""
    with torch.no_grad():
        out = model(*inputs)
    logits = out if out.dim() <= 2 else out[:, -1]
    return logits.max(-1).values


SOFTMAX_TYPES = ("SoftmaxBackward0", "SafeSoftmaxBackward0",
                 "ScaledDotProductFlashAttentionForCpuBackward0",
                 "ScaledDotProductFlashAttentionBackward0",
                 "ScaledDotProductEfficientAttentionBackward0",
                 "ScaledDotProductCudnnAttentionBackward0",
                 "ScaledDotProductFusedAttentionOverrideableBackward0")


def _has_attention(arch: Architecture) -> bool:
    return any(isinstance(b, T.Attention) for b in _walk(arch.blocks))


# ---------------------------------------------------------------------------------------------
# the architecture language itself


@PROFILE
@given(arch=T.architectures())
def test_repr_is_python_that_rebuilds_the_architecture(arch):
    namespace = {name: getattr(T, name) for name in T.__all__}
    assert eval(repr(arch), {"torch": torch}, namespace) == arch  # noqa: S307 - own repr
    shapes = arch.shapes()
    model = T.build(arch)
    out = model(*T.example_inputs(arch, batch=2))
    assert out.shape[-1] == arch.classes
    assert out.shape[1:-1] == shapes[-1][:-1]


# ---------------------------------------------------------------------------------------------
# conservation


PRESETS = st.sampled_from(["epsilon", "epsilon-plus", "epsilon-gamma", "epsilon-alpha2-beta1",
                           "zplus"])


@PROFILE
@given(arch=T.architectures(), dtype=T.dtypes(), data=st.data(), rules=PRESETS)
def test_ledger_closes(arch, dtype, data, rules):
    model, inputs = model_and_inputs(data, arch, dtype)
    target = data.draw(T.targets_for(arch, batch=inputs[0].shape[0]), label="target")
    with known_bugs(arch):
        attr = T.assert_conserves(model, *inputs, rules=rules, target=target)
    led = attr.ledger
    # the books are also consistent node by node: what the rows absorb is what is missing
    rows = T.ConservationReport(attr)
    assert math.isclose(sum(r.absorbed for r in rows), led.absorbed, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(led.start, float(attr.output.double().sum()), rel_tol=1e-5, abs_tol=1e-6)


@PROFILE
@given(arch=T.architectures(), dtype=T.dtypes(), data=st.data(), rules=PRESETS)
def test_relevance_is_finite(arch, dtype, data, rules):
    model, inputs = model_and_inputs(data, arch, dtype)
    with known_bugs(arch):
        attr = lrpplan.explain(model, *inputs, rules=rules, cache=False)
    for r in relevances(attr):
        assert torch.isfinite(r).all()
    assert math.isfinite(attr.ledger.absorbed)


@PROFILE
@given(arch=T.architectures(bias=False, exclude=("Attention",), activations=T.ZERO_PRESERVING),
       data=st.data())
def test_bias_free_models_put_the_start_relevance_on_the_inputs(arch, data):
    model, inputs = model_and_inputs(data, arch, torch.float64, batch=1)
    assume(float(explained_scores(model, inputs).abs().min()) > 1e-6)
    rules = RuleSet.preset("epsilon", epsilon=1e-12)
    with known_bugs(arch):
        T.assert_conserves(model, *inputs, rules=rules, tolerance=1e-8, min_input_share=0.999)


@st.composite
def with_attention(draw, bias=False):
    """A sequence architecture that starts with an attention block (then anything)."""
    arch = draw(T.architectures(families=("seq",), bias=bias, activations=T.ZERO_PRESERVING))
    dim = arch.shapes()[0][-1]
    heads = draw(st.sampled_from([h for h in range(1, dim + 1) if dim % h == 0]))
    masks = ["none", "causal", "bool"] + ([] if bias is False else ["float"])
    attn = T.Attention(dim, heads, draw(st.sampled_from(["sdpa", "explicit"])),
                       draw(st.sampled_from(masks)), bias=bool(bias))
    return dataclasses.replace(arch, blocks=(attn,) + arch.blocks)


@PROFILE
@given(arch=with_attention(bias=False), data=st.data())
def test_bias_free_attention_changes_relevance_only_at_softmax(arch, data):
    """The AttnLRP softmax rule ``x ⊙ (R − s·ΣR)`` is not conservative by design; in a bias-free
    model (zero-preserving activations) with a negligible ε it is the only place where relevance
    is created or absorbed."""
    model, inputs = model_and_inputs(data, arch, torch.float64)
    assume(float(explained_scores(model, inputs).abs().min()) > 1e-3)
    rules = RuleSet.preset("epsilon", epsilon=1e-12)
    with known_bugs(arch):
        report = T.conservation_report(model, *inputs, rules=rules)
    scale = max([abs(report.start)] + [abs(r.inflow) for r in report])
    leaks = [r for r in report if abs(r.absorbed) > 1e-6 * scale
             and r.node_type not in SOFTMAX_TYPES]
    assert not leaks, f"relevance absorbed outside softmax nodes:\n{report}"
    assert abs(report.residual) <= 1e-8 * max(scale, 1.0)


# ---------------------------------------------------------------------------------------------
# plans: replay, codec, fingerprint


@PROFILE
@given(arch=T.architectures(), dtype=T.dtypes(), data=st.data(), rules=PRESETS)
def test_replay_matches_trace(arch, dtype, data, rules):
    model, inputs = model_and_inputs(data, arch, dtype, min_batch=2)
    with known_bugs(arch):
        T.assert_replay_matches_trace(model, *inputs, rules=rules,
                                      seed=data.draw(st.integers(0, 2**16), label="seed"))


@PROFILE
@given(arch=T.architectures(), data=st.data())
def test_plan_msgpack_round_trip_is_exact(arch, data):
    model, inputs = model_and_inputs(data, arch, torch.float32)
    with known_bugs(arch):
        plan = lrpplan.explain(model, *inputs, cache=False).plan
    data_bytes = encode(plan)
    again = decode(data_bytes)
    assert again == plan
    assert encode(again) == data_bytes


@PROFILE
@given(arch=T.architectures(), dtype=T.dtypes(), data=st.data())
def test_fingerprint_ignores_weights_inputs_and_batch_size(arch, dtype, data):
    m1, x1 = model_and_inputs(data, arch, dtype, seed=1, min_batch=2)
    m2, x2 = model_and_inputs(data, arch, dtype, seed=2, min_batch=2)
    with known_bugs(arch):
        k1 = lrpplan.explain(m1, *x1, cache=False).plan_key
        k2 = lrpplan.explain(m2, *x2, cache=False).plan_key
    assert k1 == k2


def plan_key(data, arch: Architecture) -> str:
    model, inputs = model_and_inputs(data, arch, torch.float32, min_batch=2)
    with known_bugs(arch):
        return lrpplan.explain(model, *inputs, cache=False).plan_key


@PROFILE
@given(a=T.architectures(), b=T.architectures(), data=st.data())
def test_fingerprint_differs_between_structures(a, b, data):
    assume(a.structure() != b.structure())
    assert plan_key(data, a) != plan_key(data, b)


def _toggle_bias(b: Block) -> Optional[Block]:
    if isinstance(b, (T.Linear, T.Conv2d, T.LayerNorm, T.GatedMLP, T.Attention)):
        return dataclasses.replace(b, bias=not b.bias)
    return None


def mutations(arch: Architecture) -> list[Architecture]:
    """Architectures one structural edit away from ``arch`` (valid by construction)."""
    out: list[Architecture] = []
    blocks = list(arch.blocks)
    shapes = arch.shapes()
    for i, blk in enumerate(blocks):
        def put(new_blocks):
            out.append(dataclasses.replace(arch, blocks=tuple(new_blocks)))
        put(blocks[:i] + [T.Act("relu")] + blocks[i:])  # insert an activation
        if shapes[i + 1] == shapes[i]:
            put(blocks[:i] + blocks[i + 1:])  # drop a shape-preserving block
        if isinstance(blk, T.Act):
            for fn in T.ACTIVATIONS:
                if fn != blk.fn:
                    put(blocks[:i] + [T.Act(fn)] + blocks[i + 1:])
        if isinstance(blk, T.Attention):
            for impl in ("sdpa", "explicit"):
                for mask in ("none", "causal", "bool", "float"):
                    put(blocks[:i] + [dataclasses.replace(blk, impl=impl, mask=mask)]
                        + blocks[i + 1:])
        if isinstance(blk, T.LayerNorm):
            put(blocks[:i] + [T.RMSNorm(blk.dim)] + blocks[i + 1:])
        toggled = _toggle_bias(blk)
        if toggled is not None:
            put(blocks[:i] + [toggled] + blocks[i + 1:])
    out.append(dataclasses.replace(arch, blocks=tuple(blocks) + (T.Act("tanh"),)))
    out.append(dataclasses.replace(arch, head=_toggle_bias(arch.head)))
    return out


@PROFILE
@given(arch=T.architectures(), data=st.data())
def test_fingerprint_differs_after_a_structural_edit(arch, data):
    other = data.draw(st.sampled_from(mutations(arch)), label="mutated")
    assume(other.structure() != arch.structure())
    assert plan_key(data, arch) != plan_key(data, other)


# ---------------------------------------------------------------------------------------------
# batches


@PROFILE
@given(arch=T.architectures(), data=st.data())
def test_each_sample_gets_the_relevance_it_gets_alone(arch, data):
    """Float64, ε = 1e-12: PyTorch may record another graph for a single sample (a Linear on a
    non-contiguous 3-D input is ``addmm`` at batch 1 but ``mm`` + bias ``add`` at batch 2, so
    the ε stabiliser is applied once or twice); with a negligible ε both must agree."""
    model, inputs = model_and_inputs(data, arch, torch.float64, min_batch=2, max_batch=3)
    batch = inputs[0].shape[0]
    target = data.draw(T.targets_for(arch, batch=batch), label="target")
    rules = RuleSet.preset("epsilon", epsilon=1e-12)
    with known_bugs(arch):
        whole = lrpplan.explain(model, *inputs, target=target, rules=rules, cache=False)
        per = whole.target.tolist()
        for i in range(batch):
            alone = lrpplan.explain(model, *(x[i:i + 1] for x in inputs), target=[per[i]],
                                    rules=rules, cache=False)
            for rw, ra in zip(relevances(whole), relevances(alone)):
                scale = float(rw.abs().max()) + 1e-30
                torch.testing.assert_close(rw[i:i + 1], ra, rtol=1e-7, atol=1e-9 * scale)


# ---------------------------------------------------------------------------------------------
# single layers against float64 closed forms (independent of lrpplan)


def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def linear_reference(x, w, b, r, eps):
    """ε-rule: R_x[..., i] = x_i Σ_j w_ji R_j / (z_j + ε sign z_j), z = x wᵀ + b."""
    z = x @ w.T + (0 if b is None else b)
    s = r / _stab(z, eps)
    return x * (s @ w)


def conv_reference(x, w, b, r, eps, stride, padding, groups):
    """ε-rule for a convolution written with unfold/fold (explicit patches, no autograd)."""
    n, c, h, wd = x.shape
    co, cg, kh, kw = w.shape
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # [n, c*kh*kw, L]
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (wd + 2 * padding - kw) // stride + 1
    out_cols = []
    grads = []
    og = co // groups
    for g in range(groups):
        xg = cols[:, g * cg * kh * kw:(g + 1) * cg * kh * kw]  # [n, cg*k*k, L]
        wg = w[g * og:(g + 1) * og].reshape(og, -1)  # [og, cg*k*k]
        z = torch.einsum("ok,nkl->nol", wg, xg)
        if b is not None:
            z = z + b[g * og:(g + 1) * og].view(1, -1, 1)
        s = r[:, g * og:(g + 1) * og].reshape(n, og, -1) / _stab(z, eps)
        contrib = xg * torch.einsum("ok,nol->nkl", wg, s)  # relevance per patch entry
        grads.append(contrib)
        out_cols.append(z)
    contrib = torch.cat(grads, dim=1)
    assert oh * ow == contrib.shape[-1]
    return F.fold(contrib, (h, wd), (kh, kw), padding=padding, stride=stride)


EPSILONS = st.sampled_from([1e-6, 1e-3, 0.1, 1.0])


@PROFILE
@given(d_in=st.integers(1, 9), d_out=st.integers(1, 9), bias=st.booleans(), eps=EPSILONS,
       lead=st.sampled_from([(3,), (2, 4), (1,)]), seed=st.integers(0, 2**16))
def test_linear_epsilon_rule_matches_closed_form(d_in, d_out, bias, eps, lead, seed):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=bias).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d_out, d_in, generator=g, dtype=torch.float64))
        if bias:
            layer.bias.copy_(torch.randn(d_out, generator=g, dtype=torch.float64))
    x = torch.randn(*lead, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(*lead, d_out, generator=g, dtype=torch.float64)
    attr = lrpplan.attribute(layer(x), x, seed=r, rules=RuleSet.preset("epsilon", epsilon=eps),
                             cache=False)
    ref = linear_reference(x.detach(), layer.weight.detach(),
                           layer.bias.detach() if bias else None, r, eps)
    torch.testing.assert_close(attr.relevance, ref, rtol=1e-9, atol=1e-12)


@PROFILE
@given(c_in=st.integers(1, 4), c_out_per=st.integers(1, 3), groups=st.sampled_from([1, 2]),
       k=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 1),
       h=st.integers(3, 6), w=st.integers(3, 6), bias=st.booleans(), eps=EPSILONS,
       seed=st.integers(0, 2**16))
def test_conv2d_epsilon_rule_matches_closed_form(c_in, c_out_per, groups, k, stride, padding,
                                                 h, w, bias, eps, seed):
    c_in = c_in * groups
    c_out = c_out_per * groups
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, groups=groups, bias=bias).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
        if bias:
            conv.bias.copy_(torch.randn(c_out, generator=g, dtype=torch.float64))
    x = torch.randn(2, c_in, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    r = torch.randn(out.shape, generator=g, dtype=torch.float64)
    attr = lrpplan.attribute(out, x, seed=r, rules=RuleSet.preset("epsilon", epsilon=eps),
                             cache=False)
    ref = conv_reference(x.detach(), conv.weight.detach(), conv.bias.detach() if bias else None,
                         r, eps, stride, padding, groups)
    torch.testing.assert_close(attr.relevance, ref, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# deterministic minimal repros of the known engine bugs


def test_bias_free_conv_output_is_recoverable():
    """Regression (found by these properties): a consumer of a bias-free convolution's output
    that needs its value (mean, add, avg-pool) recomputes it through a Promise."""
    conv = nn.Conv2d(3, 2, 1, bias=False)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = conv(x).mean((2, 3)).sum()
    attr = lrpplan.attribute(out, x, rules=RuleSet.preset("epsilon", epsilon=1e-12),
                             cache=False)
    # bias-free, linear: everything reaches the input
    assert math.isclose(float(attr.relevance.double().sum()), float(out.detach()), rel_tol=1e-4)


def test_repro_index_with_leading_full_dims_is_replayed_correctly():
    x = torch.randn(2, 3, 4, requires_grad=True)
    y = x[..., torch.tensor([0, 2])]
    out = y.mean((1, 2)).sum()  # Mean needs y's value: a Promise replays the indexing
    attr = lrpplan.attribute(out, x, rules=RuleSet.preset("epsilon", epsilon=1e-12),
                             cache=False)
    expected = torch.zeros(2, 3, 4)
    expected[..., [0, 2]] = x.detach()[..., [0, 2]] / 6  # mean over 6 entries per sample
    torch.testing.assert_close(attr.relevance, expected)


def test_adaptive_avg_pool_of_a_permuted_tensor():
    """Regression (found by these properties): F.adaptive_avg_pool2d(x, 1) of a non-contiguous
    tensor records mean + AsStridedBackward1."""
    x = torch.randn(2, 1, 2, 4, requires_grad=True)
    out = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), 1).flatten(1)  # [2, 4]: means over (1, 2)
    attr = lrpplan.attribute(out, x, rules=RuleSet.preset("epsilon", epsilon=1e-12),
                             cache=False)
    # seed = output: each output mean(x[..., c]) spreads over its two entries as x / 2
    torch.testing.assert_close(attr.relevance, x.detach() / 2)


def test_repro_select_with_a_negative_index_is_replayed():
    x = torch.randn(2, 3, 4, requires_grad=True)
    y = x[:, -1]
    out = (y + torch.relu(y)).sum()  # the add needs y's value: a Promise replays the select
    attr = lrpplan.attribute(out, x, rules=RuleSet.preset("epsilon", epsilon=1e-12),
                             cache=False)
    expected = torch.zeros(2, 3, 4)
    expected[:, -1] = x.detach()[:, -1] + torch.relu(x.detach()[:, -1])  # z-rule, identity relu
    torch.testing.assert_close(attr.relevance, expected)
