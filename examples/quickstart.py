"""Quickstart: explain a model, explain again from the cached plan, save a heatmap.

Run from anywhere::

    python examples/quickstart.py

Plans go to the repository's ``cache/`` directory (next to this ``examples/`` folder) unless
``LRPPLAN_CACHE`` names another one; the heatmap is written to the current directory.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

import lrpplan

CACHE_DIR = Path(os.environ.get("LRPPLAN_CACHE") or Path(__file__).resolve().parents[1] / "cache")
HEATMAP = Path("quickstart-heatmap.png")


def make_model() -> nn.Module:
    """A small CNN with random weights; the model is explained in the mode it is in (eval)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def main() -> None:
    model = make_model()
    cache = lrpplan.PlanCache(CACHE_DIR)
    images = torch.randn(3, 1, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    # 1. One call: run the model, pick the argmax class per sample, propagate relevance.
    #    The first call for an architecture traces the autograd graph and stores the plan.
    t0 = time.perf_counter()
    attr = lrpplan.explain(model, images[0], cache=cache)
    ms = (time.perf_counter() - t0) * 1e3
    print(f"explain #1: {ms:.1f} ms, cached={attr.cached}, target={attr.target.tolist()}, "
          f"relevance {tuple(attr.relevance.shape)}")
    print(f"  plan {attr.plan_key}: {attr.plan.stats['nodes']} nodes, "
          f"{len(attr.plan.steps)} steps, stored in {cache.path}")
    led = attr.ledger
    print(f"  ledger: start {led.start:.4g} = at inputs {led.at_inputs:.4g} "
          f"+ absorbed {led.absorbed:.4g} (closes: {led.closes()})")

    # 2. The same architecture again, on a new input: the plan is loaded from the cache
    #    (matched by the graph's fingerprint) and replayed, with no graph traversal.
    t0 = time.perf_counter()
    again = lrpplan.explain(model, images[1], cache=cache)
    ms = (time.perf_counter() - t0) * 1e3
    print(f"explain #2: {ms:.1f} ms, cached={again.cached} (same plan: "
          f"{again.plan_key == attr.plan_key})")

    # 3. An Explainer keeps the plan in memory as well; a rule preset and an explicit target.
    explainer = lrpplan.Explainer(model, rules="epsilon-plus", cache=cache)
    for k in range(2):
        r = explainer(images[2], target=3)
        print(f"Explainer (epsilon-plus, target 3) call {k + 1}: cached={r.cached}")

    # 4. A heatmap of the first explanation: red positive, blue negative, white zero.
    try:
        from lrpplan.viz import heatmap
    except ImportError:
        print("heatmap skipped: pip install lrpplan[viz]")
        return
    heatmap(attr.relevance[0], HEATMAP, scale=8)
    print(f"heatmap: {HEATMAP.resolve()}")


if __name__ == "__main__":
    main()
