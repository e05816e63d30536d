"""The compiled replay (``Explainer(..., compile=True)``, :mod:`lrpplan.compiled`).

- with inductor: a CNN (convolutions, BatchNorm, residual, max-pool) and an attention block
  replay through ``torch.compile`` to the eager replay's relevance and ledger totals (float32,
  ≤ 1e-5 relative), at the traced size and at other batch sizes / sequence lengths (one
  recompile for dynamic shapes, then reuse);
- the plumbing without a compiler (``torch.compile`` replaced by the identity): gathered graph
  reads + the pure steps give the eager replay's numbers exactly;
- fallbacks: ``torch.compile`` raising, or a plan that reads a node's own backward, replay
  eagerly with one warning; ``compile=True`` with ``ledger="nodes"`` is refused;
- ``explain_dataset(compile=True)`` and ``lrpplan explain-dataset --compile`` pass it through.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpplan
from lrpplan.errors import InvalidInputError, LRPWarning


class _Block(nn.Module):
    """conv → BN → ReLU → conv → BN, plus the input (a residual), ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + x)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), _Block(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


class _Attention(nn.Module):
    """Pre-norm causal self-attention and a GELU MLP, residual around each."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, -1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(self.ln2(x))
        return self.head(x[:, -1])


def _close(got: lrpplan.Attribution, want: lrpplan.Attribution, rtol: float) -> None:
    scale = float(want.relevance.abs().max())
    err = float((got.relevance - want.relevance).abs().max())
    assert err <= rtol * scale, f"relative error {err / scale:.3g}"
    assert got.ledger.start == pytest.approx(want.ledger.start, rel=rtol)
    assert got.ledger.absorbed == pytest.approx(want.ledger.absorbed, rel=1e-4, abs=1e-6)
    assert got.ledger.closes()


@pytest.mark.parametrize("make, inputs", [
    (_cnn, [(3, 3, 8, 8), (5, 3, 8, 8), (2, 3, 8, 8)]),
    (lambda: (torch.manual_seed(1), _Attention().eval())[1], [(2, 6, 16), (2, 9, 16),
                                                              (3, 7, 16)]),
], ids=["cnn", "attention"])
def test_compiled_replay_equals_eager_at_every_size(make, inputs):
    model = make()
    eager = lrpplan.Explainer(model, cache=False)
    compiled = lrpplan.Explainer(model, cache=False, compile=True)
    gen = torch.Generator().manual_seed(2)
    for shape in inputs:
        x = torch.randn(shape, generator=gen)
        want = eager(x)
        compiled(x)  # the first call of a plan traces, whichever size it sees first
        got = compiled(x)
        assert got.cached
        _close(got, want, 1e-5)
    (seconds,) = compiled.compile_seconds.values()
    # one compile at the first size, one recompile with dynamic shapes, then reused
    assert 1 <= len(seconds) <= 2, seconds
    assert all(s > 0 for s in seconds)


@pytest.fixture
def no_compiler(monkeypatch):
    """``torch.compile`` as the identity: the compiled replay's own code, without inductor."""
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: fn)


def test_gathered_reads_and_pure_steps_equal_the_eager_replay(no_compiler):
    model = _Attention().double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    eager = lrpplan.Explainer(model, cache=False)
    compiled = lrpplan.Explainer(model, cache=False, compile=True)
    eager(x)
    compiled(x)
    want, got = eager(x), compiled(x)
    assert torch.equal(got.relevance, want.relevance)
    assert got.ledger.absorbed == want.ledger.absorbed
    assert got.ledger.by_type() == want.ledger.by_type()


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler on this platform")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    model = _cnn()
    x = torch.randn(2, 3, 8, 8)
    explainer = lrpplan.Explainer(model, cache=False, compile=True)
    explainer(x)
    with pytest.warns(LRPWarning, match="replays eagerly: torch.compile failed"):
        got = explainer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        again = explainer(x)
    want = lrpplan.explain(model, x, cache=False)
    assert torch.equal(got.relevance, want.relevance) and torch.equal(again.relevance,
                                                                      want.relevance)


def test_a_plan_reading_a_nodes_backward_replays_eagerly(no_compiler):
    class Writes(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 6)

        def forward(self, x):
            h = self.lin(x).clone()
            h[:, :2] = 0.0  # CopySlices: its gradient is the node's own backward
            return h.sum(-1, keepdim=True)

    model = Writes().eval()
    x = torch.randn(3, 4)
    explainer = lrpplan.Explainer(model, cache=False, compile=True)
    first = explainer(x)
    assert first.plan.stats["node_backward_reads"] > 0
    with pytest.warns(LRPWarning, match="own backward"):
        got = explainer(x)
    assert torch.equal(got.relevance, lrpplan.explain(model, x, cache=False).relevance)


def test_compile_with_per_node_ledger_is_refused():
    with pytest.raises(InvalidInputError, match="ledger='nodes'"):
        lrpplan.Explainer(_cnn(), cache=False, compile=True, ledger="nodes")


def test_explain_dataset_and_cli_pass_compile_through(no_compiler, tmp_path, monkeypatch):
    from torch.utils.data import TensorDataset

    from lrpplan.compiled import CompiledPlan
    from lrpplan.dataset import explain_dataset

    runs = []
    original = CompiledPlan.run

    def counted(self, graph, seeds):
        runs.append(self.plan.key)
        return original(self, graph, seeds)
    monkeypatch.setattr(CompiledPlan, "run", counted)
    model = _cnn()
    data = TensorDataset(torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(3)))
    plain = explain_dataset(model, data, batch_size=4, out=tmp_path / "plain", cache=False,
                            progress=False)
    assert runs == []
    fast = explain_dataset(model, data, batch_size=4, out=tmp_path / "fast", cache=False,
                           progress=False, compile=True)
    assert len(runs) == 2  # batches 2 and 3 replay (batch 1 traces)
    for a, b in zip(sorted((tmp_path / "plain").rglob("*.npy")),
                    sorted((tmp_path / "fast").rglob("*.npy"))):
        np.testing.assert_array_equal(np.load(a), np.load(b))
    assert plain.new_samples == fast.new_samples == 10

    from lrpplan.cli import main
    factories = tmp_path / "factories.py"
    factories.write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def make_model():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(3, 2)).eval()\n"
        "def make_data():\n"
        "    return TensorDataset(torch.randn(6, 4))\n")
    runs.clear()
    rc = main(["explain-dataset", f"{factories}:make_model", f"{factories}:make_data",
               "--out", str(tmp_path / "cli"), "--batch-size", "2", "--no-progress",
               "--compile"])
    assert rc == 0 and len(runs) == 2
