"""Trace vs replay vs a plain gradient, for the demo CNN and a small transformer.

For each model, the median wall time over ``--runs`` runs (after ``--warmup`` untimed runs) of:

``gradient``   forward + ``torch.autograd.grad(score, input)``: the floor (DESIGN.md,
               "Performance model");
``trace``      ``lrpplan.explain(..., cache=False)``: forward, capture, fingerprint, Promise
               traversal and plan compilation, every run;
``replay``     ``Explainer`` from its second call on: forward, capture, fingerprint, plan replay;
``capture``    ``lrpplan.graph.capture`` + ``lrpplan.fingerprint.fingerprint`` alone on a fresh
               graph (the forward that builds the graph is not timed).

Ratios are to ``gradient`` of the same model in the same process. For the transformer the
gradient is taken w.r.t. the embedding output (token ids have no gradient); lrpplan explains the
token ids (relevance per token through the embedding).

Usage::

    python benchmarks/trace_vs_replay.py [--runs 10] [--threads N]

Writes ``benchmarks/results/trace_vs_replay.json`` (git-ignored).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import lrpplan
from lrpplan.cli import demo_model
from lrpplan.fingerprint import fingerprint
from lrpplan.graph import capture

RESULTS = Path(__file__).resolve().parent / "results" / "trace_vs_replay.json"


class Block(nn.Module):
    """Pre-norm transformer block: LayerNorm, SDPA self-attention, LayerNorm, GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Token + position embedding, 2 blocks, final LayerNorm, classifier on the last token."""

    def __init__(self, vocab: int = 100, dim: int = 64, heads: int = 4, layers: int = 2,
                 max_len: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(max_len, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def body(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.pos[: h.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln(h))[:, -1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body(self.tok(ids))


def median_ms(fn: Callable[[], object], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_model(name: str, model: nn.Module, x: torch.Tensor, runs: int, warmup: int) -> dict:
    tokens = not x.is_floating_point()

    def gradient() -> None:
        with torch.enable_grad():
            if tokens:
                h = model.tok(x).detach().requires_grad_(True)
                out = model.body(h)
            else:
                h = x.detach().requires_grad_(True)
                out = model(h)
            score = out.gather(-1, out.detach().argmax(-1, keepdim=True)).sum()
            torch.autograd.grad(score, h)

    def trace() -> None:
        attr = lrpplan.explain(model, x, cache=False)
        assert not attr.cached

    explainer = lrpplan.Explainer(model, cache=False)
    first = explainer(x)
    assert not first.cached

    def replay() -> None:
        attr = explainer(x)
        assert attr.cached

    rules = lrpplan.RuleSet.preset("epsilon").config()
    walk_times = []

    def capture_walk() -> float:
        with torch.enable_grad():
            inp = x if tokens else x.detach().requires_grad_(True)
            score = model(inp)[:, 0].sum()
            t0 = time.perf_counter()
            ge = torch.autograd.graph.get_gradient_edge(score)
            graph = capture([(ge.node, ge.output_nr)])
            fingerprint(graph, [], rules)
            return (time.perf_counter() - t0) * 1e3

    for _ in range(warmup):
        capture_walk()
    walk_times = [capture_walk() for _ in range(runs)]

    row = {
        "model": name,
        "input": "x".join(map(str, x.shape)) + (":int64" if tokens else ""),
        "nodes": first.plan.stats.get("nodes"),
        "plan_steps": len(first.plan.steps),
        "promises": first.plan.stats.get("promises"),
        "gradient_ms": median_ms(gradient, runs, warmup),
        "trace_ms": median_ms(trace, runs, warmup),
        "replay_ms": median_ms(replay, runs, warmup),
        "capture_fingerprint_ms": statistics.median(walk_times),
    }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cnn = demo_model()
    gen = torch.Generator().manual_seed(0)
    x_img = torch.randn(1, 3, 32, 32, generator=gen)
    torch.manual_seed(0)
    tf = TinyTransformer().eval()
    ids = torch.randint(0, 100, (1, 32), generator=gen)

    rows = [bench_model("demo CNN", cnn, x_img, args.runs, args.warmup),
            bench_model("2-layer transformer", tf, ids, args.runs, args.warmup)]

    cols = [("gradient", "gradient_ms"), ("trace", "trace_ms"), ("replay", "replay_ms"),
            ("capture+fp", "capture_fingerprint_ms")]
    print(f"median of {args.runs} runs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}")
    head = f"{'model':<22}{'input':<13}{'nodes':>6}" + "".join(f"{c:>20}" for c, _ in cols)
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = []
        for _, k in cols:
            ratio = r[k] / r["gradient_ms"] if r["gradient_ms"] > 0 else math.nan
            cells.append(f"{r[k]:9.2f} ms ({ratio:4.1f}x)")
        print(f"{r['model']:<22}{r['input']:<13}{r['nodes']:>6}" + "".join(f"{c:>20}" for c in cells))
    print("ratios are to 'gradient' (forward + torch.autograd.grad) of the same model")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"runs": args.runs, "warmup": args.warmup, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "python": platform.python_version(),
           "machine": platform.machine(), "rows": rows}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
