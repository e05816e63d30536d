"""The long tail of tensor operations: pads, pixel shuffle, adaptive max-pool, cumsum, bilinear
maps, index writes, scatter and index_add, unfold / fold, embedding bags.

Which rule each family gets, and why:

- **Copies** (reflection / replication padding, pixel (un)shuffle, adaptive max-pool, ``unfold``,
  ``scatter``, ``x[idx] = v``, ``index_copy``, ``index_fill``, ``scatter_reduce`` amax / amin,
  embedding bags in max mode): every output element is one input element (or a constant), so
  relevance is routed like the gradient (``route``). Ties of a max share equally (autograd's own
  split). A written constant (``x[idx] = 0.0``, ``index_fill``, the zero padding of ``unfold``)
  absorbs the relevance at its positions (``write``: from the rule's own terms, the positions the
  gradient does not route to a tracked operand).
- **Sums of input elements** (``cumsum``, ``fold``): the ε-rule through a bias-free linear map
  (``linear_map``). ``index_add``, ``scatter_add``, ``scatter_reduce`` sum / mean and
  ``index_put(accumulate=True)`` are linear in all their operands together: ``linear_sum``,
  R_k = v_k ⊙ VJP_k(R / stab(z)) for every operand k, a known operand that leads to no target
  absorbing its share Σ s ⊙ f(…, v_k, …) like a bias.
- **Products** (``nn.Bilinear``'s ``_trilinear``, embedding bags with ``per_sample_weights``):
  multilinear in their operands, ``multilinear``: the ε-rule on each operand,
  R_k = (1/n) v_k ⊙ VJP_k(R / stab(z)) over the n operands that lead to targets (AttnLRP's
  uniform rule, as for QKᵀ). ``scatter_reduce`` prod: the uniform rule per output element
  (``scatter_prod``): each factor of a product gets an equal share.

A saved int autograd exposes as unsigned 64-bit (a negative dim, pad or bound) is read back signed
(:func:`lrpplan.rules.routing.signed`) in every forward replay here.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .base import (Decision, NodeInfo, Rule, add_parts, as_rel, get_rule, own_output, register_op,
                   register_rule, stable_div_share)
from .routing import Route, _send_live, out_shape, signed

T = torch.Tensor


def _grads(node: Any, rel: list) -> tuple:
    """The node's VJP of ``rel`` (one tensor or None per output), in the relevance dtype."""
    ref = next(r for r in rel if r is not None)
    try:
        g = node(*rel)
    except RuntimeError:  # kernels that insist on the forward dtype
        dt = node._input_metadata[0].dtype
        g = node(*[None if r is None else r.to(dt) for r in rel])
    g = g if isinstance(g, tuple) else (g,)
    return tuple(None if t is None else (t.to_dense() if t.is_sparse else t).to(ref.dtype)
                 for t in g)


def _rel_list(s: T, rel) -> list:
    """``[s, None, ...]``: relevance at output 0 only (the other outputs are integer indices)."""
    return [s] + [None] * (len(rel) - 1)


# ---------------------------------------------------------------------------------------------
# rules


@register_rule
class WriteRule(Route):
    """A copy of operand 0 with some positions overwritten (by operand 1 or a constant).

    Routed like the gradient. What a constant autograd does not track writes absorbs the
    relevance at its positions: written by an untracked operand (``x[idx] = 0.0``, ``index_fill``,
    ``scatter(…, value)``), ``Σ R·(1 − VJP_0(1))``; an untracked operand 0 (``zeros.scatter(…,
    src)``), ``Σ R·f(1, 0)``, the positions the output copies from operand 0.
    """

    name = "write"

    def absorbs(self, p) -> bool:
        return p.get("constant") is not None or not all(p["send"])

    def decide(self, info: NodeInfo) -> Decision:
        send = _send_live(info)
        constant = None
        if info.n_inputs < 2 or info.none_inputs[1]:
            constant = "written"
        elif info.none_inputs[0]:
            constant = "kept"
        return Decision(values=(), send=send, params={"constant": constant})

    def _constant_share(self, node, rel, grads, p) -> Optional[T]:
        r = rel[0]
        if p.get("constant") == "written":
            ones = _grads(node, _rel_list(torch.ones_like(r), rel))[0]
            return (r * (1 - ones)).sum()
        if p.get("constant") == "kept":
            others = [torch.zeros_like(g) if g is not None else None for g in grads[1:]]
            kept = p["forward"](node, [torch.ones_like(r)] + others)[0]
            return (r * kept.to(r.dtype)).sum()
        return None


