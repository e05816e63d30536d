"""Exception and warning classes users can catch.

Every error lrpplan raises on purpose derives from :class:`LRPError`.
"""
from __future__ import annotations


class LRPError(Exception):
    """Base class of every error lrpplan raises on purpose."""


class InvalidInputError(LRPError, ValueError):
    """The caller passed something lrpplan cannot explain (bad target, tensor not in the graph...)."""


class UnsupportedOperation(LRPError):
    """An autograd node has no LRP rule and no declared fallback.

    The message names the node type, its position in the graph and how to declare a fallback.
    """

    def __init__(self, node_type: str, position: str, hint: str = "") -> None:
        self.node_type = node_type
        self.position = position
        msg = (
            f"no LRP rule for autograd node {node_type!r} ({position}). "
            "lrpplan never passes relevance through an unknown operation silently. "
            "Declare a fallback explicitly, for example "
            f"rules=lrpplan.RuleSet.preset('epsilon').override({node_type!r}, 'identity') "
            "(other fallbacks: 'route' = follow the gradient, 'absorb' = stop relevance here)."
        )
        if hint:
            msg += " " + hint
        super().__init__(msg)


class GraphFreedError(LRPError):
    """The autograd graph's saved tensors were freed (``backward()`` ran without ``retain_graph``)."""


class UnrecoverableValueError(LRPError):
    """A forward value a rule needs is saved nowhere in the graph and cannot be recomputed."""


class NonFiniteError(LRPError, ValueError):
    """The explained output (or a seed) holds NaN or infinity."""


class PlanError(LRPError):
    """A plan is malformed, fails validation, or does not match the live graph."""


class PlanMismatchError(PlanError):
    """A valid plan was replayed on a graph whose fingerprint differs."""


class CacheWarning(UserWarning):
    """A cache entry was unusable (corrupt, stale, foreign) or the cache could not be written."""
