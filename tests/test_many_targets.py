"""Many targets in one replay (issue 16): ``target`` of shape ``[B, K]`` (or ``[B, K, 2]``
(position, token) pairs, or a callable returning ``[B, K]``).

The reference is independent of the batched path: K explanations of one target each (the
single-target path the rest of the suite checks against closed forms and gradients). Every
test compares relevance (fp32 ≤ 1e-5, fp64 ≤ 1e-10 relative) and each target's ledger:

- across the zoo's model families (CNNs, residual, norms, attention, embeddings) and presets;
- K is no structure: a K-target call replays the plan a one-target call compiled (same key);
- ``chunk`` splits K without changing a number;
- a plan that cannot be vmapped (a node's own backward, a fused RNN) replays once per target;
- sequence outputs with per-target positions, target callables, bad targets.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpplan
from lrpplan.errors import InvalidInputError
from lrpplan.many import vmappable

from models import MODELS

K = 3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(*inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _per_sample_models():
    """Zoo models with ``[B, C]`` or ``[B, T, C]`` outputs, C ≥ K."""
    out = []
    for name, factory in sorted(MODELS.items()):
        model, inputs = factory()
        logits = _logits(model, inputs)
        if logits.dim() in (2, 3) and logits.shape[-1] >= K:
            out.append(name)
    return out


def assert_equals_one_by_one(model, inputs, target, rules=None, chunk=None, dtype=None):
    """The K-target explanation equals K one-target explanations, relevance and ledgers."""
    many = lrpplan.explain(model, *inputs, target=target, rules=rules, cache=False,
                           chunk=chunk)
    rel = many.relevance if isinstance(many.relevance, tuple) else (many.relevance,)
    t = torch.as_tensor(target)
    assert many.output.shape == t.shape[:2] and len(many.ledgers) == t.shape[1]
    for k in range(t.shape[1]):
        one = lrpplan.explain(model, *inputs, target=t[:, k], rules=rules, cache=False)
        ref = one.relevance if isinstance(one.relevance, tuple) else (one.relevance,)
        for got, want in zip(rel, ref):
            if want is None:
                assert got is None
                continue
            assert got.shape == (want.shape[0], t.shape[1]) + tuple(want.shape[1:])
            assert rel_err(got[:, k], want) <= tol(dtype or want.dtype), k
        led = many.ledgers[k]
        assert led.start == pytest.approx(one.ledger.start, rel=1e-9, abs=1e-12)
        assert led.at_inputs == pytest.approx(one.ledger.at_inputs, rel=1e-5, abs=1e-8)
        assert led.absorbed == pytest.approx(one.ledger.absorbed, rel=1e-5, abs=1e-8)
        assert led.closes()
        torch.testing.assert_close(many.output[:, k], one.output)
    total = many.ledger
    assert total.start == pytest.approx(sum(led.start for led in many.ledgers), rel=1e-9,
                                        abs=1e-12)
    assert total.closes()
    return many


@pytest.mark.parametrize("name", _per_sample_models())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_many_targets_equal_one_by_one_across_the_zoo(name, dtype):
    model, inputs = MODELS[name]()
    model = model.to(dtype)
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    target = _logits(model, inputs)
    target = (target if target.dim() == 2 else target[:, -1]).topk(K, -1).indices
    assert_equals_one_by_one(model, inputs, target, dtype=dtype)


@pytest.mark.parametrize("preset", ["epsilon", "epsilon-plus", "epsilon-alpha2-beta1",
                                    "epsilon-gamma-box", "epsilon-plus-flat", "zplus",
                                    "attnlrp", "cp-lrp"])
@pytest.mark.parametrize("name", ["resnet_block", "sdpa_attention_causal", "vgg_cnn"])
def test_many_targets_equal_one_by_one_across_presets(name, preset):
    model, inputs = MODELS[name]()
    model, inputs = model.double(), tuple(x.double() if x.is_floating_point() else x
                                          for x in inputs)
    logits = _logits(model, inputs)
    target = (logits if logits.dim() == 2 else logits[:, -1]).topk(K, -1).indices
    params = {"low": -3.0, "high": 3.0} if preset == "epsilon-gamma-box" else {}
    assert_equals_one_by_one(model, inputs, target,
                             rules=lrpplan.RuleSet.preset(preset, **params))


def test_k_is_no_structure_and_chunks_change_nothing():
    model, inputs = MODELS["resnet_block"]()
    model = model.double()
    x = inputs[0].double()
    target = _logits(model, (x,)).topk(K, -1).indices
    explainer = lrpplan.Explainer(model, cache=False)
    one = explainer(x, target=target[:, 0])
    many = explainer(x, target=target)
    assert not one.cached and many.cached and many.plan_key == one.plan_key
    for chunk in (1, 2):
        chunked = lrpplan.Explainer(model, cache=False, chunk=chunk)
        chunked(x, target=target[:, 0])
        got = chunked(x, target=target)
        assert got.cached
        assert torch.equal(got.relevance, many.relevance)
    with pytest.raises(InvalidInputError, match="chunk"):
        lrpplan.Explainer(model, chunk=0)


def test_more_targets_than_the_default_chunk():
    from lrpplan.many import DEFAULT_CHUNK

    torch.manual_seed(0)
    k = DEFAULT_CHUNK + 5
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, k)).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    target = torch.stack([torch.randperm(k) for _ in range(3)])  # every class, shuffled per row
    grouped = lrpplan.explain(model, x, target=target, cache=False)  # two vmapped replays
    whole = lrpplan.explain(model, x, target=target, cache=False, chunk=None)
    assert grouped.relevance.shape == (3, k, 6)
    torch.testing.assert_close(grouped.relevance, whole.relevance, rtol=0, atol=1e-12)
    for j in (0, DEFAULT_CHUNK - 1, DEFAULT_CHUNK, k - 1):  # both sides of the group boundary
        one = lrpplan.explain(model, x, target=target[:, j], cache=False)
        torch.testing.assert_close(grouped.relevance[:, j], one.relevance, rtol=1e-10, atol=1e-12)


class _Writes(nn.Module):
    """A write into a slice (``CopySlices``: its gradient is the node's own backward)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        h = self.lin(x).clone()
        h[:, :2] = 0.0
        return h


def test_a_plan_that_cannot_be_vmapped_replays_once_per_target():
    model = _Writes().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    first = lrpplan.explain(model, x, cache=False)
    assert not vmappable(first.plan)
    assert_equals_one_by_one(model, (x,), torch.tensor([[2, 3, 5]] * 3))


def test_sequence_outputs_take_position_token_pairs():
    torch.manual_seed(0)
    model, inputs = MODELS["sdpa_attention_causal"]()
    model = model.double()
    x = inputs[0].double()
    logits = _logits(model, (x,))
    assert logits.dim() == 3
    b, steps, classes = logits.shape
    pairs = torch.stack([torch.randint(0, steps, (b, 4)), torch.randint(0, classes, (b, 4))], -1)
    many = lrpplan.explain(model, x, target=pairs, cache=False)
    assert many.relevance.shape == (b, 4) + tuple(x.shape[1:])
    for k in range(4):
        pos, tok = pairs[:, k, 0], pairs[:, k, 1]
        one = lrpplan.explain(model, x, target=lambda out: out[torch.arange(b), pos, tok],
                              cache=False)
        assert rel_err(many.relevance[:, k], one.relevance) <= 1e-10
        # causal: nothing after the explained position
        for i in range(b):
            assert torch.equal(many.relevance[i, k, pos[i] + 1:],
                               torch.zeros_like(many.relevance[i, k, pos[i] + 1:]))


def test_a_target_callable_may_return_k_scores():
    model, inputs = MODELS["vgg_cnn"]()
    model, x = model.double(), inputs[0].double()
    many = lrpplan.explain(model, x, target=lambda out: out[:, [0, 4]] - out[:, [1, 1]],
                           cache=False)
    for k, (a, c) in enumerate([(0, 1), (4, 1)]):
        one = lrpplan.explain(model, x, target=lambda out: out[:, a] - out[:, c], cache=False)
        assert rel_err(many.relevance[:, k], one.relevance) <= 1e-10


@pytest.mark.parametrize("target, match", [
    ([[0, 1], [2]], "cannot read target"),            # ragged
    (torch.tensor([[0.5, 1.0], [1.0, 2.0]]), "integer"),
    (torch.tensor([[0, 9], [1, 2]]), "out of range"),
    (torch.zeros(3, 2, dtype=torch.long), r"\(3, 2\) targets for a batch of 2"),
])
def test_bad_k_targets_are_errors(target, match):
    model, inputs = MODELS["vgg_cnn"]()
    with pytest.raises(InvalidInputError, match=match):
        lrpplan.explain(model, *inputs, target=target, cache=False)


def test_bad_position_token_pairs_are_errors():
    model, inputs = MODELS["sdpa_attention_causal"]()
    steps = _logits(model, inputs).shape[1]
    with pytest.raises(InvalidInputError, match="positions"):
        lrpplan.explain(model, *inputs, target=torch.tensor([[[steps, 0]], [[0, 0]]]),
                        cache=False)