@register_rule
class LinearSum(Rule):
    """ε-rule through an op linear in all its operands together (each output element a sum of
    input elements): ``R_k = v_k ⊙ VJP_k(R / stab(z))`` for each operand sent.

    A known operand that is not sent (leads to no target, or is a saved constant) absorbs its
    share ``Σ s ⊙ f(0, …, v_k, …, 0)`` (like a bias); a constant autograd saved nowhere absorbs
    ``Σ s ⊙ (z − f(known operands))`` when the output is given, and is taken as 0 otherwise
    (recorded as an assumption).
    """

    name = "linear_sum"
    defaults = {"epsilon": 1e-6}

    def proportional(self, p) -> bool:
        return True

    def absorbs(self, p) -> bool:
        return True

    def decide(self, info: NodeInfo) -> Decision:
        send = _send_live(info)
        known = [i for i in range(info.n_inputs) if send[i] or info.recoverable(i)]
        unknown = [i for i in range(info.n_inputs) if i not in known]
        assumption = ""
        if unknown and not info.output_available():
            assumption = (f"{info.node_type}: operand(s) {unknown}, constant(s) autograd did not "
                          "save, taken as 0 (their share of relevance goes to the other operands)")
        return Decision(values=tuple(known), send=send,
                        params={"known": known, "reuse_output": True}, assumption=assumption)

    def run(self, node, rel, vals, p):
        r = rel[0]
        send, known, fwd = p["send"], p["known"], p["forward"]
        n = len(send)
        v = [as_rel(vals[k], r.dtype) if k in known else None for k in range(n)]
        z_given = own_output(vals, p)
        stand_in = [t if t is not None else (torch.zeros_like(r) if k == 0 else r.new_zeros(()))
                    for k, t in enumerate(v)]
        z = as_rel(z_given, r.dtype) if z_given is not None else fwd(node, stand_in)[0]
        s, eps_part = stable_div_share(r, z, p["epsilon"])
        grads = _grads(node, _rel_list(s, rel))
        out: list = [None] * n
        parts = [eps_part]
        for k in range(n):
            if v[k] is None:
                continue
            if send[k]:
                out[k] = v[k] * grads[k]
            elif k < len(grads) and grads[k] is not None:
                parts.append((v[k] * grads[k]).sum())  # v_k may broadcast
            else:  # a saved constant autograd does not differentiate: Σ s ⊙ f(…, v_k, …)
                alone = [v[k] if j == k else torch.zeros_like(stand_in[j] if v[j] is None
                                                              else v[j]) for j in range(n)]
                parts.append((s * fwd(node, alone)[0]).sum())
        if z_given is not None and len(known) < n:  # the unsaved constants are in the output
            parts.append((s * (z - fwd(node, stand_in)[0])).sum())
        return out + [add_parts(parts, r)]


@register_rule
class Multilinear(Rule):
    """ε-rule for an op linear in each operand separately (a product of one element of each):
    ``R_k = v_k ⊙ VJP_k(R / stab(z)) / n`` over the n operands sent (AttnLRP's uniform rule);
    operands not sent (weights) act as fixed coefficients."""

    name = "multilinear"
    defaults = {"epsilon": 1e-6}

    def proportional(self, p) -> bool:
        return True

    def absorbs(self, p) -> bool:
        return True  # the ε share

    def decide(self, info: NodeInfo) -> Decision:
        send = _send_live(info)
        values = tuple(i for i in range(info.n_inputs)
                       if not info.none_inputs[i] or info.recoverable(i))
        return Decision(values=values, send=send, params={"reuse_output": True})

    def run(self, node, rel, vals, p):
        r = rel[0]
        send = p["send"]
        n = len(send)
        v = [None if vals[k] is None else as_rel(vals[k], r.dtype) for k in range(n)]
        z = own_output(vals, p)
        z = as_rel(z, r.dtype) if z is not None else p["forward"](node, v)[0]
        s, eps_part = stable_div_share(r, z, p["epsilon"])
        grads = _grads(node, _rel_list(s, rel))
        share = 1.0 / max(1, sum(send))
        out: list = [None] * n
        for k in range(n):
            if send[k]:
                g = grads[k] * v[k]
                out[k] = g if share == 1.0 else g * share
        return out + [add_parts([eps_part], r)]


