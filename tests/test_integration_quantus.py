"""lrpplan.integrations.quantus: Quantus' PixelFlipping with lrpplan's explain_func on the digits
CNN, cross-checked against the project's own pixel-flipping implementation
(benchmarks/faithfulness.py) on the same images, baseline and ranking."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

quantus = pytest.importorskip("quantus")
pytest.importorskip("sklearn")

import lrpplan  # noqa: E402
from lrpplan.integrations import quantus as lq  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import digits  # noqa: E402
import faithfulness as fb  # noqa: E402

N = 32
RULES = "epsilon-gamma-box"
PARAMS = {"low": 0.0, "high": 1.0}


@pytest.fixture(scope="module")
def setup():
    data = digits.load_data(seed=0)
    model = digits.make_model(seed=0)
    acc = digits.train(model, data, epochs=6, seed=0)
    assert acc > 0.9
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    x = data.x_test[:N].clone()
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_explain_func_matches_lrpplan_and_replays(setup):
    model, x, y = setup
    lq.clear_cache()
    a = lq.explain_func(model, x.numpy(), y.numpy(), rules=RULES, rule_params=PARAMS,
                        device="cpu", cache=False)
    assert isinstance(a, np.ndarray) and a.shape == tuple(x.shape)
    # independent path: lrpplan.explain directly; and the ledger closes onto the target logits
    ref = lrpplan.explain(model, x, target=y, cache=False,
                          rules=lrpplan.RuleSet.preset(RULES, **PARAMS))
    np.testing.assert_allclose(a, ref.relevance.numpy(), rtol=1e-5, atol=1e-6)
    # the ledger closes onto the target logits (biases absorb the rest of the logit)
    with torch.no_grad():
        logits = model(x).gather(1, y.view(-1, 1)).squeeze(1).double()
    assert ref.ledger.closes(), ref.ledger
    assert float(ref.ledger.start) == pytest.approx(logits.sum().item(), rel=1e-5)
    assert float(a.astype(np.float64).sum()) == pytest.approx(float(ref.ledger.at_inputs),
                                                               rel=1e-4)
    # repeated calls reuse one Explainer and replay
    assert len(lq._EXPLAINERS) == 1
    explainer = next(iter(lq._EXPLAINERS.values()))[1]
    a2 = lq.explain_func(model, x.numpy(), y.numpy(), rules=RULES, rule_params=PARAMS,
                         cache=False)
    assert len(lq._EXPLAINERS) == 1 and next(iter(lq._EXPLAINERS.values()))[1] is explainer
    np.testing.assert_allclose(a2, a, rtol=1e-6, atol=1e-7)
    # an int target and a different rule set get their own Explainer
    a3 = lq.explain_func(model, x[:2].numpy(), 3, cache=False)
    ref3 = lrpplan.explain(model, x[:2], target=3, cache=False).relevance.numpy()
    np.testing.assert_allclose(a3, ref3, rtol=1e-5, atol=1e-6)
    assert len(lq._EXPLAINERS) == 2


def test_quantus_pixel_flipping_equals_project_morf(setup):
    model, x, y = setup
    lq.clear_cache()
    metric = quantus.PixelFlipping(features_in_step=1, perturb_baseline="black", abs=False,
                                   normalise=False, disable_warnings=True,
                                   display_progressbar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curves = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None,
                        explain_func=lq.explain_func,
                        explain_func_kwargs={"rules": RULES, "rule_params": PARAMS,
                                             "cache": False},
                        softmax=False, device="cpu", batch_size=N)
    q = torch.tensor(np.asarray(curves), dtype=torch.float64)  # [N, 64], k = 1..64
    assert q.shape == (N, 64)

    # the project's MoRF curves for the same attributions and baseline ('black' = image min)
    scores = {
        "lrpplan": torch.as_tensor(lq.explain_func(model, x.numpy(), y.numpy(), rules=RULES,
                                                   rule_params=PARAMS, cache=False)).reshape(N, -1),
    }
    for s in fb.RANDOM_SEEDS:
        scores[f"random {s}"] = torch.rand(N, 64, generator=torch.Generator().manual_seed(s))
    flat = x.reshape(N, -1)
    base = flat.min(1, keepdim=True).values  # [N, 1] per image
    score_fn = fb._class_scores(model, y, 65)
    morf = {}
    for name, sc in scores.items():
        m, _ = fb.flip_curves(score_fn, flat, sc, base)
        morf[name] = m[..., 0].double()  # the logit

    # no ties among the pixels the flipping changes, so the ranking is the same in both
    ours = morf["lrpplan"]
    sc = scores["lrpplan"].numpy()
    changes = flat.numpy() != base.numpy()
    for i in range(N):
        vals = sc[i][changes[i]]
        assert len(np.unique(vals)) == len(vals)
    scale = ours.abs().max().item()
    assert (q - ours[:, 1:]).abs().max().item() <= 1e-4 * scale

    # ordering by area: lrpplan's MoRF curve falls faster than random ones (lower AUC), both by
    # the project's AUC and by the trapezoid area of Quantus' own curves
    auc_l = fb.auc(ours).mean().item()
    auc_r = np.mean([fb.auc(morf[f"random {s}"]).mean().item() for s in fb.RANDOM_SEEDS])
    assert auc_l < auc_r - 0.1 * abs(auc_r)
    q_area = float(np.mean(((q[:, 1:] + q[:, :-1]) / 2).sum(1).numpy()))
    ours_area = float(np.mean(((ours[:, 2:] + ours[:, 1:-1]) / 2).sum(1).numpy()))
    assert q_area == pytest.approx(ours_area, rel=1e-4, abs=1e-4)
