"""Values autograd keeps nowhere, recorded during explain's forward (lrpplan.recording).

The model below overwrites, by slice assignment, a tensor whose value an addition consumed:
no autograd node saved that value, and the tensors it was computed from were overwritten too,
so no Promise can recompute it. The references are independent of the recording: LRP-0 with
ε = 0 on a bias-free piecewise-linear network is gradient × input (float64), and recorded values
are compared with the same values computed in a separate, unrecorded forward pass.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpplan
from lrpplan.graph import capture
from lrpplan.recording import ForwardRecording

LRP0 = lrpplan.RuleSet.preset("epsilon", epsilon=0.0)


class OverwritesInPlace(nn.Module):
    """``h`` feeds an addition, then slice assignments overwrite it (bias-free, ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6, bias=False)
        self.b = nn.Linear(6, 3, bias=False)
        self.c = nn.Linear(6, 6, bias=False)

    def forward(self, x):
        h = self.a(x)
        h = torch.relu(h) + 0.5 * h
        g = h * 1.0
        h[:, 0] = 1.0
        h[:, 1:3] = h[:, 1:3] * 2
        return self.b(h + self.c(g))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return OverwritesInPlace().double().eval()


def _grad_times_input(model, x, target):
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xx)[torch.arange(len(x)), target].sum(), xx)
    return x * g


def test_attribute_cannot_recover_and_says_what_to_do():
    model = _model()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(lrpplan.UnrecoverableValueError, match=r"lrpplan\.explain"):
        lrpplan.attribute(model(x)[:, 0].sum(), x, cache=False)


def test_explain_records_and_equals_gradient_times_input():
    model = _model()
    x = torch.randn(4, 6, dtype=torch.float64)
    attr = lrpplan.explain(model, x, target=1, rules=LRP0, cache=False)
    assert attr.plan.stats["recorded_values"] >= 1
    torch.testing.assert_close(attr.relevance, _grad_times_input(model, x, 1),
                               rtol=1e-10, atol=1e-13)
    assert attr.ledger.closes()


def test_replays_record_from_memory_and_from_disk(tmp_path):
    model = _model()
    explainer = lrpplan.Explainer(model, rules=LRP0, cache=tmp_path)
    first = explainer(torch.randn(2, 6, dtype=torch.float64), target=0)
    assert not first.cached
    x = torch.randn(5, 6, dtype=torch.float64)
    again = explainer(x, target=2)
    assert again.cached
    torch.testing.assert_close(again.relevance, _grad_times_input(model, x, 2),
                               rtol=1e-10, atol=1e-13)
    # a new process's view: another instance of the architecture, the plan from disk; its
    # first forward is not recorded, the plan asks for recorded values, the forward reruns
    other = _model()
    y = torch.randn(3, 6, dtype=torch.float64)
    from_disk = lrpplan.Explainer(other, rules=LRP0, cache=tmp_path)(y, target=1)
    assert from_disk.cached and from_disk.plan_key == first.plan_key
    torch.testing.assert_close(from_disk.relevance, _grad_times_input(other, y, 1),
                               rtol=1e-10, atol=1e-13)


def test_attribute_with_a_plan_that_reads_recorded_values(tmp_path):
    model = _model()
    x = torch.randn(2, 6, dtype=torch.float64)
    traced = lrpplan.explain(model, x, target=0, rules=LRP0, cache=tmp_path)
    assert traced.plan.stats["recorded_values"] >= 1
    # the same graph, built by the user, meets the cached plan: it cannot be replayed
    xx = x.clone().requires_grad_(True)
    out = model(xx)
    score = out.gather(-1, torch.zeros(2, 1, dtype=torch.long))  # [B, 1], as explain picks it
    with pytest.raises(lrpplan.UnrecoverableValueError, match="recorded"):
        lrpplan.attribute(score, xx, rules=LRP0, cache=tmp_path)


class Residual(nn.Module):
    """``b(relu(a(x)) + c(x))``, bias-free: every value recoverable (saved or recomputed)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 2, bias=False)
        self.c = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + self.c(x))


def test_models_that_need_no_recording_do_not_record():
    from lrpplan import api
    torch.manual_seed(0)
    model = Residual().double().eval()  # the addition's operands come from the resolver
    x = torch.randn(3, 4, dtype=torch.float64)
    attr = lrpplan.explain(model, x, target=1, rules=LRP0, cache=False)
    assert model not in api._RECORDING_MODELS  # no second, recorded forward
    assert attr.plan.stats["recorded_values"] == 0
    # recording forced on: recorded values are the last resort, the plan reads the graph's own
    api._RECORDING_MODELS.add(model)
    forced = lrpplan.explain(model, x, target=1, rules=LRP0, cache=False)
    assert forced.plan.stats["recorded_values"] == 0
    torch.testing.assert_close(forced.relevance, _grad_times_input(model, x, 1),
                               rtol=1e-10, atol=1e-13)


def test_recording_copies_a_value_before_its_storage_is_written():
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    rec = ForwardRecording()
    with rec:
        b = x * 2 + 1
        add_node = b.grad_fn
        b[:, 0] = 5.0
        b += 3.0
        out = (b * 4).sum()
    graph = capture([(out.grad_fn, 0)])
    values = rec.values_for(graph)
    with torch.no_grad():  # the same values, computed without recording
        before = x * 2 + 1
        middle = before.clone()
        middle[:, 0] = 5.0
        final = middle + 3.0
    torch.testing.assert_close(values[(graph.index[add_node], 0)], before, rtol=0, atol=0)
    copy_slices = b.grad_fn.next_functions[0][0]
    torch.testing.assert_close(values[(graph.index[copy_slices], 0)], middle, rtol=0, atol=0)
    torch.testing.assert_close(values[(graph.index[b.grad_fn], 0)], final, rtol=0, atol=0)
    assert rec.copied_bytes >= 2 * before.numel() * before.element_size()  # b, twice