def _scatter_count(node, r: T) -> T:
    """Per output element, how many source elements ``scatter_reduce`` reduced into it."""
    index = node._saved_index
    ones = torch.ones(index.shape, dtype=r.dtype, device=r.device)
    return torch.zeros_like(r).scatter_add_(signed(node._saved_dim), index, ones)


@register_rule
class ScatterProd(Rule):
    """``scatter_reduce(…, "prod")``: the uniform rule of a product per output element, each
    factor sent (operand 0's element where it is one, each source element reduced into it)
    gets ``R / n`` (n: the number of factors sent there); an element without any factor sent
    absorbs its relevance."""

    name = "scatter_prod"

    def absorbs(self, p) -> bool:
        return True

    def decide(self, info: NodeInfo) -> Decision:
        return Decision(values=(), send=_send_live(info))

    def run(self, node, rel, vals, p):
        r = rel[0]
        send = p["send"]
        count = _scatter_count(node, r)
        self_factor = torch.zeros_like(r)
        if send[0]:
            self_factor = torch.ones_like(r) if node._saved_include_self else \
                (count == 0).to(r.dtype)
        n = self_factor + (count if send[1] else 0)
        none = n == 0
        per = r / n.masked_fill(none, 1.0)
        out: list = [None, None]
        if send[0]:
            out[0] = per * self_factor
        if send[1]:
            index = node._saved_index
            src = torch.zeros(node._saved_src.shape, dtype=r.dtype, device=r.device)
            part = per.gather(signed(node._saved_dim), index)
            src[tuple(slice(0, k) for k in index.shape)] = part
            out[1] = src
        return out + [(r * none.to(r.dtype)).sum()]


@register_rule
class ScatterSelect(Route):
    """``scatter_reduce(…, "amax" | "amin")``: relevance routed to the selected elements, ties
    sharing equally (autograd's split). An operand 0 autograd does not track (a saved constant)
    absorbs the relevance at the elements it wins, from its own VJP."""

    name = "scatter_select"

    def absorbs(self, p) -> bool:
        return not all(p["send"])

    def decide(self, info: NodeInfo) -> Decision:
        send = _send_live(info)
        values = (0, 1) if info.none_inputs[0] else ()
        return Decision(values=values, send=send)

    def _constant_share(self, node, rel, grads, p) -> Optional[T]:
        return None

    def run(self, node, rel, vals, p):
        out = super().run(node, rel, vals, p)
        if vals[0] is None or not self.absorbs(p):
            return out
        # operand 0 is a constant: its share is its VJP through the forward (ties as autograd)
        r = rel[0]
        with torch.enable_grad():
            base = as_rel(vals[0], r.dtype).detach().requires_grad_(True)
            z = p["forward"](node, [base, as_rel(vals[1], r.dtype).detach()])[0]
            g, = torch.autograd.grad(z, base, r)
        return out[:-1] + [out[-1] + g.sum()]


class _ByAttr(Rule):
    """Picks one of several rules by a saved, structural attribute of the node (a mode or flag
    that is in the plan key), and delegates to it."""

    attr: str = ""
    by_value: dict = {}

    def _rule(self, p) -> Rule:
        return get_rule(p["via"])

    def proportional(self, p) -> bool:
        return self._rule(p).proportional(p)

    def absorbs(self, p) -> bool:
        return self._rule(p).absorbs(p)

    def decide(self, info: NodeInfo) -> Decision:
        via = self.by_value[getattr(info.node, self.attr)]
        d = get_rule(via).decide(info)
        return Decision(d.values, d.send, {**d.params, "via": via}, d.assumption, d.lost_constant)

    def run(self, node, rel, vals, p):
        return self._rule(p).run(node, rel, vals, p)


