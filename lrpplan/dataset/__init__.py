"""Data-set-scale explanation: one trace, then replays; resumable; runs under ``torchrun``.

>>> import torch, lrpplan.dataset
>>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
>>> data = torch.utils.data.TensorDataset(torch.randn(10, 3, 4))
>>> import tempfile; out = tempfile.mkdtemp()
>>> summary = lrpplan.dataset.explain_dataset(model, data, out=out, batch_size=4, cache=False,
...                                           progress=False)
>>> (summary.new_samples, summary.shards, summary.traces)
(10, 3, 1)
>>> ids, relevance = lrpplan.dataset.load(out)
>>> relevance.shape
(10, 3, 4)

Modules: :mod:`.runner` (:func:`explain_dataset`, :class:`DatasetSummary`), :mod:`.shards`
(output directory: atomic shard files, sidecars, verification, ``index.json``, :func:`load`),
:mod:`.distributed` (process group, all-reduce barriers). Output format and the ``torchrun``
commands: ``docs/dataset.md``.
"""
from __future__ import annotations

from .runner import DatasetSummary, explain_dataset
from .shards import CorruptShardWarning, DatasetMismatchError, load, read_index

__all__ = ["CorruptShardWarning", "DatasetMismatchError", "DatasetSummary", "explain_dataset",
           "load", "read_index"]
