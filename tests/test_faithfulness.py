"""The faithfulness metrics of ``benchmarks/faithfulness.py`` against hand-computed values and a
linear model whose ideal ordering is known; the digits CNN of ``benchmarks/digits.py`` trains."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import faithfulness as fb  # noqa: E402

DT = torch.float64


def linear(w: torch.Tensor):
    return lambda flat: flat.double() @ w


def test_auc_trapezoid_by_hand():
    # 3 intervals of width 1/3: (4+1)/2 + (1-1)/2 + (-1+0)/2 = 2 → 2/3
    assert fb.auc(torch.tensor([4.0, 1.0, -1.0, 0.0])).item() == pytest.approx(2 / 3)
    assert fb.auc(torch.tensor([[1.0, 1.0], [0.0, 2.0]])).tolist() == pytest.approx([1.0, 1.0])


def test_ranking_descending_with_fixed_tie_break():
    s = torch.tensor([[0.1, 3.0, -2.0, 0.5]])
    assert fb.ranking(s).tolist() == [[1, 3, 0, 2]]
    ties = torch.zeros(3, 10)
    a, b = fb.ranking(ties, tie_seed=7), fb.ranking(ties + 5.0, tie_seed=7)
    assert torch.equal(a, b)  # the tie break depends on the seed only, not on the values
    assert not torch.equal(a[0], torch.arange(10))  # ...and is not the index order
    for row in a:
        assert sorted(row.tolist()) == list(range(10))
    # ties among equal scores only: distinct scores keep their order whatever the permutation
    mixed = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0]])
    assert fb.ranking(mixed, tie_seed=3)[0, :2].tolist() == [1, 3]


def test_perturbed_batches_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    order = torch.tensor([[2, 0, 1]])
    base = torch.tensor([-1.0, -2.0, -3.0])
    got = fb.perturbed_batches(x, order, base)
    expected = [[1, 2, 3], [1, 2, -3], [-1, 2, -3], [-1, -2, -3]]
    assert got[0].tolist() == expected
    got2 = fb.perturbed_batches(x, order, base, step=2)  # k = 0, 2, 3
    assert got2[0].tolist() == [expected[0], expected[2], expected[3]]


def test_linear_model_hand_computed_metrics():
    """f(x) = 3·x0 − x1 + 2·x2 at x = 1, baseline 0; the true contributions [3, −1, 2] give
    MoRF 4, 1, −1, 0 and LeRF 4, 5, 3, 0 (by hand): AUCs 2/3 and 10/3, ABPC 8/3,
    comprehensiveness 10/3, sufficiency 2/3."""
    w = torch.tensor([3.0, -1.0, 2.0], dtype=DT)
    x = torch.ones(1, 3, dtype=DT)
    morf, lerf = fb.flip_curves(linear(w), x, (w * x), torch.zeros(3, dtype=DT))
    assert morf[0].tolist() == [4, 1, -1, 0]
    assert lerf[0].tolist() == [4, 5, 3, 0]
    m = fb.curve_metrics(morf, lerf)
    assert m["auc_morf"].item() == pytest.approx(2 / 3)
    assert m["auc_lerf"].item() == pytest.approx(10 / 3)
    assert m["abpc"].item() == pytest.approx(8 / 3)
    assert m["comprehensiveness"].item() == pytest.approx(10 / 3)
    assert m["sufficiency"].item() == pytest.approx(2 / 3)


def test_linear_model_true_contributions_are_optimal():
    """For an additive model, flipping by the true contributions w⊙(x − b) drops fastest: its
    MoRF curve is pointwise the lowest of all orderings, its ABPC the highest and well above
    random orderings'; comprehensiveness − sufficiency = ABPC for every ordering."""
    gen = torch.Generator().manual_seed(0)
    n, f = 16, 6
    w = torch.randn(f, generator=gen, dtype=DT)
    x = torch.randn(n, f, generator=gen, dtype=DT)
    base = torch.randn(f, generator=gen, dtype=DT)
    true = w * (x - base)
    morf_t, lerf_t = fb.flip_curves(linear(w), x, true, base)
    m_t = fb.curve_metrics(morf_t, lerf_t)
    best_abpc = torch.full((n,), -torch.inf, dtype=DT)
    for perm in itertools.permutations(range(f)):  # every ordering, as fake scores
        scores = torch.empty(n, f, dtype=DT)
        scores[:, list(perm)] = torch.arange(f, 0, -1, dtype=DT)
        morf, lerf = fb.flip_curves(linear(w), x, scores, base)
        assert (morf_t <= morf + 1e-12).all()
        m = fb.curve_metrics(morf, lerf)
        assert torch.allclose(m["comprehensiveness"] - m["sufficiency"], m["abpc"])
        best_abpc = torch.maximum(best_abpc, m["abpc"])
    assert torch.allclose(m_t["abpc"], best_abpc)
    rnd = [fb.curve_metrics(*fb.flip_curves(linear(w), x, torch.rand(n, f, generator=gen,
                                                                       dtype=DT), base))
           for _ in range(5)]
    rnd_abpc = torch.stack([r["abpc"] for r in rnd]).mean()
    assert m_t["abpc"].mean() > rnd_abpc + 1.0
    # the reversed (anti-faithful) ordering has the negated ABPC
    anti = fb.curve_metrics(*fb.flip_curves(linear(w), x, -true, base))
    assert torch.allclose(anti["abpc"], -m_t["abpc"])