@register_rule
class IndexPutRule(_ByAttr):
    """``x[idx] = v`` (a copy, ``write``) or ``index_put(…, accumulate=True)`` (``linear_sum``)."""

    name = "index_put"
    defaults = {"epsilon": 1e-6}
    attr = "_saved_accumulate"
    by_value = {False: "write", True: "linear_sum"}


@register_rule
class ScatterReduceRule(_ByAttr):
    """``scatter_reduce``: sum / mean ``linear_sum``, amax / amin ``scatter_select``, prod
    ``scatter_prod``."""

    name = "scatter_reduce"
    defaults = {"epsilon": 1e-6}
    attr = "_saved_reduce"
    by_value = {"sum": "linear_sum", "mean": "linear_sum", "amax": "scatter_select",
                "amin": "scatter_select", "prod": "scatter_prod"}


@register_rule
class EmbeddingBagRule(_ByAttr):
    """``embedding_bag``: sum / mean ``multilinear`` (linear in the weight, bilinear with
    ``per_sample_weights``), max ``route``."""

    name = "embedding_bag"
    defaults = {"epsilon": 1e-6}
    attr = "_saved_mode"
    by_value = {0: "multilinear", 1: "multilinear", 2: "route"}


# ---------------------------------------------------------------------------------------------
# forward replays


def _pad(mode: str):
    def fwd(n, v):
        return [F.pad(v[0], list(signed(n._saved_padding)), mode=mode)]
    return fwd


def _adaptive_max(fn, nd: int):
    def fwd(n, v):
        return [fn(v[0], list(out_shape(n))[-nd:])]
    return fwd


def _im2col(n, v):
    return [F.unfold(v[0], list(n._saved_kernel_size), list(n._saved_dilation),
                     list(n._saved_padding), list(n._saved_stride))]


def _col2im(n, v):
    return [F.fold(v[0], list(out_shape(n))[-2:], list(n._saved_kernel_size),
                   list(n._saved_dilation), list(n._saved_padding), list(n._saved_stride))]


def _trilinear(n, v):
    return [torch._trilinear(v[0], v[1], v[2], list(signed(n._saved_expand1)),
                             list(signed(n._saved_expand2)), list(signed(n._saved_expand3)),
                             list(signed(n._saved_sumdim)))]


def _index_put(n, v):
    values = v[1] if v[1] is not None else v[0].new_zeros(())
    return [torch.ops.aten.index_put.default(v[0], list(n._saved_indices), values,
                                             bool(n._saved_accumulate))]


def _accumulator(n, v):
    """The tensor an op adds into; an untracked one (saved nowhere) is taken as 0."""
    if v[0] is not None:
        return v[0]
    meta = n._input_metadata[0]
    return v[1].new_zeros(meta.shape, dtype=meta.dtype)


def _index_add(n, v):
    return [_accumulator(n, v).index_add(signed(n._saved_dim), n._saved_index, v[1], alpha=n._saved_alpha)]


def _index_copy(n, v):
    return [v[0].index_copy(signed(n._saved_dim), n._saved_index, v[1])]


def _index_fill_tensor(n, v):
    return [v[0].index_fill(signed(n._saved_dim), n._saved_index, v[1])]


def _scatter(n, v):
    return [v[0].scatter(signed(n._saved_dim), n._saved_index, v[1])]


def _scatter_add(n, v):
    return [_accumulator(n, v).scatter_add(signed(n._saved_dim), n._saved_index, v[1])]


def _scatter_reduce(n, v):
    return [v[0].scatter_reduce(signed(n._saved_dim), n._saved_index, v[1], n._saved_reduce,
                                include_self=bool(n._saved_include_self))]


_BAG_MODES = ("sum", "mean", "max")


def _embedding_bag(n, v):
    weight = v[0]
    psw = v[1]
    offsets = n._saved_offsets
    bags = out_shape(n)[0]
    pad = signed(n._saved_padding_idx)  # None is saved as 2**64 - 1
    return [F.embedding_bag(n._saved_indices, weight, offsets, mode=_BAG_MODES[n._saved_mode],
                            per_sample_weights=psw,
                            include_last_offset=offsets.numel() == bags + 1,
                            padding_idx=None if pad < 0 else pad)]


