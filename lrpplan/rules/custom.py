"""Custom ``torch.autograd.Function`` nodes, backward hooks and compiled regions.

A ``torch.autograd.Function`` subclass ``F`` puts nodes of type ``FBackward`` into the graph (a
``BackwardCFunction``, which is also the ``ctx`` of the forward; ``type(node)._forward_cls`` is
``F``). Two Function classes with the same ``__name__`` give nodes of the same type name, so
lrpplan gives rules to Functions by their *qualified name* ``f"{F.__module__}.{F.__qualname__}"``
(:func:`function_key`), a stable string that can go into a plan and its key; the class object
never does.

- :func:`register_function` files a Function class (or its qualified name, so a library need
  not be imported) with a rule, optionally the ``ctx`` attributes holding its input values and
  a forward replay for Promise chains. It also registers an op spec under the node type name
  (so Promise chains, the executor and :func:`lrpplan.coverage` find the node type) with a
  static fact, the node's qualified class name (``attrs["function"]``: the plan key tells two
  same-named Function classes apart, and the forward dispatches on it).
- ``RuleSet.override(F, rule)`` (:mod:`lrpplan.config`) gives a rule to one Function class in one
  rule set, like ``override(node_type, rule)`` does for a node type.
- Built-in entries: Bloom's ``GeLUFunction`` (transformers), RecurrentGemma's
  ``SqrtBoundDerivative`` (transformers) and PyTorch's own ``BackwardHookFunction``, which
  ``register_full_backward_hook`` / ``register_full_backward_pre_hook`` put around a module's
  inputs and outputs (rule ``passthrough``: relevance passes per input, unchanged).
- Compiled regions (``torch.compile``: one ``CompiledFunctionBackward`` node for a whole region
  whose inputs are the parameters and activations it read) have no LRP rule and no fallback
  that fits; :func:`compiled_region` tells them apart so the error can say what to pass instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch

from ..errors import RuleError
from .base import OPS, RULES, Decision, ForwardFn, MaybeTensor, NodeInfo, OpSpec, Rule, \
    add_parts, register_op, register_rule
from . import routing  # noqa: F401  (registers 'identity' and 'absorb', which entries here use)

#: forward replay given as a callable, ``"apply"`` (re-run the Function itself on the input
#: values, for Functions whose forward takes its tensor inputs only) or None
FunctionForward = Union[ForwardFn, str, None]


@dataclass(frozen=True)
class FunctionEntry:
    """What lrpplan knows of one ``torch.autograd.Function`` class.

    Attributes
    ----------
    key:
        the qualified class name (``module.QualName``).
    node_type:
        the type name of its nodes (``QualName``'s last part + ``"Backward"``).
    spec:
        the op spec its nodes get (rule, ``ctx`` attributes holding input values, forward).
    """

    key: str
    node_type: str
    spec: OpSpec


#: qualified Function class name -> entry
FUNCTIONS: dict[str, FunctionEntry] = {}

#: node type name of torch.compile's compiled regions (one node per compiled region)
_COMPILED_TYPES = frozenset({"CompiledFunctionBackward"})
_COMPILED_MODULE_PREFIX = "torch._functorch."


def qualified_name(function: Any) -> str:
    """``"module.QualName"`` of a Function class; a string is taken as that name already."""
    if isinstance(function, str):
        if "." not in function:
            raise ValueError(f"{function!r} is not a qualified class name (module.ClassName); "
                             "pass the Function class itself, or its module and name")
        return function
    if isinstance(function, type) and issubclass(function, torch.autograd.Function):
        return f"{function.__module__}.{function.__qualname__}"
    raise TypeError(f"expected a torch.autograd.Function subclass or its qualified name, got "
                    f"{function!r}")


def function_class(node: Any) -> Optional[type]:
    """The ``torch.autograd.Function`` subclass behind a custom-Function node, else None."""
    cls = getattr(type(node), "_forward_cls", None)
    return cls if isinstance(cls, type) else None


#: qualified name -> the Function class, for every class whose nodes were seen (the key of each
#: graph is computed before its plan runs, so a replay finds the class of every node it has)
_CLASSES: dict[str, type] = {}


def function_key(node: Any) -> Optional[str]:
    """The qualified class name of a custom-Function node (None for other nodes)."""
    cls = function_class(node)
    if cls is None:
        return None
    key = f"{cls.__module__}.{cls.__qualname__}"
    _CLASSES.setdefault(key, cls)
    return key


def compiled_region(node: Any, node_type: str) -> bool:
    """The node is a ``torch.compile``d region (AOTAutograd's ``CompiledFunction``)."""
    if node_type not in _COMPILED_TYPES:
        return False
    key = function_key(node)
    return key is None or key.startswith(_COMPILED_MODULE_PREFIX)


def function_spec(node: Any) -> Optional[OpSpec]:
    """The op spec of a custom-Function node's class, if it was registered."""
    key = function_key(node)
    entry = FUNCTIONS.get(key) if key is not None else None
    return None if entry is None else entry.spec


def spec_for(node: Any, node_type: str) -> Optional[OpSpec]:
    """The op spec a node gets: its custom Function class's where that class is registered,
    else its node type's (None: lrpplan does not know the node)."""
    spec = function_spec(node) if function_class(node) is not None else None
    return spec if spec is not None else OPS.get(node_type)


#: node type -> what an :class:`~lrpplan.errors.UnsupportedOperation` adds about it
UNSUPPORTED_HINTS = {
    "CheckpointFunctionBackward": "Reentrant activation checkpointing hides a whole block in one "
    "node; explain with checkpointing off or with torch.utils.checkpoint(use_reentrant=False).",
}


def _dispatch_forward(vals, a):
    """The forward replay of a Function node type: the forward of the node's own class (its
    qualified name is the static fact ``a["function"]``)."""
    entry = FUNCTIONS.get(a["function"])
    if entry is None or entry.spec.forward is None:
        raise RuleError(f"no forward replay registered for the Function class "
                        f"{a['function']!r} (lrpplan.register_function(..., forward=...))")
    return entry.spec.forward(vals, a)


def _apply_forward(vals, a):
    out = _CLASSES[a["function"]].apply(*vals)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _key_node_type(node_type: str, rule: str) -> None:
    """Make the plan key record the qualified class of every node of ``node_type``: the node
    type's op spec (registered here if lrpplan has none) carries it as a static fact."""
    if node_type not in OPS:
        register_op(node_type, rule, forward=_dispatch_forward, attr_prefix="",
                    facts={"function": function_key}, meta=("out_shapes",))


def register_function(function: Any, rule: str, *,
                      saved_inputs: Optional[Mapping[int, str]] = None,
                      forward: FunctionForward = None,
                      forward_inputs: Optional[tuple[int, ...]] = None,
                      replace: bool = False) -> str:
    """Give a ``torch.autograd.Function`` subclass a rule, by its class.

    Parameters
    ----------
    function:
        the Function subclass, or its qualified name ``"package.module.ClassName"`` (so a
        library need not be imported to register its Functions).
    rule:
        a registered rule name: ``"identity"`` (element-wise, one input), ``"passthrough"``
        (outputs are the inputs, one by one), ``"route"`` is not available (a custom
        Function's node cannot be called), ``"absorb"``, or a rule of your own
        (``lrpplan.rules.base.register_rule``).
    saved_inputs:
        input position -> name of the ``ctx`` attribute the forward stored that input's value
        in (``ctx.x = x``; ``ctx.save_for_backward`` tensors are not addressable by name).
    forward:
        the forward replay for Promise chains: ``fn(input_values, attrs) -> [outputs]``
        (``attrs["function"]``: the qualified class name), or
        ``"apply"`` to re-run the Function itself on the input values (for Functions whose
        ``forward`` takes tensors only).
    forward_inputs:
        the input positions ``forward`` needs (default: all).
    replace:
        replace an existing entry (otherwise registering a class twice is an error).

    Returns
    -------
    str
        the qualified name the entry is filed under.

    Examples
    --------
    >>> import torch, lrpplan
    >>> class Double(torch.autograd.Function):
    ...     @staticmethod
    ...     def forward(ctx, x):
    ...         return 2 * x
    ...     @staticmethod
    ...     def backward(ctx, g):
    ...         return 2 * g
    >>> key = lrpplan.register_function(Double, "identity", forward="apply", replace=True)
    >>> key.endswith(".Double")
    True
    """
    key = qualified_name(function)
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {sorted(RULES)}")
    if rule == "route":
        raise ValueError("'route' calls the node's backward, which a custom Function node "
                         "cannot be asked for: use 'identity', 'passthrough', 'absorb' or a rule "
                         "of your own")
    if key in FUNCTIONS and not replace:
        raise RuntimeError(f"Function {key!r} registered twice (pass replace=True)")
    if forward == "apply":
        fwd: Optional[ForwardFn] = _apply_forward
    elif forward is None or callable(forward):
        fwd = forward
    else:
        raise TypeError(f"forward must be a callable, 'apply' or None, got {forward!r}")
    node_type = key.rsplit(".", 1)[-1] + "Backward"
    spec = OpSpec(node_type, rule, saved_inputs=dict(saved_inputs or {}), forward=fwd,
                  forward_inputs=forward_inputs, attr_prefix="",
                  facts={"function": function_key}, meta=("out_shapes",))
    FUNCTIONS[key] = FunctionEntry(key, node_type, spec)
    _key_node_type(node_type, rule)
    return key


def key_function(function: Any, rule: str) -> str:
    """The qualified name of ``function`` for a rule set's per-class override (and the plan key
    records the class of that node type from now on)."""
    key = qualified_name(function)
    _key_node_type(key.rsplit(".", 1)[-1] + "Backward", rule)
    return key


@register_rule
class Passthrough(Rule):
    """Outputs that are the inputs, one by one (backward hooks): relevance at output ``i`` goes
    to input ``i`` unchanged. Conserving where every input is sent; an input that leads to no
    explained tensor (or is untracked) absorbs what reached its output."""

    name = "passthrough"
    routes_relevance = True  # each input gets its output's relevance, unchanged

    def absorbs(self, p) -> bool:
        return not all(p["send"])

    def decide(self, info: NodeInfo) -> Decision:
        if info.n_inputs != info.n_outputs:
            raise RuleError(
                f"the rule 'passthrough' on {info.node_type} ({info.position or 'a node'}) needs "
                f"one output per input; it has {info.n_inputs} inputs and {info.n_outputs} "
                "outputs")
        return Decision(values=(), send=tuple(live and not none for live, none in
                                              zip(info.live_inputs, info.none_inputs)))

    def run(self, rel, x, p):
        send = p["send"]
        ref = next(r for r in rel if r is not None)
        out: list[MaybeTensor] = []
        for i, s in enumerate(send):
            r = rel[i] if i < len(rel) else None
            if s and r is None:  # nothing reached this output: nothing to pass on
                r = ref.new_zeros(tuple(x["out_shapes"][i]))
            out.append(r if s else None)
        if not self.absorbs(p):
            return out
        return out + [add_parts([r.sum() for r, s in zip(rel, send) if r is not None and not s],
                                ref)]


# ---------------------------------------------------------------------------------------------
# built-in entries: the custom Functions a default forward pass of an eval model reaches in the
# libraries the zoo uses (transformers, torchvision has none) and PyTorch's backward hooks


def _bloom_gelu(vals, a) -> list[torch.Tensor]:
    # transformers' bloom_gelu_forward: the tanh approximation of GELU
    x = vals[0]
    return [x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))]


