"""Explain a whole data set: one trace, then replays; resumable; the same script under torchrun.

The file is also a factory module for the command line. Run from the repository root::

    python examples/explain_dataset.py --out runs/shapes            # one process
    torchrun --standalone --nproc_per_node 2 examples/explain_dataset.py --out runs/shapes
    lrpplan explain-dataset examples/explain_dataset.py:make_model \\
        examples/explain_dataset.py:make_dataset --out runs/shapes --batch-size 32

Run any of them again (or after killing one): finished shards are verified and skipped, and a
finished directory is left as it is. Afterwards the script reads the shards back with plain
numpy, which is all a consumer of the output needs.

Plans go to the repository's ``cache/`` directory unless ``LRPPLAN_CACHE`` names another one (on
several nodes: a directory on the shared file system, like ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

CACHE_DIR = Path(os.environ.get("LRPPLAN_CACHE") or Path(__file__).resolve().parents[1] / "cache")


class Shapes(torch.utils.data.Dataset):
    """``n`` noisy 1x16x16 images of a horizontal (class 0) or vertical (class 1) bar."""

    def __init__(self, n: int = 256) -> None:
        gen = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 2, (n,), generator=gen)
        self.bars = torch.zeros(n, 1, 16, 16, dtype=torch.bool)
        pos = torch.randint(3, 13, (n,), generator=gen)
        for i in range(n):
            if self.labels[i] == 0:
                self.bars[i, 0, pos[i], 3:13] = True
            else:
                self.bars[i, 0, 3:13, pos[i]] = True
        self.images = 0.3 * torch.randn(n, 1, 16, 16, generator=gen) + self.bars.float()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]  # (inputs, target): the label is explained


def make_model() -> nn.Module:
    """A small CNN with fixed weights: a horizontal and a vertical line detector, average pool."""
    conv = nn.Conv2d(1, 2, 5, padding=2)
    head = nn.Linear(2, 2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 2, :] = 0.2  # a horizontal line of 5 pixels
        conv.weight[1, 0, :, 2] = 0.2  # a vertical one
        conv.bias.fill_(-0.5)  # a threshold that silences the noise
        head.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        head.bias.zero_()
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()


def make_dataset() -> torch.utils.data.Dataset:
    return Shapes()


def main() -> None:
    from lrpplan.dataset import explain_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="explain-dataset-out", help="output directory")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()

    summary = explain_dataset(make_model(), Shapes(args.samples), out=args.out,
                              batch_size=args.batch_size, cache=CACHE_DIR, progress=True)
    if summary.rank != 0:
        return

    # read the output back without lrpplan: index.json + numpy
    out = Path(args.out)
    index = json.loads((out / "index.json").read_text())
    ids, maps = [], []
    for shard in index["shards"]:
        (entry,) = [f for f in shard["files"] if f["input"] == 0]
        maps.append(np.load(out / entry["file"]))
        ids.extend(shard["ids"])
    relevance = np.concatenate(maps)
    bars = Shapes(args.samples).bars.numpy()[ids]
    print(f"read {len(ids)} relevance maps of shape {relevance.shape[1:]} ({index['dtype']}, "
          f"rules {index['rule_preset']}, plan {index['plan_keys'][0]})")
    positive = np.clip(relevance, 0, None)
    on_bar = (positive * bars).sum() / positive.sum()
    print(f"share of the positive relevance on the bar pixels: {on_bar:.2f} (the bars cover "
          f"{bars.mean():.2f} of the pixels)")


if __name__ == "__main__":
    main()