# ---------------------------------------------------------------------------------------------
# op specs

register_op(["ReflectionPad1DBackward0", "ReflectionPad2DBackward0", "ReflectionPad3DBackward0"],
            "route", saved_inputs={0: "_saved_self"}, forward=_pad("reflect"))
register_op(["ReplicationPad1DBackward0", "ReplicationPad2DBackward0",
             "ReplicationPad3DBackward0"],
            "route", saved_inputs={0: "_saved_self"}, forward=_pad("replicate"))
register_op("PixelShuffleBackward0", "route", key_attrs=("upscale_factor",),
            forward=lambda n, v: [F.pixel_shuffle(v[0], n._saved_upscale_factor)])
register_op("PixelUnshuffleBackward0", "route", key_attrs=("downscale_factor",),
            forward=lambda n, v: [F.pixel_unshuffle(v[0], n._saved_downscale_factor)])
# AdaptiveMaxPool1d runs as unsqueeze → AdaptiveMaxPool2D → squeeze
register_op("AdaptiveMaxPool2DBackward0", "route", saved_inputs={0: "_saved_self"},
            forward=_adaptive_max(F.adaptive_max_pool2d, 2))
register_op("AdaptiveMaxPool3DBackward0", "route", saved_inputs={0: "_saved_self"},
            forward=_adaptive_max(F.adaptive_max_pool3d, 3))
register_op("CumsumBackward0", "linear_map", key_attrs=("dim",),
            forward=lambda n, v: [v[0].cumsum(signed(n._saved_dim))])
# unfold copies (its zero padding is a constant: ``fills``), fold sums
register_op("Im2ColBackward0", "route", fills=True, forward=_im2col,
            key_attrs=("kernel_size", "dilation", "padding", "stride"))
register_op("Col2ImBackward0", "linear_map", forward=_col2im,
            key_attrs=("kernel_size", "dilation", "padding", "stride"))
# nn.Bilinear: _trilinear(x1, weight, x2) (its bias is a following AddBackward0)
register_op("TrilinearBackward0", "multilinear",
            saved_inputs={0: "_saved_i1", 1: "_saved_i2", 2: "_saved_i3"}, forward=_trilinear,
            key_attrs=("expand1", "expand2", "expand3", "sumdim"))
# the written values broadcast to the indexed region (and lose leading 1-dims): summed back
register_op("IndexPutBackward0", "index_put", forward=_index_put, key_attrs=("accumulate",),
            broadcasts=True)
register_op("IndexCopyBackward0", "write", saved_inputs={1: "_saved_source"},
            forward=_index_copy, key_attrs=("dim",))
# index_fill / scatter with a Python scalar: the value is saved nowhere (no forward replay)
register_op("IndexFillBackward0", "write", key_attrs=("dim",))
register_op("IndexFillBackward1", "write", forward=_index_fill_tensor, key_attrs=("dim",))
register_op("ScatterBackward0", "write", forward=_scatter, key_attrs=("dim",))
register_op("ScatterBackward1", "write", key_attrs=("dim",))
register_op("IndexAddBackward0", "linear_sum", saved_inputs={1: "_saved_source"},
            forward=_index_add, key_attrs=("dim", "alpha"), zero_operands=(0,))
register_op("ScatterAddBackward0", "linear_sum", forward=_scatter_add, key_attrs=("dim",),
            zero_operands=(0,))
register_op("ScatterReduceBackward0", "scatter_reduce",
            saved_inputs={0: "_saved_self", 1: "_saved_src"}, saved_outputs={0: "_saved_result"},
            forward=_scatter_reduce, key_attrs=("dim", "reduce", "include_self"))
# weight (0) and per_sample_weights (1); an absent per_sample_weights is a None edge
register_op("EmbeddingBagBackward0", "embedding_bag",
            saved_inputs={0: "_saved_weight", 1: "_saved_per_sample_weights"},
            forward=_embedding_bag, forward_inputs=(0, 1), key_attrs=("mode",))
