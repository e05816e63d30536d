"""The :class:`DatasetSummary` of a run and the data set statistics written to ``index.json``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .shards import CHECKSUM, FORMAT_VERSION, INDEX_FORMAT

__all__ = ["CONSERVATION", "STATS", "DatasetSummary", "conservation", "index_header"]

STATS = ("new_samples", "skipped_samples", "new_shards", "corrupt_shards", "traces",
         "first_cached", "trace_s", "replay_s", "load_s", "write_s", "verify_s", "wall_s")
"""Per-rank counters and timings, all-reduced into the summary (first_cached: -1 no work)."""

CONSERVATION = ("mean_abs_residual", "max_abs_residual", "max_rel_residual", "shards_closing",
                "mean_input_share")


@dataclass(frozen=True)
class DatasetSummary:
    """What one :func:`explain_dataset` call did (the same on every rank).

    Attributes
    ----------
    out, index:
        the output directory and its ``index.json``.
    samples, shards:
        size of the data set and number of shards.
    new_samples, new_shards:
        explained by this call (0 on a finished directory).
    skipped_samples:
        found finished and verified.
    corrupt_shards:
        finished shards that failed verification and were computed again.
    rank, world_size:
        this process and the number of processes.
    wall_s:
        wall time of the call (the slowest rank).
    trace_s, replay_s:
        time in explanations that traced a plan / replayed one (summed over ranks; includes
        the forward pass and copying relevance to the host).
    load_s, write_s, verify_s:
        time waiting for data, writing shards, verifying shards (summed over ranks).
    traces:
        explanations that traced (over all ranks): 1 for a fresh plan cache, 0 when the plan was
        cached before.
    first_call_cached:
        per rank, whether its first explanation replayed a cached plan (None: no work).
    plan_keys:
        the plan keys of the explanations (usually one).
    mean_abs_residual, max_abs_residual, max_rel_residual:
        the ledger residual (relevance start − at inputs − absorbed) per shard over the data set.
    shards_closing:
        shards whose ledger closes (``Ledger.closes()``).
    mean_input_share:
        mean over samples of (relevance summed over the inputs) / (explained score), over
        samples with a non-zero score.
    """

    out: Path
    index: Path
    samples: int
    shards: int
    new_samples: int
    new_shards: int
    skipped_samples: int
    corrupt_shards: int
    rank: int
    world_size: int
    wall_s: float
    trace_s: float
    replay_s: float
    load_s: float
    write_s: float
    verify_s: float
    traces: int
    first_call_cached: tuple[Optional[bool], ...]
    plan_keys: tuple[str, ...]
    mean_abs_residual: float
    max_abs_residual: float
    max_rel_residual: float
    shards_closing: int
    mean_input_share: float

    @property
    def samples_per_s(self) -> float:
        """New samples per second of wall time (all ranks together)."""
        return self.new_samples / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def trace_share(self) -> float:
        """Share of explanation time spent in tracing runs (the rest replayed)."""
        total = self.trace_s + self.replay_s
        return self.trace_s / total if total > 0 else 0.0

    @classmethod
    def from_table(cls, table: torch.Tensor, rank: int, out: Path, index: Path, samples: int,
                   shards: int, plan_keys: Sequence[str]) -> "DatasetSummary":
        """From the all-reduced ``[world, STATS + CONSERVATION]`` table (conservation: row 0)."""
        col = {k: table[:, i] for i, k in enumerate(STATS)}
        c = dict(zip(CONSERVATION, table[0, len(STATS):].tolist()))
        first = tuple(None if v < 0 else bool(v) for v in col["first_cached"].tolist())
        return cls(
            out=out, index=index, samples=samples, shards=shards,
            new_samples=int(col["new_samples"].sum()), new_shards=int(col["new_shards"].sum()),
            skipped_samples=int(col["skipped_samples"].sum()),
            corrupt_shards=int(col["corrupt_shards"].sum()), rank=rank,
            world_size=table.shape[0], wall_s=float(col["wall_s"].max()),
            trace_s=float(col["trace_s"].sum()), replay_s=float(col["replay_s"].sum()),
            load_s=float(col["load_s"].sum()), write_s=float(col["write_s"].sum()),
            verify_s=float(col["verify_s"].sum()), traces=int(col["traces"].sum()),
            first_call_cached=first, plan_keys=tuple(plan_keys),
            mean_abs_residual=c["mean_abs_residual"], max_abs_residual=c["max_abs_residual"],
            max_rel_residual=c["max_rel_residual"], shards_closing=int(c["shards_closing"]),
            mean_input_share=c["mean_input_share"])

    def format(self) -> str:
        """A few human-readable lines."""
        procs = f" on {self.world_size} processes" if self.world_size > 1 else ""
        lines = [
            f"explained {self.new_samples} of {self.samples} samples ({self.new_shards} of "
            f"{self.shards} shards){procs} in {self.wall_s:.2f} s: "
            f"{self.samples_per_s:.1f} samples/s",
            f"skipped {self.skipped_samples} finished samples"
            + (f"; recomputed {self.corrupt_shards} corrupt shards" if self.corrupt_shards
               else ""),
            f"explain time: trace {self.trace_s:.3f} s ({self.traces} traced "
            f"batch{'es' if self.traces != 1 else ''}), replay "
            f"{self.replay_s:.3f} s; trace share {100 * self.trace_share:.1f}%",
            f"other time: loading data {self.load_s:.3f} s, writing {self.write_s:.3f} s, "
            f"verifying {self.verify_s:.3f} s",
            f"conservation over the data set: |residual| mean {self.mean_abs_residual:.3g}, "
            f"max {self.max_abs_residual:.3g} (relative {self.max_rel_residual:.3g}); "
            f"{self.shards_closing}/{self.shards} shards close; mean share of the score at the "
            f"inputs {self.mean_input_share:.4g}",
            f"plan: {', '.join(self.plan_keys) or '-'}",
            f"index: {self.index}",
        ]
        return "\n".join(lines)


def conservation(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Ledger residuals per shard and the share of each score found at the inputs."""
    res = [abs(r["ledger"]["residual"]) for r in records]
    rel = [abs(r["ledger"]["residual"]) / max(abs(r["ledger"]["start"]), 1e-30)
           for r in records]
    shares = [rs / sc for r in records for rs, sc in zip(r["relevance_sums"], r["scores"])
              if sc != 0]
    return {"mean_abs_residual": float(np.mean(res)) if res else 0.0,
            "max_abs_residual": max(res, default=0.0),
            "max_rel_residual": max(rel, default=0.0),
            "shards_closing": float(sum(bool(r["ledger"]["closes"]) for r in records)),
            "mean_input_share": float(np.mean(shares)) if shares else math.nan}


