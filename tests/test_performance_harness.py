"""The performance harness (benchmarks/performance.py) runs end to end on a tiny model.

No timing is asserted (timings belong to the benchmark, not to unit tests); the test checks that
every mode runs, that replay really replays and trace really traces, that the peak-memory probe
sees an allocation it is shown, and that the table has one row per measurement.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def load_harness():
    spec = importlib.util.spec_from_file_location(
        "lrpplan_performance", ROOT / "benchmarks" / "performance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()


def test_harness_measures_every_mode_on_a_tiny_model():
    perf = load_harness()
    case = perf.Case("tiny", tiny_cnn, lambda model, batch: torch.randn(batch, 3, 8, 8))
    perf.INPUT_DESC["tiny"] = "3x8x8"
    row = perf.bench(case, batch=2, reps=2, device=torch.device("cpu"), with_zennit=False,
                     memory=False)
    assert set(row["ms"]) == {"forward", "gradient", "trace", "replay", "fingerprint"}
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in row["all_ms"].values())
    q = perf.ratios(row)
    assert q["replay/gradient"] > 0 and q["trace/replay"] > 0
    text = perf.table([row, row])
    assert text.count("\n| tiny (3x8x8) | 2 |") == 2


def test_peak_memory_sees_an_allocation():
    perf = load_harness()

    def allocate() -> None:
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        assert t.sum() > 0

    peak = perf.peak_memory(allocate, torch.device("cpu"))
    assert 48 <= peak <= 1024
