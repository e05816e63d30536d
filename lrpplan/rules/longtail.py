"""The long tail of tensor operations: pads, pixel shuffle, adaptive max-pool, cumsum, bilinear
maps, index writes, scatter and index_add, unfold / fold, embedding bags."""
from __future__ import annotations
