"""Embedding lookups.

Relevance of a token is the sum of the relevance of its embedding vector over the hidden
dimension; that reduction is done where relevance is collected for an integer input (a token
target on the embedding node's output). Towards the weight, relevance is routed like the
gradient (per-row sums), which only matters when the weight itself is an attribution target.
"""
from __future__ import annotations

import torch.nn.functional as F

from .base import register_op

register_op("EmbeddingBackward0", "route",
            forward=lambda n, v: [F.embedding(n._saved_indices, v[0], n._saved_padding_idx)],
            key_attrs=("padding_idx",))
