"""Ahead-of-time compilation: compile a plan into the cache, replay it in a fresh process.

Run from anywhere::

    python examples/aot_compile.py

Step 1 runs ``lrpplan compile examples/aot_compile.py:make_model --example 1x3x32x32`` (here
through :func:`lrpplan.cli.main`, the same code as the ``lrpplan`` command) into the
repository's ``cache/`` directory (or ``$LRPPLAN_CACHE``). Step 2 starts a new Python process
that builds the same model, explains a batch of 4 images and finds the plan in the cache:
it prints ``cached=True``, with no tracing at all. The plan key does not depend on the batch
size, so the plan compiled for one image serves any batch. Exit code 1 if the replay missed the
cache.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

CACHE_DIR = Path(os.environ.get("LRPPLAN_CACHE") or Path(__file__).resolve().parents[1] / "cache")


def make_model() -> nn.Module:
    """The factory ``lrpplan compile`` calls: no arguments, returns the model in eval mode."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def replay() -> int:
    """Step 2, in a fresh process: explain with the plan compiled ahead of time."""
    import lrpplan

    model = make_model()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    t0 = time.perf_counter()
    attr = lrpplan.explain(model, images, cache=lrpplan.PlanCache(CACHE_DIR))
    ms = (time.perf_counter() - t0) * 1e3
    print(f"[fresh process {os.getpid()}] explained a batch of {images.shape[0]} in {ms:.1f} ms: "
          f"cached={attr.cached}, plan {attr.plan_key}, ledger closes: {attr.ledger.closes()}")
    return 0 if attr.cached else 1


def main() -> int:
    from lrpplan.cli import main as lrpplan_cli

    print(f"[step 1] lrpplan compile {Path(__file__).name}:make_model into {CACHE_DIR}")
    rc = lrpplan_cli(["compile", f"{Path(__file__).resolve()}:make_model",
                      "--example", "1x3x32x32", "--cache", str(CACHE_DIR)])
    if rc:
        return rc
    print("[step 2] replay in a fresh process", flush=True)
    env = dict(os.environ, LRPPLAN_CACHE=str(CACHE_DIR))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--replay"], env=env)
    if done.returncode:
        print("the fresh process did not find the plan in the cache", file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(replay() if sys.argv[1:] == ["--replay"] else main())
