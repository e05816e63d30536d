"""``torch.compile``d models (issue 15).

A compiled forward puts a whole compiled graph into one ``CompiledFunctionBackward`` node whose
inputs are the parameters and activations it read; the old error's ``identity`` hint sent all
relevance to the first of them and gave all-zero input relevance.

- ``explain`` / ``Explainer`` of ``torch.compile(m)`` give exactly the relevance of ``m``
  (float64; the compiled module wraps ``m`` with the same parameters);
- ``attribute`` on a graph with a compiled region raises ``UnsupportedOperation`` that suggests
  no fallback (no ``identity``, no ``absorb``) and says to explain the uncompiled module
  (``model._orig_mod``); following that hint gives the uncompiled relevance, never zeros;
- a model with a compiled submodule gets the same error from ``explain``.

``backend="aot_eager"`` keeps compilation short; it builds the same ``CompiledFunctionBackward``
node as inductor.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpplan
from lrpplan import UnsupportedOperation
from lrpplan.rules.routing import suggest_fallback


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 25, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()


def _x():
    return torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_explain_compiled_model_equals_the_module_it_wraps():
    model = _model()
    x = _x()
    ref = lrpplan.explain(model, x, cache=False)
    compiled = torch.compile(model, backend="aot_eager")
    got = lrpplan.explain(compiled, x, cache=False)
    assert torch.equal(got.target, ref.target)
    assert got.relevance.abs().max() > 0
    assert (got.relevance - ref.relevance).abs().max() <= 1e-12 * ref.relevance.abs().max()
    assert got.ledger.closes()
    explainer = lrpplan.Explainer(compiled, rules="epsilon-plus", cache=False)
    first, again = explainer(x), explainer(x)
    plain = lrpplan.explain(model, x, rules="epsilon-plus", cache=False)
    assert again.cached
    assert (first.relevance - plain.relevance).abs().max() <= 1e-12 * plain.relevance.abs().max()
    assert (again.relevance - first.relevance).abs().max() <= 1e-10 * first.relevance.abs().max()


def test_attribute_through_a_compiled_region_says_what_to_pass():
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    x = _x().requires_grad_(True)
    out = compiled(x)[:, 0]
    with pytest.raises(UnsupportedOperation) as info:
        lrpplan.attribute(out, x, cache=False)
    exc = info.value
    msg = str(exc)
    assert exc.node_type == "CompiledFunctionBackward"
    assert exc.fallback is None
    assert "_orig_mod" in msg and "uncompiled" in msg
    assert "override(" not in msg and "'identity'" not in msg and "'absorb'" not in msg
    # following the hint: the uncompiled module's graph, relevance = explain's, not zeros
    xi = _x().requires_grad_(True)
    res = lrpplan.attribute(compiled._orig_mod(xi)[:, 0], xi, cache=False)
    ref = lrpplan.attribute(model(xi)[:, 0], xi, cache=False)
    assert res.relevance.abs().max() > 0
    assert torch.equal(res.relevance, ref.relevance)


def test_no_fallback_is_suggested_for_a_compiled_elementwise_region():
    # one input of the output's shape: the shape test alone would suggest 'identity'
    fn = torch.compile(lambda t: torch.tanh(t) * 2 + t, backend="aot_eager")
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    node = fn(x).grad_fn
    assert type(node).__name__ == "CompiledFunctionBackward"
    fallback, reason = suggest_fallback(node, [tuple(x.shape)])
    assert fallback is None and "_orig_mod" in reason


def test_compiled_submodule_is_a_clear_error():
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.compile(_model(), backend="aot_eager")

        def forward(self, x):
            return self.body(x) * 2

    outer = Outer().eval()
    with pytest.raises(UnsupportedOperation) as info:
        lrpplan.explain(outer, _x(), cache=False)
    assert info.value.fallback is None and "_orig_mod" in str(info.value)
    # the hint: the uncompiled submodule gives the relevance of the uncompiled model
    outer.body = outer.body._orig_mod
    got = lrpplan.explain(outer, _x(), cache=False)
    assert got.relevance.abs().max() > 0 and got.ledger.closes()
