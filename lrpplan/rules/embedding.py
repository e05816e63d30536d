"""Embedding lookups.

Relevance of a token is the sum of the relevance of its embedding vector over the hidden
dimension; that reduction is done where relevance is collected for an integer input (a token
target on the embedding node's output). Towards the weight, relevance is routed like the
gradient (per-row sums), which only matters when the weight itself is an attribution target.
"""
from __future__ import annotations

import torch.nn.functional as F

from .base import register_op
from .routing import _dim


def _embedding_forward(node, vals):
    # padding_idx only changes the gradient, never the forward value; saved as 2**64-1 for None
    pad = _dim(node._saved_padding_idx)
    return [F.embedding(node._saved_indices, vals[0], None if pad < 0 else pad)]


register_op("EmbeddingBackward0", "route", forward=_embedding_forward)

#: node type -> the saved attribute holding the token ids an embedding lookup read
TOKEN_LOOKUPS = {"EmbeddingBackward0": "_saved_indices"}


def token_indices(node, node_type: str):
    """The token ids a lookup node read (a tensor), or ``None`` for any other node."""
    attr = TOKEN_LOOKUPS.get(node_type)
    return getattr(node, attr, None) if attr else None
