"""Rules for the census' probe-only node types: vector norm, variance, scalar ** tensor,
reentrant checkpointing (unsupported, with a hint), each against a float64 closed form."""
from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint

import lrpplan

EPS = 1e-6


def _stab(z):
    return torch.where(z >= 0, z + EPS, z - EPS)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("order", [1.0, 2.0, 3.0])
def test_vector_norm_shares_by_abs_power(seed, order):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    y = torch.linalg.vector_norm(x, ord=order, dim=-1)
    assert type(y.grad_fn).__name__ == "LinalgVectorNormBackward0"
    r = torch.randn(3, dtype=torch.float64, generator=g)
    got = lrpplan.attribute(y, x, seed=r, cache=False)
    c = x.detach().abs() ** order
    want = c * (r / _stab(c.sum(-1))).unsqueeze(-1)
    torch.testing.assert_close(got.relevance, want, rtol=1e-10, atol=1e-12)
    assert got.ledger.closes()


@pytest.mark.parametrize("seed", [0, 1])
def test_variance_shares_by_squared_deviation(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, dtype=torch.float64, generator=g).requires_grad_(True)
    y = x.var(dim=1)
    assert type(y.grad_fn).__name__ == "VarBackward0"
    r = torch.randn(4, dtype=torch.float64, generator=g)
    got = lrpplan.attribute(y, x, seed=r, cache=False)
    xd = x.detach()
    c = (xd - xd.mean(1, keepdim=True)) ** 2
    want = c * (r / _stab(c.sum(1))).unsqueeze(1)
    torch.testing.assert_close(got.relevance, want, rtol=1e-10, atol=1e-12)


def test_scalar_pow_tensor_is_elementwise_identity():
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    y = 2.0 ** x
    assert type(y.grad_fn).__name__ == "PowBackward2"
    r = torch.randn(2, 3, dtype=torch.float64)
    got = lrpplan.attribute(y, x, seed=r, cache=False)
    torch.testing.assert_close(got.relevance, r, rtol=0, atol=0)


def test_reentrant_checkpoint_is_unsupported_with_a_hint():
    lin = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(lin, x, use_reentrant=True)
    with pytest.raises(lrpplan.UnsupportedOperation, match="use_reentrant=False"):
        lrpplan.attribute(y.sum(), x, cache=False)
    # the non-reentrant form keeps the graph and works
    y2 = torch.utils.checkpoint.checkpoint(lin, x, use_reentrant=False)
    out = lrpplan.attribute(y2.sum(), x, cache=False)
    assert out.ledger.closes()


@pytest.mark.parametrize("seed", [0, 1])
def test_unsaved_constant_absorbs_its_share_when_the_sum_is_saved(seed):
    """``a · (tanh(x) + 1)`` (GPT-2's gelu_new shape): autograd drops the constant 1, but the
    product saved ``tanh(x) + 1``, so the constant is known and absorbs its z-rule share."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    a = torch.randn(3, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    b = torch.tanh(x) + 1.0
    y = a * b
    r = torch.randn(3, 4, dtype=torch.float64, generator=g)
    got = lrpplan.attribute(y, [a, x], seed=r, cache=False)
    t = torch.tanh(x.detach())
    half = 0.5 * r  # uniform rule on a · b
    torch.testing.assert_close(got.relevance[0], half, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.relevance[1], t * half / _stab(t + 1.0), rtol=1e-10,
                               atol=1e-12)
    assert not any("taken as 0" in s for s in got.assumptions)
    assert got.ledger.closes()
