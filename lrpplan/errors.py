"""Exception and warning classes users can catch.

Every error lrpplan raises on purpose derives from :class:`LRPError`.
"""
from __future__ import annotations

from typing import Optional


class LRPError(Exception):
    """Base class of every error lrpplan raises on purpose."""


class InvalidInputError(LRPError, ValueError):
    """The caller passed something lrpplan cannot explain (bad target, tensor not in the graph...)."""


class UnsupportedOperation(LRPError):
    """An autograd node has no LRP rule and no declared fallback.

    The message names the node type, its position in the graph and the declared fallback that
    fits the node, if one does.

    Attributes
    ----------
    node_type, position:
        the node.
    fallback:
        the fallback that fits (``"route"``: its gradient routes relevance; ``"identity"``: one
        input of the output's shape), or ``None`` when neither does (then only ``"absorb"`` or a
        rule written for the node are safe).
    function:
        for a custom ``torch.autograd.Function`` node, its class's qualified name
        (``module.QualName``; the message names the class and its module), else ``None``.
    remedy:
        what to do instead, where no rule or fallback can fit the node (a ``torch.compile``d
        region: explain the uncompiled module); it replaces the fallback advice.
    """

    def __init__(self, node_type: str, position: str, hint: str = "",
                 fallback: Optional[str] = "identity", reason: str = "",
                 function: Optional[str] = None, remedy: str = "") -> None:
        self.node_type = node_type
        self.position = position
        self.fallback = fallback
        self.function = function
        msg = (f"no LRP rule for autograd node {node_type!r} ({position}). "
               "lrpplan never passes relevance through an unknown operation silently. ")
        if remedy:
            msg += remedy
        elif fallback is not None:
            msg += ("Declare a fallback explicitly: "
                    f"rules=lrpplan.RuleSet.preset('epsilon').override({node_type!r}, "
                    f"{fallback!r})" + (f" ({reason})" if reason else "") + ".")
        else:
            msg += ("Neither declared fallback that passes relevance on fits this node"
                    + (f" ({reason})" if reason else "") + ": write a rule for it (see "
                    "'Custom rules' in docs/rules.md), or stop relevance there with "
                    f"rules=lrpplan.RuleSet.preset('epsilon').override({node_type!r}, 'absorb') "
                    "(booked as absorbed in the ledger).")
        if hint:
            msg += " " + hint
        super().__init__(msg)


class RuleError(LRPError):
    """A rule cannot be applied to a node as declared: it gives relevance of the wrong shape, or
    a declared fallback does not fit the node (``identity`` on a node with several explained
    inputs). Raised at trace time; the message names the node, the rule and what fits."""


class GraphFreedError(LRPError):
    """The autograd graph's saved tensors were freed (``backward()`` ran without ``retain_graph``)."""


class UnrecoverableValueError(LRPError):
    """A forward value a rule needs is saved nowhere in the graph and cannot be recomputed."""


class NonFiniteError(LRPError, ValueError):
    """NaN or infinity where relevance must be finite.

    Raised when the explained output (or a seed) holds NaN or infinity, and when an explanation
    of a finite output would return non-finite relevance (or ledger sums): then the message
    names the first node whose rule turned finite relevance into a non-finite one (its type,
    its position in the graph and its rule), also given as ``node`` (id in the captured graph),
    ``node_type`` and ``rule`` (``None`` when the error concerns the output or a seed).
    """

    def __init__(self, message: str, node: "int | None" = None, node_type: "str | None" = None,
                 rule: "str | None" = None) -> None:
        super().__init__(message)
        self.node = node
        self.node_type = node_type
        self.rule = rule


class PlanError(LRPError):
    """A plan is malformed, fails validation, or does not match the live graph."""


class PlanMismatchError(PlanError):
    """A valid plan was replayed on a graph whose fingerprint differs."""


class CacheWarning(UserWarning):
    """A cache entry was unusable (corrupt, stale, foreign) or the cache could not be written."""


class LRPWarning(UserWarning):
    """An explanation ran, but under conditions that make its relevance unreliable (a model in
    training mode, biases autograd did not keep, ...); the message says what to change."""