def index_header(config: dict[str, Any], run_key: str, n: int, shard_size: int,
                  records: Sequence[dict[str, Any]], keys: list[str], cons: dict[str, float],
                  version: str, model_class: str) -> dict[str, Any]:
    """Everything in ``index.json`` but the shard list (no timings: resumed runs give the same
    bytes as uninterrupted ones)."""
    inputs: dict[int, dict[str, Any]] = {}
    for r in records:
        for f in r["files"]:
            info = inputs.setdefault(f["input"], {"input": f["input"],
                                                  "sample_shape": f["shape"][1:],
                                                  "dtype": f["dtype"]})
            if info["sample_shape"] != f["shape"][1:]:
                info["sample_shape"] = None  # varies between shards (e.g. padded per batch)
    dtypes = sorted({i["dtype"] for i in inputs.values()})
    cons = dict(cons, shards_closing=int(cons["shards_closing"]))
    if math.isnan(cons["mean_input_share"]):
        cons["mean_input_share"] = None
    return {
        "format": INDEX_FORMAT, "version": FORMAT_VERSION,
        "lrpplan": version, "torch": torch.__version__, "numpy": np.__version__,
        "run": run_key, "n_samples": n, "n_shards": len(records), "shard_size": shard_size,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "inputs": [inputs[k] for k in sorted(inputs)],
        "rules": config["rules"], "rule_preset": config["rules"].get("name"),
        "target": config["target"], "model": config["model"], "model_class": model_class,
        "plan_keys": keys, "checksum": CHECKSUM, "conservation": cons,
    }
