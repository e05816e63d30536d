"""The GPU check of issue 14, as one prepared script for a lent CUDA device.

Per model (ResNet-50, ViT-B/16, VGG16 at 224², GPT-2 small at 16 tokens) and batch size (1 and
32): medians of the gradient (forward + ``autograd.grad``), the eager replay and the compiled
replay (``Explainer(compile=True)``; its compile time reported apart), and the CUDA kernels each
launches according to ``torch.profiler`` (the forward's kernels subtracted from all three).

Usage (a device's ``run``, with a time limit that leaves room to rerun)::

    python benchmarks/gpu_replay.py --out $OUT/gpu_replay.json          # all, batch 1 and 32
    python benchmarks/gpu_replay.py --models resnet50,gpt2 --batches 1 --reps 5

Prints a Markdown table with the card's name; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import performance as P  # noqa: E402  (the models and inputs of the CPU harness)
from kernel_count import count_cuda_launches  # noqa: E402

import lrpplan  # noqa: E402


def _median_ms(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(name: str, batch: int, reps: int) -> dict:
    case = P.KERNEL_CASES[name]
    model = case.build().cuda()
    x = case.make_input(model, batch).cuda()

    def forward() -> None:
        with torch.enable_grad():
            P._score(model(x.detach().requires_grad_(True)))

    def gradient() -> None:
        with torch.enable_grad():
            h = x.detach().requires_grad_(True)
            torch.autograd.grad(P._score(model(h)), h)

    eager = lrpplan.Explainer(model, cache=False)
    eager(x)
    compiled = lrpplan.Explainer(model, cache=False, compile=True)
    compiled(x)
    t0 = time.perf_counter()
    compiled(x)
    compile_s = time.perf_counter() - t0
    modes = {"gradient": gradient, "eager": lambda: eager(x), "compiled": lambda: compiled(x)}
    for fn in modes.values():  # warm-up
        fn()
    ms = {m: _median_ms(fn, reps) for m, fn in modes.items()}
    fwd = count_cuda_launches(forward)
    kernels = {m: count_cuda_launches(fn) - fwd for m, fn in modes.items()}
    return {"model": name, "input": P.KERNEL_DESC[name], "batch": batch, "ms": ms,
            "kernels": kernels, "forward_kernels": fwd, "compile_s": compile_s}


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | gradient | eager replay | compiled replay | kernels: backward "
             "| eager | compiled | compile |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms, k = r["ms"], r["kernels"]
        g = ms["gradient"]
        lines.append(
            f"| {r['model']} ({r['input']}) | {r['batch']} | {g:.2f} ms "
            f"| {ms['eager']:.2f} ms ({ms['eager'] / g:.2f}x) "
            f"| {ms['compiled']:.2f} ms ({ms['compiled'] / g:.2f}x) | {k['gradient']} "
            f"| {k['eager']} ({k['eager'] / k['gradient']:.2f}x) "
            f"| {k['compiled']} ({k['compiled'] / k['gradient']:.2f}x) | {r['compile_s']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(P.KERNEL_CASES))
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("gpu_replay.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_replay.py needs a CUDA device")
    card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}", flush=True)
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            rows.append(measure(name, batch, args.reps))
            print(json.dumps(rows[-1]), flush=True)
            args.out.write_text(json.dumps({"card": card, "torch": torch.__version__,
                                            "rows": rows}, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
