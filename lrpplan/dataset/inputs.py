"""What goes into a run: the data source, batches, targets, the model's identity, the device."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import xxhash

from ..errors import InvalidInputError

__all__ = ["DEFAULT_BATCH_SIZE", "Source", "describe_target", "model_digest", "resolve_device",
           "source", "split_batch"]

DEFAULT_BATCH_SIZE = 32


@dataclass
class Source:
    """A map-style data set, the batch (= shard) size and the DataLoader options to read it."""

    dataset: Any
    batch_size: int
    loader_kwargs: dict[str, Any]


def source(data: Any, batch_size: Optional[int], num_workers: Optional[int]) -> Source:
    """The data set, shard size and DataLoader options from a Dataset or a DataLoader."""
    from torch.utils.data import DataLoader, IterableDataset, default_collate

    kwargs: dict[str, Any] = {"collate_fn": default_collate, "num_workers": 0}
    if isinstance(data, DataLoader):
        dataset = data.dataset
        kwargs.update(collate_fn=data.collate_fn, num_workers=data.num_workers,
                      pin_memory=data.pin_memory, worker_init_fn=data.worker_init_fn,
                      multiprocessing_context=data.multiprocessing_context, timeout=data.timeout)
        if data.num_workers > 0 and data.prefetch_factor is not None:
            kwargs["prefetch_factor"] = data.prefetch_factor
        if batch_size is None:
            batch_size = data.batch_size
            if batch_size is None:
                raise InvalidInputError("the DataLoader has no batch_size (it uses a "
                                        "batch_sampler); pass batch_size=")
    else:
        dataset = data
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__") or \
            not hasattr(dataset, "__len__"):
        raise InvalidInputError(
            f"data must be a map-style Dataset (with __len__ and __getitem__) or a DataLoader "
            f"over one, got {type(dataset).__name__}: samples are identified by their index, "
            "which is what makes a run resumable and splittable across processes")
    if num_workers is not None:
        kwargs["num_workers"] = int(num_workers)
        if kwargs["num_workers"] == 0:  # options DataLoader refuses without workers
            kwargs.pop("prefetch_factor", None)
            kwargs.pop("multiprocessing_context", None)
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be positive, got {batch_size}")
    return Source(dataset, batch_size, kwargs)


def split_batch(batch: Any) -> tuple[tuple, Optional[torch.Tensor]]:
    """``(model inputs, data set targets or None)`` of one collated batch."""
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (list, tuple)) and len(batch) in (1, 2):
        inputs = batch[0]
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        if not all(isinstance(x, torch.Tensor) for x in inputs):
            raise InvalidInputError("the inputs of a sample must be tensors (or a tuple of them)")
        if len(batch) == 1:
            return inputs, None
        targets = torch.as_tensor(batch[1])
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise InvalidInputError(
                f"a sample (inputs, target) was read with a {targets.dtype} target; targets "
                "must be class indices. Several model inputs are yielded as ((x1, x2), target) "
                "or ((x1, x2),); other targets: yield inputs only and pass target=")
        return inputs, targets.reshape(-1)
    raise InvalidInputError(
        f"a sample must be a tensor, (inputs,) or (inputs, target); the batch was a "
        f"{type(batch).__name__}" + (f" of {len(batch)} items" if hasattr(batch, "__len__")
                                     else ""))


def describe_target(target: Any, n: int) -> tuple[Any, Any]:
    """``(per-sample target array or the target itself, JSON description for the run key)``."""
    if target is None:
        return None, "argmax"
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        return int(target), {"class": int(target)}
    if isinstance(target, torch.Tensor) and target.dim() == 0:
        return int(target), {"class": int(target)}
    if callable(target) and not isinstance(target, torch.Tensor):
        name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"
        return target, {"callable": name}
    arr = torch.as_tensor(target).long().reshape(-1)
    if arr.numel() != n:
        raise InvalidInputError(f"target has {arr.numel()} entries for a data set of {n} "
                                "samples (give one class per sample, an int, None or a callable)")
    digest = xxhash.xxh3_128(arr.cpu().numpy().tobytes()).hexdigest()
    return arr, {"per_sample": digest}


def model_digest(model: Any) -> dict[str, Any]:
    """xxh3-128 over the state dict (names, dtypes, shapes, bytes): same weights, same digest."""
    if not isinstance(model, torch.nn.Module):
        return {"callable": f"{getattr(model, '__module__', '?')}."
                            f"{getattr(model, '__qualname__', type(model).__qualname__)}"}
    h = xxhash.xxh3_128()
    count = 0
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        count += 1
    return {"state_xxh3": h.hexdigest(), "tensors": count}


def resolve_device(device: Any, model: Any) -> Optional[torch.device]:
    """The compute device: ``device`` (``cuda`` = ``cuda:LOCAL_RANK``), else the model's."""
    if device is None:
        if not isinstance(model, torch.nn.Module):
            return None
        p = next(iter(model.parameters()), None)
        return p.device if p is not None else None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return device
