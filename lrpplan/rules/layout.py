"""Structural facts taken from sizes, values or dtypes, shared by the plan key and the rules.

DESIGN.md invariant 7: *a plan decides nothing its key leaves out*. Sizes are not in the key (one
plan serves every batch size and sequence length), so whatever a rule's ``decide`` or a value
source derives at trace time from sizes, values or dtypes must be reduced to a structural fact
that :mod:`lrpplan.fingerprint` puts into the key. Each such fact is computed here, by one
function that both the key and the decision call, so the two cannot drift apart:

- :func:`broadcast_pattern`: per input of an op that broadcasts (``OpSpec.broadcasts``), how many
  leading output dims the input lacks and whether it is expanded along any dim. The product rule
  sends all relevance to the one full-shape operand of a broadcast product (a normaliser, a gate
  ``h * g`` with ``g`` of shape ``[B, 1, C]``), the "output minus operand" value source needs an
  operand of the output's shape. "Operand 1 is broadcast" is structure; at sequence length 1 the
  same gate is not broadcast, which is another structure (another key, another plan).
- :func:`operand_facts`: that pattern together with "the operand has the output's dtype" (the
  value sources compare dtypes), per input of a node, read from the graph's metadata.
- per node type, facts its rule reads from saved values (how many outputs a split / unbind has,
  whether a convolution has a bias, whether an attention node ran with dropout) are the op
  spec's static attributes and ``facts`` (:meth:`lrpplan.rules.base.OpSpec.static`): the key
  and the steps get them from the same function.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence


class BroadcastPattern(NamedTuple):
    """How one operand of a broadcasting op relates to the op's output (no sizes).

    Attributes
    ----------
    missing:
        leading output dims the operand does not have (output rank − operand rank).
    broadcast:
        the operand is expanded along at least one output dim, i.e. it has size 1 (or lacks the
        dim) where the output's size is not 1: it has fewer elements than the output.
    """

    missing: int
    broadcast: bool

    @property
    def full(self) -> bool:
        """The operand has as many elements as the output (it is not expanded anywhere)."""
        return not self.broadcast

    @property
    def same_shape(self) -> bool:
        """The operand has exactly the output's shape."""
        return self.missing == 0 and not self.broadcast


def broadcast_pattern(in_shape: Optional[Sequence[int]],
                      out_shape: Sequence[int]) -> Optional[BroadcastPattern]:
    """The :class:`BroadcastPattern` of an operand of shape ``in_shape`` in an output of shape
    ``out_shape`` (``None`` for an operand without a shape: an untracked constant)."""
    if in_shape is None:
        return None
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    missing = len(out_shape) - len(in_shape)
    aligned = (1,) * max(missing, 0) + in_shape[max(-missing, 0):]
    broadcast = any(i == 1 and o != 1 for i, o in zip(aligned, out_shape))
    return BroadcastPattern(missing, broadcast)


def operand_facts(node: Any, producers: Sequence[Optional[tuple[Any, int]]]) -> list:
    """Per input of ``node`` (an op that broadcasts): ``[missing, broadcast, same_dtype]``, or
    ``None`` for an untracked operand. ``producers``: per input, ``(producer node, output nr)``
    or ``None``. This is what the key records and what :func:`broadcast_pattern` decides on."""
    metas = node._input_metadata
    if not metas:
        return []
    out = metas[0]
    out_shape, out_dtype = tuple(out.shape), out.dtype
    facts: list = []
    for p in producers:
        if p is None:
            facts.append(None)
            continue
        meta = p[0]._input_metadata[p[1]]
        pat = broadcast_pattern(meta.shape, out_shape)
        facts.append([pat.missing, pat.broadcast, meta.dtype == out_dtype])
    return facts


# ---------------------------------------------------------------------------------------------
# per node type: facts its rule reads from saved values


def conv_has_bias(node: Any) -> bool:
    """A convolution had a bias operand (its edge is ``None`` both when the bias is frozen and
    when there is none; only a frozen one is a lost constant). Autograd records the bias sizes
    of a convolution without bias as ``(0,)``, not ``None``."""
    sizes = getattr(node, "_saved_bias_sym_sizes_opt", None)
    return sizes is not None and tuple(sizes) != (0,)


def unknown_node_fact(node: Any) -> Any:
    """The key fact of a node type without an op spec (a declared fallback routes through the
    node with one gradient per output): its number of outputs."""
    return len(node._input_metadata)
