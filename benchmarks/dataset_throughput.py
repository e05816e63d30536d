"""Throughput of ``lrpplan.dataset.explain_dataset``: samples/s for 1 and 2 processes on CPU.

Explains ``--samples`` random 3x32x32 images with the demo CNN (``lrpplan demo``'s model) in
batches (= shards) of ``--batch-size``, each configuration in fresh subprocesses with a fresh plan
cache and output directory, so every run traces once and replays the rest:

``1 proc``          one process, torch's default intra-op threads;
``1 proc, 1 thr``   one process, ``OMP_NUM_THREADS=1``;
``2 procs``         ``torchrun --standalone --nproc_per_node 2`` (gloo), one thread each;
``cuda``            one process on the GPU (only when CUDA is available).

Reported per configuration: wall time of the call (slowest rank, including process group set-up,
verification, writing shards and the index), samples/s = samples / wall, the share of explanation
time spent in the tracing batch, and the number of traced batches (1: only rank 0 traced, the
other rank loaded the plan from the cache). A ``gradient`` row gives the floor: forward +
``torch.autograd.grad`` over the same batches in one process, no writing.

Usage::

    python benchmarks/dataset_throughput.py [--samples 1024] [--batch-size 32] [--repeats 3]

Each row is the run with the median samples/s of ``--repeats`` runs.

Writes ``benchmarks/results/dataset_throughput.json`` (git-ignored).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "dataset_throughput.json"
HERE = Path(__file__).resolve()


def make_data(n: int) -> torch.utils.data.Dataset:
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.TensorDataset(x)


def worker(args: argparse.Namespace) -> None:
    """One process of a configuration (run directly or under torchrun)."""
    from lrpplan.cli import demo_model
    from lrpplan.dataset import explain_dataset

    s = explain_dataset(demo_model(), make_data(args.samples), out=args.out,
                        batch_size=args.batch_size, device=args.device, cache=args.cache,
                        progress=False)
    if s.rank == 0:
        Path(args.report).write_text(json.dumps({
            "world": s.world_size, "samples": s.new_samples, "wall_s": s.wall_s,
            "samples_per_s": s.samples_per_s, "trace_s": s.trace_s, "replay_s": s.replay_s,
            "trace_share": s.trace_share, "traces": s.traces, "write_s": s.write_s,
            "load_s": s.load_s, "first_call_cached": list(s.first_call_cached),
            "threads": torch.get_num_threads()}))


def gradient_floor(n: int, batch: int, device: str) -> dict:
    """forward + autograd.grad over the same batches: what any attribution costs at least."""
    from lrpplan.cli import demo_model

    model = demo_model().to(device)
    x = make_data(n).tensors[0]
    with torch.no_grad():
        model(x[:batch].to(device))  # warm-up
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        xb = x[s:s + batch].to(device).requires_grad_(True)
        out = model(xb)
        score = out.gather(1, out.argmax(1, keepdim=True)).sum()
        (g,) = torch.autograd.grad(score, xb)
        g.cpu()
    wall = time.perf_counter() - t0
    return {"world": 1, "samples": n, "wall_s": wall, "samples_per_s": n / wall,
            "threads": torch.get_num_threads()}


def launch(name: str, nproc: int, threads: int | None, args: argparse.Namespace,
           device: str = "cpu") -> dict:
    with tempfile.TemporaryDirectory(prefix="lrpplan-bench-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable]
        if nproc > 1:
            cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += [str(HERE), "--worker", "--out", f"{tmp}/out", "--cache", f"{tmp}/cache",
                "--report", str(report), "--samples", str(args.samples),
                "--batch-size", str(args.batch_size), "--device", device]
        env = dict(os.environ)
        env.pop("OMP_NUM_THREADS", None)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stdout}\n{proc.stderr}")
        result = json.loads(report.read_text())
    result.update(config=name, procs=nproc, device=device)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (median)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    def median(make) -> dict:
        runs = sorted((make() for _ in range(max(1, args.repeats))),
                      key=lambda r: r["samples_per_s"])
        return dict(runs[len(runs) // 2], runs=[r["samples_per_s"] for r in runs])

    rows = [median(lambda: dict(gradient_floor(args.samples, args.batch_size, "cpu"),
                                config="gradient (cpu)", procs=1, device="cpu"))]
    rows.append(median(lambda: launch("1 proc", 1, None, args)))
    rows.append(median(lambda: launch("1 proc, 1 thr", 1, 1, args)))
    rows.append(median(lambda: launch("2 procs", 2, 1, args)))
    if torch.cuda.is_available():
        rows.append(median(lambda: dict(gradient_floor(args.samples, args.batch_size, "cuda"),
                                        config="gradient (cuda)", procs=1, device="cuda")))
        rows.append(median(lambda: launch("cuda", 1, None, args, device="cuda")))

    cpu = f"{os.cpu_count()} CPU cores"
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    print(f"explain_dataset throughput: demo CNN, {args.samples} samples of 3x32x32, batch "
          f"{args.batch_size}; torch {torch.__version__}, {cpu}{gpu}")
    print(f"{'config':<16}{'procs':>6}{'threads':>8}{'wall s':>9}{'samples/s':>11}"
          f"{'trace share':>13}{'traces':>8}")
    for r in rows:
        share = f"{100 * r['trace_share']:.1f}%" if "trace_share" in r else "-"
        print(f"{r['config']:<16}{r['procs']:>6}{r['threads']:>8}{r['wall_s']:>9.2f}"
              f"{r['samples_per_s']:>11.1f}{share:>13}{r.get('traces', '-'):>8}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "samples": args.samples, "batch_size": args.batch_size, "torch": torch.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "rows": rows}, indent=1))
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