register_function("transformers.models.bloom.modeling_bloom.GeLUFunction", "identity",
                  forward=_bloom_gelu)
register_function(
    "transformers.models.recurrent_gemma.modeling_recurrent_gemma.SqrtBoundDerivative",
    "identity", forward=lambda vals, a: [torch.sqrt(vals[0])])
register_function("torch.nn.modules._functions.BackwardHookFunction", "passthrough",
                  forward=lambda vals, a: list(vals))


def unsupported_hint(node: Any, node_type: str, advise: bool = True) -> str:
    """What an :class:`~lrpplan.errors.UnsupportedOperation` says about a custom-Function node
    (its class and module; with ``advise``, how to give it a rule), or ``""`` for other nodes."""
    cls = function_class(node)
    if cls is None or compiled_region(node, node_type):
        return ""
    text = f"It is the custom autograd Function {cls.__qualname__} of module {cls.__module__}"
    if not advise:
        return text + "."
    return (text + ": give it a rule by its class with "
            f"rules=lrpplan.RuleSet.preset('epsilon').override({cls.__name__}, rule) or "
            f"lrpplan.register_function({cls.__name__}, rule, forward=...) (docs/rules.md, "
            "'Custom autograd Functions').")


COMPILED_REMEDY = (
    "It is a torch.compile'd region: one node for a whole compiled graph, whose inputs are "
    "the parameters and activations it read, so no rule or fallback can pass relevance "
    "through it. Explain the uncompiled module instead: lrpplan.explain(model, ...) unwraps "
    "a compiled model by itself (torch.compile(m) -> m._orig_mod, same parameters); with "
    "lrpplan.attribute, run the forward through model._orig_mod (and any compiled submodule "
    "through its ._orig_mod).")
