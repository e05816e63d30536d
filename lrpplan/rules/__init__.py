"""LRP rules, one module per op family; importing this package fills the registry."""
from . import base  # noqa: F401
from . import (  # noqa: F401  (registration side effects)
    attention, custom, elementwise, embedding, linear, longtail, moe, norm, presets, recurrent,
    reduce, routing, softmax,
)
from .base import OPS, RULES, Decision, NodeInfo, OpSpec, Rule, get_rule, op_spec
from .embedding import token_indices

__all__ = ["OPS", "RULES", "Decision", "NodeInfo", "OpSpec", "Rule", "get_rule", "op_spec",
           "token_indices"]
