""":func:`explain_dataset`: explain every sample of a data set with one compiled plan.

Order of work on every rank (one process is rank 0 of 1):

1. verify: the shards ``i`` with ``i % world == rank`` are checked (sidecar, checksums); done
   ones are kept, corrupt ones deleted with a warning; rank 0 removes ``.tmp-*`` leftovers;
2. one all-reduce tells every rank which shards are done; the pending ones are dealt round-robin
   (``pending[rank::world]``: DistributedSampler's split over shards, without padding, so every
   sample is explained exactly once and the work of a resumed run is balanced again);
3. rank 0 explains its first pending shard: it traces and stores the plan in the plan cache;
   a barrier; the other ranks start and load the plan from the cache (their first call replays);
4. each rank writes its shards; a barrier; rank 0 writes ``index.json`` over all shards;
   a last all-reduce gives every rank the same :class:`DatasetSummary`.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import xxhash

from ..api import CacheArg, Explainer
from ..config import RuleSet
from ..errors import InvalidInputError
from .distributed import Comm
from .inputs import Source, describe_target, model_digest, resolve_device, source, split_batch
from .shards import INDEX_NAME, ShardSpec, ShardStore, layout
from .summary import CONSERVATION, STATS, DatasetSummary, conservation, index_header

__all__ = ["DatasetSummary", "explain_dataset"]

DatasetLike = Union[torch.utils.data.Dataset, torch.utils.data.DataLoader]


# ---------------------------------------------------------------------------------------------
# the run


class _Progress:
    """A tqdm bar on rank 0 when asked for and stderr is a terminal; otherwise nothing."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self.bar = None
        if enabled and total > 0 and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                warnings.warn("install tqdm for a progress bar (pip install tqdm)", stacklevel=3)
            else:
                self.bar = tqdm(total=total, desc=desc, unit="sample", unit_scale=False,
                                dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Runner:
    """Explains the shards of one rank; keeps its timings."""

    def __init__(self, explainer: Explainer, store: ShardStore, rank: int, target: Any,
                 device: Optional[torch.device], progress: _Progress) -> None:
        self.explainer, self.store, self.rank = explainer, store, rank
        self.target, self.device, self.progress = target, device, progress
        self.stats = dict.fromkeys(STATS, 0.0)
        self.stats["first_cached"] = -1.0
        self._first = True

    def shard(self, spec: ShardSpec, batch: Any, load_s: float) -> None:
        inputs, data_targets = split_batch(batch)
        if inputs[0].shape[0] != spec.size:
            raise InvalidInputError(f"shard {spec.index}: the batch holds {inputs[0].shape[0]} "
                                    f"samples, expected {spec.size} (a collate_fn must keep one "
                                    "row per sample)")
        if data_targets is not None:
            target = data_targets
        elif isinstance(self.target, torch.Tensor):
            target = self.target[spec.start:spec.stop]
        else:
            target = self.target
        if self.device is not None:
            inputs = tuple(x.to(self.device, non_blocking=True) for x in inputs)
        t0 = time.perf_counter()
        attr = self.explainer(*inputs, target=target)
        rel = attr.relevance if isinstance(attr.relevance, tuple) else (attr.relevance,)
        arrays = [None if r is None else r.detach().cpu().numpy() for r in rel]
        scores = attr.output.detach().double().cpu()
        dt = time.perf_counter() - t0
        led = attr.ledger
        meta = {
            "ids": list(range(spec.start, spec.stop)),
            "targets": (attr.target.detach().cpu().tolist()
                        if isinstance(attr.target, torch.Tensor) else None),
            "scores": scores.tolist(),
            "relevance_sums": sum((a.reshape(a.shape[0], -1).sum(1, dtype=np.float64)
                                   for a in arrays if a is not None),
                                  np.zeros(spec.size)).tolist(),
            "plan_key": attr.plan_key,
            "ledger": {"start": led.start, "at_inputs": led.at_inputs, "absorbed": led.absorbed,
                       "residual": led.residual, "closes": led.closes()},
        }
        t1 = time.perf_counter()
        self.store.write(self.rank, spec, arrays, meta)
        s = self.stats
        s["write_s"] += time.perf_counter() - t1
        s["load_s"] += load_s
        s["trace_s" if not attr.cached else "replay_s"] += dt
        s["traces"] += 0 if attr.cached else 1
        if self._first:
            s["first_cached"] = float(attr.cached)
            self._first = False
        s["new_samples"] += spec.size
        s["new_shards"] += 1
        self.progress.update(spec.size)


def explain_dataset(model: torch.nn.Module, data: DatasetLike, target: Any = None,
                    rules: Any = None, out: "str | os.PathLike[str]" = "lrpplan-dataset",
                    batch_size: Optional[int] = None, device: Any = None, cache: CacheArg = None,
                    num_workers: Optional[int] = None, progress: bool = True,
                    compile: bool = False) -> DatasetSummary:
    """Explain every sample of ``data`` and write the relevance to ``out`` as ``.npy`` shards.

    One :class:`~lrpplan.Explainer` traces the first batch and replays the compiled plan for all
    others. The run is resumable (finished shards are verified by checksum and skipped) and runs
    unchanged under ``torchrun`` (each process explains its share; one index covers all).
    See ``docs/dataset.md`` for the output format.

    Parameters
    ----------
    model:
        the model, in the mode to explain (usually after ``.eval()``); moved to ``device`` when
        one is given.
    data:
        a map-style ``Dataset`` or a ``DataLoader`` over one, whose samples are a tensor,
        ``(inputs,)`` or ``(inputs, target)`` (``inputs`` a tensor or a tuple of tensors, the
        model's positional arguments). A DataLoader's collate_fn, workers and pin_memory are
        used; its sampler is not: samples are explained in index order, and a sample's id is its
        index in the data set.
    target:
        ``None`` (argmax per sample), an int, one class per data set sample (sequence or tensor
        of ``len(dataset)``), or a callable mapping the output to one score per sample. Targets
        the data set yields override it.
    rules:
        a preset name or a :class:`~lrpplan.RuleSet` (default ``"epsilon"``).
    out:
        output directory (created; on several nodes: a shared file system).
    batch_size:
        samples per batch and per shard (default: the DataLoader's, else 32). Resuming needs the
        same value.
    device:
        where to explain (``"cuda"`` means ``cuda:LOCAL_RANK`` under torchrun); default: the
        model's device.
    cache:
        the plan cache: a :class:`~lrpplan.PlanCache`, a directory, ``None`` (default cache) or
        ``False``. Under torchrun, rank 0 compiles and the others load the plan from it, so on
        several nodes it must be on a shared file system.
    num_workers:
        DataLoader worker processes (default: the DataLoader's, else 0).
    progress:
        show a progress bar (rank 0, only when stderr is a terminal) and print the summary to
        stderr (rank 0).
    compile:
        replay the plan through ``torch.compile`` (see :class:`~lrpplan.Explainer`): the first
        replayed batch compiles, every later one runs the compiled code (the last, smaller batch
        may compile once more, for dynamic shapes).

    Returns
    -------
    DatasetSummary
        the same on every rank.

    Raises
    ------
    DatasetMismatchError
        ``out`` holds shards of another configuration (model weights, rules, target, data set
        size or batch size).
    """
    t_start = time.perf_counter()
    src = source(data, batch_size, num_workers)
    n = len(src.dataset)
    ruleset = RuleSet.ensure(rules)
    target_val, target_desc = describe_target(target, n)
    if isinstance(model, torch.nn.Module) and model.training:
        warnings.warn("explain_dataset: the model is in training mode (dropout, batch "
                      "statistics make a sample's relevance depend on its batch); call "
                      ".eval() first", stacklevel=2)
    dev = resolve_device(device, model)
    comm = Comm.setup(dev)
    try:
        if device is not None and isinstance(model, torch.nn.Module):
            model.to(dev)
        return _run(model, src, n, ruleset, target_val, target_desc, Path(out), dev, cache,
                    comm, progress, t_start, compile)
    finally:
        comm.close()


def _run(model, src: Source, n: int, ruleset: RuleSet, target_val: Any, target_desc: Any,
         out: Path, dev: Optional[torch.device], cache: CacheArg, comm: Comm, progress: bool,
         t_start: float, compile: bool = False) -> DatasetSummary:
    from torch.utils.data import DataLoader

    from .. import __version__

    rank, world = comm.rank, comm.world
    config = {"n_samples": n, "shard_size": src.batch_size, "rules": ruleset.config(),
              "target": target_desc, "model": model_digest(model)}
    run_key = xxhash.xxh3_128(json.dumps(config, sort_keys=True).encode()).hexdigest()
    store = ShardStore(out, run_key, config)
    specs = layout(n, src.batch_size)
    explainer = Explainer(model, rules=ruleset, cache=cache, compile=compile)
    runner = _Runner(explainer, store, rank, target_val, dev, _Progress(False, 0, ""))

    # 1-2. verify this rank's share, then learn the state of every shard
    owner = torch.zeros(len(specs), dtype=torch.int64)  # writer rank + 1, 0 = pending
    error: Optional[BaseException] = None
    t0 = time.perf_counter()
    try:
        out.mkdir(parents=True, exist_ok=True)
        groups = store.scan()
        for spec in specs[rank::world]:
            done_by, corrupt = store.verify(spec, groups.get(spec.index, ()))
            if done_by is not None:
                owner[spec.index] = done_by + 1
                runner.stats["skipped_samples"] += spec.size
            runner.stats["corrupt_shards"] += corrupt
        if rank == 0:
            store.remove_temporaries()
    except Exception as exc:
        error = exc
    runner.stats["verify_s"] = time.perf_counter() - t0
    comm.sync_failure(error is not None, "verifying the output directory")
    if error is not None:
        raise error
    owner_of = comm.all_sum(owner).tolist()
    pending = [s for s in specs if owner_of[s.index] == 0]
    mine = pending[rank::world]
    for i, s in enumerate(pending):
        owner_of[s.index] = i % world + 1

    # 3-4. explain: rank 0 first (compiles the plan into the cache), then everybody
    if rank == 0 and pending:
        store.remove_index()  # present again only when every shard is done
    bar = runner.progress = _Progress(progress and rank == 0, sum(s.size for s in mine),
                                      f"rank 0/{world}" if world > 1 else "explain")
    todo = list(mine)
    try:
        try:
            loader = DataLoader(src.dataset, batch_sampler=[list(range(s.start, s.stop))
                                                            for s in mine], **src.loader_kwargs)
            batches = iter(loader)
            if rank == 0 and todo:
                _next_shard(runner, todo.pop(0), batches)
        except Exception as exc:
            error = exc
        comm.sync_failure(error is not None, "compiling the plan (rank 0's first batch)")
        if error is not None:
            raise error
        try:
            for spec in todo:
                _next_shard(runner, spec, batches)
        except Exception as exc:
            error = exc
    finally:
        bar.close()
    comm.sync_failure(error is not None, "explaining their shards")
    if error is not None:
        raise error

    # the index, then the summary every rank returns
    cons = dict.fromkeys(CONSERVATION, 0.0)
    keys: list[str] = []
    if rank == 0:
        try:
            records = [store.read_sidecar(owner_of[s.index] - 1, s) for s in specs]
            cons = conservation(records)
            keys = list(dict.fromkeys(r["plan_key"] for r in records))
            model_class = f"{type(model).__module__}.{type(model).__qualname__}"
            store.write_index(records, index_header(config, run_key, n, src.batch_size, records,
                                                    keys, cons, __version__, model_class))
        except Exception as exc:
            error = exc
    comm.sync_failure(error is not None, "writing the index")
    if error is not None:
        raise error
    keys = comm.broadcast(keys)  # rank 0's, from the index, for everybody
    runner.stats["wall_s"] = time.perf_counter() - t_start
    table = torch.zeros(world, len(STATS) + len(CONSERVATION), dtype=torch.float64)
    table[rank, :len(STATS)] = torch.tensor([runner.stats[k] for k in STATS],
                                            dtype=torch.float64)
    if rank == 0:
        table[0, len(STATS):] = torch.tensor([cons[k] for k in CONSERVATION],
                                             dtype=torch.float64)
    summary = DatasetSummary.from_table(comm.all_sum(table), rank, out, out / INDEX_NAME, n,
                                        len(specs), keys)
    if progress and rank == 0:
        print(summary.format(), file=sys.stderr)
    return summary


def _next_shard(runner: _Runner, spec: ShardSpec, batches: Any) -> None:
    t0 = time.perf_counter()
    batch = next(batches)
    runner.shard(spec, batch, time.perf_counter() - t0)
