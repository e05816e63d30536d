"""What explain() explains is never guessed silently (issue 13, point 4).

References are independent of lrpplan: for bias-free ReLU networks with ε → 0 in float64,
LRP-0 equals gradient × input of the explained score.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lrpplan
from lrpplan.errors import InvalidInputError

TINY = lrpplan.RuleSet.preset("epsilon", epsilon=1e-12)


def _relu_net(out_features: int, flatten: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, out_features, bias=False)]
    if flatten:
        layers.append(nn.Flatten(0))
    return nn.Sequential(*layers).double().eval()


def _gxi(model, x, score_fn):
    x = x.detach().clone().requires_grad_(True)
    score = score_fn(model(x))
    grads = [torch.autograd.grad(s, x, retain_graph=True)[0][i] for i, s in enumerate(score)]
    return x.detach() * torch.stack(grads)


def test_one_score_per_sample_explains_every_sample():
    model = _relu_net(1, flatten=True)  # [B] regression output
    x = torch.randn(3, 5, dtype=torch.float64)
    attr = lrpplan.explain(model, x, rules=TINY, cache=False)
    ref = _gxi(model, x, lambda out: out)
    torch.testing.assert_close(attr.relevance, ref, rtol=1e-8, atol=1e-12)
    assert attr.output.shape == (3,)
    assert attr.target is None
    for i in range(3):  # every sample got its own relevance, not only the argmax sample
        assert attr.relevance[i].abs().sum() > 0


def test_one_score_per_sample_refuses_a_class_target():
    with pytest.raises(InvalidInputError, match="no class to pick"):
        lrpplan.explain(_relu_net(1, flatten=True), torch.randn(3, 5, dtype=torch.float64),
                        target=0, cache=False)


@pytest.mark.parametrize("target", [None, 1])
def test_segmentation_map_without_callable_is_an_error(target):
    model = nn.Conv2d(3, 4, 1).eval()
    with pytest.raises(InvalidInputError, match=r"\[B, C\] logits .*target=callable"):
        lrpplan.explain(model, torch.randn(2, 3, 5, 5), target=target, cache=False)


def test_segmentation_map_with_callable_target():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Conv2d(4, 2, 1, bias=False)).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    score = lambda out: out[:, 1].sum((1, 2))  # noqa: E731 - class 1's total logit
    attr = lrpplan.explain(model, x, target=score, rules=TINY, cache=False)
    torch.testing.assert_close(attr.relevance, _gxi(model, x, score), rtol=1e-6, atol=1e-9)


class _DictModel(nn.Module):
    def __init__(self, with_logits: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3, bias=False).double()
        self.with_logits = with_logits

    def forward(self, x):
        z = self.lin(x)
        out = {"loss": z.square().mean(), "scores": z}
        if self.with_logits:
            out["logits"] = z
        return out


def test_dict_without_logits_lists_its_keys():
    with pytest.raises(InvalidInputError, match=r"\['loss', 'scores'\]"):
        lrpplan.explain(_DictModel(False).eval(), torch.randn(2, 5, dtype=torch.float64),
                        cache=False)


def test_tuple_output_is_not_reduced_to_its_first_tensor():
    class Pair(nn.Module):
        def forward(self, x):
            return x.sum(), x * 2

    with pytest.raises(InvalidInputError, match="2 items"):
        lrpplan.explain(Pair(), torch.randn(2, 5), cache=False)


def test_dict_with_logits_explains_the_logits():
    model = _DictModel(True).eval()
    x = torch.randn(2, 5, dtype=torch.float64)
    attr = lrpplan.explain(model, x, target=2, rules=TINY, cache=False)
    ref = _gxi(model, x, lambda out: out["logits"][:, 2])
    torch.testing.assert_close(attr.relevance, ref, rtol=1e-8, atol=1e-12)


def test_target_callable_receives_the_models_own_output():
    model = _DictModel(False).eval()
    x = torch.randn(2, 5, dtype=torch.float64)
    seen = []

    def score(out):
        seen.append(type(out))
        return out["scores"].max(-1).values

    attr = lrpplan.explain(model, x, target=score, rules=TINY, cache=False)
    assert seen == [dict]
    ref = _gxi(model, x, lambda out: out["scores"].max(-1).values)
    torch.testing.assert_close(attr.relevance, ref, rtol=1e-8, atol=1e-12)


@pytest.mark.zoo
def test_target_callable_on_a_transformers_model_output():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 6))
    attr = lrpplan.explain(model, ids, target=lambda out: out.logits[:, -1].max(-1).values,
                           cache=False)
    expected = model(ids).logits[:, -1].max(-1).values
    torch.testing.assert_close(attr.output, expected.detach())


@pytest.mark.parametrize("target", [2, np.int64(2), np.int32(2), torch.tensor(2),
                                    [2, 2], np.array([2, 2]), torch.tensor([2, 2])])
def test_integer_targets_of_every_kind(target):
    model = _relu_net(3)
    x = torch.randn(2, 5, dtype=torch.float64)
    attr = lrpplan.explain(model, x, target=target, rules=TINY, cache=False)
    assert attr.target.tolist() == [2, 2]
    torch.testing.assert_close(attr.relevance, _gxi(model, x, lambda out: out[:, 2]),
                               rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("target", [1.9, 1.0, True, np.float64(1.0), torch.tensor(1.0),
                                    torch.tensor([1.0, 2.0]), [1.5, 2.0], np.bool_(True),
                                    torch.tensor([True, False])])
def test_non_integer_targets_are_refused(target):
    with pytest.raises(InvalidInputError):
        lrpplan.explain(_relu_net(3), torch.randn(2, 5, dtype=torch.float64), target=target,
                        cache=False)


@pytest.mark.parametrize("target", [2 ** 70, -(2 ** 70), [2 ** 70, 0], 3, -4,
                                    np.array([2 ** 64 - 1, 0], dtype=np.uint64)])
def test_out_of_range_targets_are_invalid_input(target):
    with pytest.raises(InvalidInputError, match="out of range|targets for a batch"):
        lrpplan.explain(_relu_net(3), torch.randn(2, 5, dtype=torch.float64), target=target,
                        cache=False)


def test_wrong_number_of_targets():
    with pytest.raises(InvalidInputError, match="batch of 2"):
        lrpplan.explain(_relu_net(3), torch.randn(2, 5, dtype=torch.float64), target=[0, 1, 2],
                        cache=False)


def test_output_without_batch_dimension_is_an_error():
    class Rows(nn.Module):
        def forward(self, x):
            return x.sum(0)  # [5]: one value per feature, not per sample

    with pytest.raises(InvalidInputError, match="not one score per sample"):
        lrpplan.explain(Rows(), torch.randn(3, 5), cache=False)


def test_time_major_model_takes_the_batch_from_its_output():
    # [T, B, F] input, [B, C] logits: the output's batch is the batch, not the input's dim 0
    torch.manual_seed(5)
    lin = nn.Linear(5, 3, bias=False).double()

    class TimeMajor(nn.Module):
        def forward(self, x):
            return lin(torch.relu(x).sum(0))

    x = torch.randn(4, 2, 5, dtype=torch.float64)
    attr = lrpplan.explain(TimeMajor(), x, target=1, rules=TINY, cache=False)
    assert attr.output.shape == (2,)
    ref = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(TimeMajor()(ref)[:, 1].sum(), ref)
    torch.testing.assert_close(attr.relevance, x * g, rtol=1e-8, atol=1e-12)


def test_a_model_returning_one_number_explains_it_and_takes_no_class():
    class Total(nn.Module):
        def forward(self, x):
            return (x * x).sum()

    x = torch.randn(3, 5, dtype=torch.float64)
    attr = lrpplan.explain(Total(), x, rules=TINY, cache=False)
    # x·x: the uniform rule gives half to each factor, both are x: x² in all
    torch.testing.assert_close(attr.relevance, x * x, rtol=1e-10, atol=1e-12)
    with pytest.raises(InvalidInputError, match="single number"):
        lrpplan.explain(Total(), x, target=0, cache=False)
