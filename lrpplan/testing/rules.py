"""Calling one rule by hand on a live autograd node, as a plan step would call it."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ..replay import plain_value
from ..rules import RULES
from ..rules.custom import spec_for


def rule_inputs(node: Any, rule: str, values: Optional[Mapping[int, Any]] = None,
                out: Optional[torch.Tensor] = None, **params: Any
                ) -> tuple[dict[Any, Any], dict[str, Any]]:
    """The ``(x, p)`` a plan step gives ``RULES[rule].run(rel, x, p)`` at ``node``.

    ``x`` holds the node's static attributes, the attributes its op spec reads at run time, its
    input and output shapes, the forward values in ``values`` (input position -> tensor) and the
    node's own output ``out``; ``p`` the rule's defaults, ``params`` (``send``, ``mode``...), the
    node type and its static attributes. For testing a rule on one node (a plan reads all of
    this through value ops).

    Examples
    --------
    >>> import torch
    >>> from lrpplan.rules import get_rule
    >>> from lrpplan.testing import rule_inputs
    >>> y = torch.randn(3, requires_grad=True).relu()
    >>> x, p = rule_inputs(y.grad_fn, "identity", send=[True])
    >>> get_rule("identity").run([torch.ones(3)], x, p)[0].tolist()
    [1.0, 1.0, 1.0]
    """
    node_type = type(node).__name__
    spec = spec_for(node, node_type)
    attrs = spec.static(node) if spec is not None else {}
    x: dict[Any, Any] = dict(attrs)
    if spec is not None:
        for name in spec.reads:
            x[name] = plain_value(getattr(node, spec.attr_prefix + name))
        x["out_shapes"] = tuple(tuple(m.shape) for m in node._input_metadata)
        x["in_shapes"] = tuple(None if f is None else tuple(f._input_metadata[nr].shape)
                               for f, nr in node.next_functions)
    if spec is None or spec.vjp is None:
        x["backward"] = node
    x.update(dict(values or {}))
    if out is not None:
        x["out"] = out
    p = {**RULES[rule].defaults, "node_type": node_type, "attrs": attrs, **params}
    if spec is None or spec.vjp is None:
        p["node_vjp"] = True
    return x, p
