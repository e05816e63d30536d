"""The model and the session are untouched (issue 13, point 8): training mode, frozen
parameters, autocast, inference mode."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lrpplan
from lrpplan.errors import InvalidInputError, LRPWarning


def _lrp_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if issubclass(w.category, LRPWarning)]


def test_training_mode_batchnorm_warns_and_buffers_stay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, caught = _lrp_warnings(lambda: lrpplan.explain(model, torch.randn(6, 4), cache=False))
    assert len(caught) == 1 and "training mode" in str(caught[0].message)
    assert "batch statistics" in str(caught[0].message)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training  # the mode is the user's too
    _, again = _lrp_warnings(lambda: lrpplan.explain(model, torch.randn(6, 4), cache=False))
    assert again == []  # once per model


def test_training_mode_dropout_warns():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    _, caught = _lrp_warnings(lambda: lrpplan.explain(model, torch.randn(2, 4), cache=False))
    assert len(caught) == 1 and "dropout" in str(caught[0].message)


def test_eval_mode_does_not_warn():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5),
                          nn.Linear(8, 3)).eval()
    _, caught = _lrp_warnings(lambda: lrpplan.explain(model, torch.randn(2, 4), cache=False))
    assert caught == []


def _frozen_pair(seed: int, last_bias: bool):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 3, bias=last_bias)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def test_frozen_parameters_in_attribute_warn_when_a_bias_is_lost():
    model = _frozen_pair(11, last_bias=True)
    x = torch.randn(3, 4, dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    xx = x.clone().requires_grad_(True)
    attr, caught = _lrp_warnings(lambda: lrpplan.attribute(model(xx)[:, 0], xx, cache=False))
    assert len(caught) == 1
    assert "requires_grad" in str(caught[0].message) and "explain(model" in str(caught[0].message)
    assert attr.plan.stats["constants_taken_as_zero"] == 1


def test_frozen_parameters_recovered_where_the_graph_holds_the_output():
    # every biased layer's output is saved by its consumer (GELU's input, ReLU's result,
    # a linear layer's input): the biases are recovered exactly, and nothing is said
    model = _frozen_pair(12, last_bias=False)
    x = torch.randn(3, 4, dtype=torch.float64)
    reference = lrpplan.explain(model, x, target=0, cache=False).relevance
    for p in model.parameters():
        p.requires_grad_(False)
    xx = x.clone().requires_grad_(True)
    attr, caught = _lrp_warnings(lambda: lrpplan.attribute(model(xx)[:, 0], xx, cache=False))
    assert caught == []
    assert attr.plan.stats["constants_taken_as_zero"] == 0
    torch.testing.assert_close(attr.relevance, reference, rtol=1e-9, atol=1e-12)


def test_explain_on_a_frozen_model_equals_the_unfrozen_model():
    model = _frozen_pair(13, last_bias=True)
    x = torch.randn(3, 4, dtype=torch.float64)
    reference = lrpplan.explain(model, x, cache=False).relevance
    for p in model.parameters():
        p.requires_grad_(False)
    attr, caught = _lrp_warnings(lambda: lrpplan.explain(model, x, cache=False))
    assert caught == []
    torch.testing.assert_close(attr.relevance, reference, rtol=1e-12, atol=1e-14)
    assert not any(p.requires_grad for p in model.parameters())


def test_autocast_gives_float32_relevance_and_closes():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attr = lrpplan.explain(model, x, cache=False)
    assert attr.relevance.dtype == torch.float32
    assert attr.ledger.closes()
    plain = lrpplan.explain(model, x, target=attr.target, cache=False).relevance
    # the forward ran in bfloat16 (3 significant digits); the rules in float32
    assert (attr.relevance - plain).norm() <= 0.05 * plain.norm()


def test_inference_mode_says_so():
    model = nn.Linear(4, 2)
    with torch.inference_mode():
        with pytest.raises(InvalidInputError, match="inference_mode"):
            lrpplan.explain(model, torch.randn(2, 4), cache=False)
        x = torch.randn(2, 4)
        out = model(x)
    with pytest.raises(InvalidInputError, match="inference_mode"):
        lrpplan.attribute(out, x, cache=False)
