"""Many targets in one replay vs one replay per target (issue 16).

Per model and K: the median wall time of one ``Explainer`` call explaining K targets per sample
(``target`` of shape ``[B, K]``: the K highest classes; for GPT-2 the K highest next tokens at
the last position) against K calls explaining one target each, in one process, interleaved, and
the ratio (one replay for K / K replays). Also, unasked, what one K-target call costs relative
to one single-target call.

Usage::

    python benchmarks/many_targets.py                       # ResNet-50 and GPT-2, K 1,4,16,64
    python benchmarks/many_targets.py --models resnet50 --ks 1,16 --reps 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import performance as P  # noqa: E402

import lrpplan  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "many_targets.json"
CASES = {"resnet50": (P.CASES["resnet50"], "3x224x224"), "gpt2": (P.CASES["gpt2"], "128 tokens")}


def _top_k(model, x, k: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    logits = out if out.dim() == 2 else out[:, -1]
    return logits.topk(k, -1).indices  # [B, K]


def measure(name: str, ks: list[int], reps: int, batch: int) -> list[dict]:
    case, desc = CASES[name]
    model = case.build()
    x = case.make_input(model, batch)
    explainer = lrpplan.Explainer(model, cache=False)
    rows = []
    for k in ks:
        targets = _top_k(model, x, k)
        explainer(x, target=targets[:, 0])  # traces (once per model), then replays
        explainer(x, target=targets)

        def together() -> None:
            assert explainer(x, target=targets).cached

        def apart() -> None:
            for j in range(k):
                assert explainer(x, target=targets[:, j]).cached

        times: dict[str, list[float]] = {"together": [], "apart": []}
        for rnd in range(reps + 1):
            for mode, fn in (("together", together), ("apart", apart)):
                t0 = time.perf_counter()
                fn()
                if rnd:
                    times[mode].append((time.perf_counter() - t0) * 1e3)
        ms = {m: statistics.median(v) for m, v in times.items()}
        rows.append({"model": name, "input": desc, "batch": batch, "k": k, "ms": ms,
                     "together/apart": ms["together"] / ms["apart"],
                     "together/one": ms["together"] / (ms["apart"] / k)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | input | K | one replay for K | K replays | ratio | vs one target |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['input']} | {r['k']} | {r['ms']['together']:.0f} ms "
                     f"| {r['ms']['apart']:.0f} ms | {r['together/apart']:.2f}x "
                     f"| {r['together/one']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet50,gpt2")
    ap.add_argument("--ks", default="1,4,16,64")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {P.machine()}, {torch.get_num_threads()} threads")
    rows = []
    for name in args.models.split(","):
        rows += measure(name, [int(k) for k in args.ks.split(",")], args.reps, args.batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": P.machine(), "rows": rows}, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