def test_quantus_pixel_flipping_agrees():
    """Quantus' PixelFlipping (0 baseline, raw outputs) gives our MoRF curve (points k ≥ 1)."""
    quantus = pytest.importorskip("quantus")
    gen = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x = torch.rand(5, 1, 4, 4, generator=gen)
    y = torch.tensor([0, 1, 2, 0, 1])
    a = torch.randn(5, 1, 4, 4, generator=gen)
    metric = quantus.PixelFlipping(features_in_step=1, perturb_baseline="black", abs=False,
                                   normalise=False, disable_warnings=True,
                                   display_progressbar=False)
    x = x.clone()
    x.view(5, -1)[:, 0] = 0.0  # quantus' "black" is the image minimum: make it 0
    q = torch.tensor(metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(),
                            a_batch=a.numpy(), softmax=False, device="cpu"), dtype=DT)

    def fn(flat):
        return model(flat.view(-1, 1, 4, 4)).gather(1, y.repeat_interleave(17).view(-1, 1))[:, 0]

    morf, _ = fb.flip_curves(fn, x.view(5, -1), a.view(5, -1), torch.zeros(16))
    assert torch.allclose(q, morf[:, 1:].double(), atol=1e-5)


@pytest.fixture(scope="module")
def trained():
    pytest.importorskip("sklearn")
    import digits
    return digits.trained_model(seed=0)


def test_digits_cnn_trains(trained):
    model, data, acc = trained
    assert len(data.y_test) >= 300
    assert (data.low, data.high) == (0.0, 1.0)
    assert acc > 0.9


def test_digits_egb_matches_zennit(trained):
    """lrpplan's epsilon-gamma-box equals Zennit's EpsilonGammaBox on the trained CNN (the
    benchmark's two rows must then coincide), seeded with the target logit in both."""
    pytest.importorskip("zennit")
    import lrpplan
    model, data, _ = trained
    x = data.x_test[:16]
    target = model(x).argmax(1)
    got = fb.digit_attributions(model, x, target, data.low, data.high)
    a, b = got["lrpplan epsilon-gamma-box"], got["zennit EpsilonGammaBox"]
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4
    # and the ε preset conserves the logit (bias shares aside) on these digits
    attr = lrpplan.explain(model, x, target=target, cache=False)
    assert attr.ledger.closes()
