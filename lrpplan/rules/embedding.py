"""Embedding lookups.

Relevance of a token is the sum of the relevance of its embedding vector over the hidden
dimension; that reduction is done where relevance is collected for an integer input (a token
target on the embedding node's output). Towards the weight, relevance is routed like the
gradient (per-row sums), which only matters when the weight itself is an attribution target.
"""
from __future__ import annotations

import torch.nn.functional as F

import torch

from .base import register_op


def _embedding_forward(vals, a):
    # padding_idx only changes the gradient, never the forward value; saved as 2**64-1 for None
    pad = a["padding_idx"]
    return [F.embedding(a["indices"], vals[0], None if pad < 0 else pad)]


def _embedding_vjp(rel, a):
    return [torch.ops.aten.embedding_dense_backward(
        rel[0], a["indices"], a["weight_sym_argsize_0"], a["padding_idx"],
        a["scale_grad_by_freq"])]


register_op("EmbeddingBackward0", "route", attrs=("padding_idx", "scale_grad_by_freq"),
            reads=("indices", "weight_sym_argsize_0"), forward=_embedding_forward,
            vjp=_embedding_vjp)

#: node type -> the saved attribute holding the token ids an embedding lookup read
TOKEN_LOOKUPS = {"EmbeddingBackward0": "_saved_indices"}


def token_indices(node, node_type: str):
    """The token ids a lookup node read (a tensor), or ``None`` for any other node."""
    attr = TOKEN_LOOKUPS.get(node_type)
    return getattr(node, attr, None) if attr else None
