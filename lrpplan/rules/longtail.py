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
(:func:`lrpplan.rules.base.signed`) for every step. Every op here has a pure gradient: an ATen
formula where one exists, else autograd differentiating the pure forward at the values the node
saved (:func:`lrpplan.rules.base.autograd_vjp`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import (Decision, NodeInfo, Rule, add_parts, as_rel, autograd_vjp, forward_of,
                   get_rule, own_output, register_op, register_rule, stable_div_share, vjp_of)
from .routing import Route, _send_live

T = torch.Tensor


def _grads(rel: list, x, p) -> list:
    """The op's VJP of ``rel`` (one tensor or None per output), in the relevance dtype."""
    ref = next(r for r in rel if r is not None)
    return [None if g is None else g.to(ref.dtype) for g in vjp_of(p, x)(rel, x)]


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

    def _constant_share(self, rel, x, grads, p) -> Optional[T]:
        r = rel[0]
        constant = p.get("constant")
        at = 1 if constant == "written" else 0
        if constant is not None and len(grads) > at and grads[at] is not None:
            return None  # the gradient gives the constant its share: booked with the unsent
        if constant == "written":
            ones = _grads(_rel_list(torch.ones_like(r), rel), x, p)[0]
            return (r * (1 - ones)).sum()
        if constant == "kept":
            others = [torch.zeros_like(g) if g is not None else None for g in grads[1:]]
            kept = forward_of(p)([torch.ones_like(r)] + others, x)[0]
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

    uses_gradient = True
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

    def run(self, rel, x, p):
        r = rel[0]
        send, known, fwd = p["send"], p["known"], forward_of(p)
        n = len(send)
        v = [as_rel(x[k], r.dtype) if k in known else None for k in range(n)]
        z_given = own_output(x)
        stand_in = [t if t is not None else (torch.zeros_like(r) if k == 0 else r.new_zeros(()))
                    for k, t in enumerate(v)]
        z = as_rel(z_given, r.dtype) if z_given is not None else fwd(stand_in, x)[0]
        s, eps_part = stable_div_share(r, z, p["epsilon"])
        grads = _grads(_rel_list(s, rel), x, p)
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
                parts.append((s * fwd(alone, x)[0]).sum())
        if z_given is not None and len(known) < n:  # the unsaved constants are in the output
            parts.append((s * (z - fwd(stand_in, x)[0])).sum())
        return out + [add_parts(parts, r)]


@register_rule
class Multilinear(Rule):
    """ε-rule for an op linear in each operand separately (a product of one element of each):
    ``R_k = v_k ⊙ VJP_k(R / stab(z)) / n`` over the n operands sent (AttnLRP's uniform rule);
    operands not sent (weights) act as fixed coefficients."""

    uses_gradient = True
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

    def run(self, rel, x, p):
        r = rel[0]
        send = p["send"]
        n = len(send)
        v = [None if x.get(k) is None else as_rel(x[k], r.dtype) for k in range(n)]
        z = own_output(x)
        z = as_rel(z, r.dtype) if z is not None else forward_of(p)(v, x)[0]
        s, eps_part = stable_div_share(r, z, p["epsilon"])
        grads = _grads(_rel_list(s, rel), x, p)
        share = 1.0 / max(1, sum(send))
        out: list = [None] * n
        for k in range(n):
            if send[k]:
                g = grads[k] * v[k]
                out[k] = g if share == 1.0 else g * share
        return out + [add_parts([eps_part], r)]


def _scatter_count(x, r: T) -> T:
    """Per output element, how many source elements ``scatter_reduce`` reduced into it."""
    index = x["index"]
    ones = torch.ones(index.shape, dtype=r.dtype, device=r.device)
    return torch.zeros_like(r).scatter_add_(x["dim"], index, ones)


@register_rule
class ScatterProd(Rule):
    """``scatter_reduce(…, "prod")``: the uniform rule of a product per output element, each
    factor sent (operand 0's element where it is one, each source element reduced into it)
    gets ``R / n`` (n: the number of factors sent there); an element without any factor sent
    absorbs its relevance."""

    name = "scatter_prod"
    batched_relevance = False  # the source's relevance is written into a buffer of its shape

    def absorbs(self, p) -> bool:
        return True

    def decide(self, info: NodeInfo) -> Decision:
        return Decision(values=(), send=_send_live(info))

    def run(self, rel, x, p):
        r = rel[0]
        send = p["send"]
        count = _scatter_count(x, r)
        self_factor = torch.zeros_like(r)
        if send[0]:
            self_factor = torch.ones_like(r) if x["include_self"] else (count == 0).to(r.dtype)
        n = self_factor + (count if send[1] else 0)
        none = n == 0
        per = r / n.masked_fill(none, 1.0)
        out: list = [None, None]
        if send[0]:
            out[0] = per * self_factor
        if send[1]:
            index = x["index"]
            src = torch.zeros(x["src"].shape, dtype=r.dtype, device=r.device)
            part = per.gather(x["dim"], index)
            src[tuple(slice(0, k) for k in index.shape)] = part
            out[1] = src
        return out + [(r * none.to(r.dtype)).sum()]


@register_rule
class ScatterSelect(Route):
    """``scatter_reduce(…, "amax" | "amin")``: relevance routed to the selected elements, ties
    sharing equally (autograd's split, differentiated at the saved values). An operand 0
    autograd does not track (a saved constant) absorbs the relevance at the elements it wins:
    its share of the gradient."""

    name = "scatter_select"

    def absorbs(self, p) -> bool:
        return not all(p["send"])

    def decide(self, info: NodeInfo) -> Decision:
        return Decision(values=(), send=_send_live(info))

    def _constant_share(self, rel, x, grads, p) -> Optional[T]:
        return None


class _ByAttr(Rule):
    """Picks one of several rules by a static attribute of the node (a mode or flag that is in
    the plan key), and delegates to it."""

    uses_gradient = True
    attr: str = ""
    by_value: dict = {}

    def _rule(self, p) -> Rule:
        return get_rule(p["via"])

    def proportional(self, p) -> bool:
        return self._rule(p).proportional(p)

    def absorbs(self, p) -> bool:
        return self._rule(p).absorbs(p)

    def decide(self, info: NodeInfo) -> Decision:
        via = self.by_value[info.attrs[self.attr]]
        d = get_rule(via).decide(info)
        return Decision(d.values, d.send, {**d.params, "via": via}, d.assumption, d.lost_constant,
                        d.reads, d.backward)

    def run(self, rel, x, p):
        return self._rule(p).run(rel, x, p)


@register_rule
class IndexPutRule(_ByAttr):
    """``x[idx] = v`` (a copy, ``write``) or ``index_put(…, accumulate=True)`` (``linear_sum``)."""

    name = "index_put"
    defaults = {"epsilon": 1e-6}
    attr = "accumulate"
    by_value = {False: "write", True: "linear_sum"}


@register_rule
class ScatterReduceRule(_ByAttr):
    """``scatter_reduce``: sum / mean ``linear_sum``, amax / amin ``scatter_select``, prod
    ``scatter_prod``."""

    name = "scatter_reduce"
    defaults = {"epsilon": 1e-6}
    attr = "reduce"
    by_value = {"sum": "linear_sum", "mean": "linear_sum", "amax": "scatter_select",
                "amin": "scatter_select", "prod": "scatter_prod"}


@register_rule
class EmbeddingBagRule(_ByAttr):
    """``embedding_bag``: sum / mean ``multilinear`` (linear in the weight, bilinear with
    ``per_sample_weights``), max ``route``."""

    name = "embedding_bag"
    defaults = {"epsilon": 1e-6}
    attr = "mode"
    by_value = {0: "multilinear", 1: "multilinear", 2: "route"}


# ---------------------------------------------------------------------------------------------
# forward replays and gradients


def _pad(mode: str):
    def fwd(v, a):
        return [F.pad(v[0], list(a["padding"]), mode=mode)]
    return fwd


def _pad_vjp(prefix: str):
    def vjp(rel, a):
        x = a["self"]
        nd = len(a["padding"]) // 2
        backward = getattr(torch.ops.aten, f"{prefix}_pad{nd}d_backward")
        return [backward(rel[0], x.to(rel[0].dtype), list(a["padding"]))]
    return vjp


def _adaptive_max(fn, nd: int):
    def fwd(v, a):
        return [fn(v[0], list(a["out_shapes"][0])[-nd:])]
    return fwd


def _adaptive_max_vjp(backward):
    def vjp(rel, a):
        return [backward(rel[0], a["self"].to(rel[0].dtype), a["result1"])]
    return vjp


_WINDOW = ("kernel_size", "dilation", "padding", "stride")


def _im2col(v, a):
    return [F.unfold(v[0], list(a["kernel_size"]), list(a["dilation"]), list(a["padding"]),
                     list(a["stride"]))]


def _col2im(v, a):
    return [F.fold(v[0], list(a["out_shapes"][0])[-2:], list(a["kernel_size"]),
                   list(a["dilation"]), list(a["padding"]), list(a["stride"]))]


def _trilinear(v, a):
    return [torch._trilinear(v[0], v[1], v[2], list(a["expand1"]), list(a["expand2"]),
                             list(a["expand3"]), list(a["sumdim"]))]


def _index_put(v, a):
    values = v[1] if v[1] is not None else v[0].new_zeros(())
    return [torch.ops.aten.index_put.default(v[0], list(a["indices"]), values,
                                             bool(a["accumulate"]))]


def _index_put_vjp(rel, a):
    r, idx = rel[0], list(a["indices"])
    keep = r if a["accumulate"] else torch.ops.aten.index_put.default(r, idx, r.new_zeros(()))
    idx_t = tuple(slice(None) if i is None else i for i in idx)
    return [keep, r[idx_t]]


def _accumulator(v, a):
    """The tensor an op adds into; an untracked one (saved nowhere) is taken as 0."""
    if v[0] is not None:
        return v[0]
    return v[1].new_zeros(tuple(a["out_shapes"][0]))


def _index_add(v, a):
    return [_accumulator(v, a).index_add(a["dim"], a["index"], v[1], alpha=a["alpha"])]


def _index_add_vjp(rel, a):
    r = rel[0]
    g = r.index_select(a["dim"], a["index"])
    shape = a["in_shapes"][1]
    if shape is not None and tuple(g.shape) != tuple(shape):  # a 0-d source
        g = g.reshape(shape)
    return [r, g if a["alpha"] == 1 else g * a["alpha"]]


def _index_copy(v, a):
    return [v[0].index_copy(a["dim"], a["index"], v[1])]


def _index_copy_vjp(rel, a):
    r = rel[0]
    return [r.index_fill(a["dim"], a["index"], 0), r.index_select(a["dim"], a["index"])]


def _index_fill_tensor(v, a):
    return [v[0].index_fill(a["dim"], a["index"], v[1])]


def _index_fill_vjp(rel, a):
    r = rel[0]
    return [r.index_fill(a["dim"], a["index"], 0), r.index_select(a["dim"], a["index"]).sum()]


def _scatter(v, a):
    return [v[0].scatter(a["dim"], a["index"], v[1])]


def _scatter_vjp(rel, a):
    r = rel[0]
    return [r.scatter(a["dim"], a["index"], 0), r.gather(a["dim"], a["index"])]


def _scatter_add(v, a):
    return [_accumulator(v, a).scatter_add(a["dim"], a["index"], v[1])]


def _scatter_reduce(v, a):
    return [v[0].scatter_reduce(a["dim"], a["index"], v[1], a["reduce"],
                                include_self=bool(a["include_self"]))]


_BAG_MODES = ("sum", "mean", "max")


def _embedding_bag(v, a):
    offsets = a["offsets"]
    bags = a["out_shapes"][0][0]
    pad = a["padding_idx"]  # None is saved as 2**64 - 1
    return [F.embedding_bag(a["indices"], v[0], offsets, mode=_BAG_MODES[a["mode"]],
                            per_sample_weights=v[1],
                            include_last_offset=offsets.numel() == bags + 1,
                            padding_idx=None if pad < 0 else pad)]


def _embedding_bag_vjp(rel, a):
    """ATen's gradient of ``embedding_bag`` from what the node saved (bags, sizes, the winning
    rows of max mode)."""
    r, psw = rel[0], a["per_sample_weights"]
    grad_w = torch.ops.aten._embedding_bag_dense_backward(
        r, a["indices"], a["result1"], a["result2"], a["result3"], a["weight_sym_argsize_0"],
        a["scale_grad_by_freq"], a["mode"], None if psw is None else psw.to(r.dtype),
        a["padding_idx"])
    grad_psw = None
    if psw is not None:
        grad_psw = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            r, a["weight"].to(r.dtype), a["indices"], a["offsets"], a["result1"], a["mode"],
            a["padding_idx"])
    return [grad_w, grad_psw]


# ---------------------------------------------------------------------------------------------
# op specs

register_op(["ReflectionPad1DBackward0", "ReflectionPad2DBackward0", "ReflectionPad3DBackward0"],
            "route", saved_inputs={0: "_saved_self"}, reads=("self", "padding"),
            forward=_pad("reflect"), vjp=_pad_vjp("reflection"))
register_op(["ReplicationPad1DBackward0", "ReplicationPad2DBackward0",
             "ReplicationPad3DBackward0"],
            "route", saved_inputs={0: "_saved_self"}, reads=("self", "padding"),
            forward=_pad("replicate"), vjp=_pad_vjp("replication"))
register_op("PixelShuffleBackward0", "route", attrs=("upscale_factor",),
            forward=lambda v, a: [F.pixel_shuffle(v[0], a["upscale_factor"])],
            vjp=lambda rel, a: [F.pixel_unshuffle(rel[0], a["upscale_factor"])])
register_op("PixelUnshuffleBackward0", "route", attrs=("downscale_factor",),
            forward=lambda v, a: [F.pixel_unshuffle(v[0], a["downscale_factor"])],
            vjp=lambda rel, a: [F.pixel_shuffle(rel[0], a["downscale_factor"])])
# AdaptiveMaxPool1d runs as unsqueeze → AdaptiveMaxPool2D → squeeze
register_op("AdaptiveMaxPool2DBackward0", "route", saved_inputs={0: "_saved_self"},
            reads=("self", "result1"), meta=("out_shapes",),
            forward=_adaptive_max(F.adaptive_max_pool2d, 2),
            vjp=_adaptive_max_vjp(torch.ops.aten.adaptive_max_pool2d_backward))
register_op("AdaptiveMaxPool3DBackward0", "route", saved_inputs={0: "_saved_self"},
            reads=("self", "result1"), meta=("out_shapes",),
            forward=_adaptive_max(F.adaptive_max_pool3d, 3),
            vjp=_adaptive_max_vjp(torch.ops.aten.adaptive_max_pool3d_backward))
register_op("CumsumBackward0", "linear_map", attrs=("dim",),
            forward=lambda v, a: [v[0].cumsum(a["dim"])],
            vjp=lambda rel, a: [rel[0].flip(a["dim"]).cumsum(a["dim"]).flip(a["dim"])])
# unfold copies (its zero padding is a constant: ``fills``), fold sums
register_op("Im2ColBackward0", "route", fills=True, forward=_im2col, attrs=_WINDOW,
            meta=("in_shapes",),
            vjp=lambda rel, a: [F.fold(rel[0], list(a["in_shapes"][0])[-2:],
                                       list(a["kernel_size"]), list(a["dilation"]),
                                       list(a["padding"]), list(a["stride"]))])
register_op("Col2ImBackward0", "linear_map", forward=_col2im, attrs=_WINDOW, meta=("out_shapes",),
            vjp=lambda rel, a: [F.unfold(rel[0], list(a["kernel_size"]), list(a["dilation"]),
                                         list(a["padding"]), list(a["stride"]))])
# nn.Bilinear: _trilinear(x1, weight, x2) (its bias is a following AddBackward0)
register_op("TrilinearBackward0", "multilinear",
            saved_inputs={0: "_saved_i1", 1: "_saved_i2", 2: "_saved_i3"}, forward=_trilinear,
            attrs=("expand1", "expand2", "expand3", "sumdim"), reads=("i1", "i2", "i3"),
            vjp=autograd_vjp(_trilinear, at=("i1", "i2", "i3")))
# the written values broadcast to the indexed region (and lose leading 1-dims): summed back
register_op("IndexPutBackward0", "index_put", forward=_index_put, attrs=("accumulate",),
            reads=("indices",), broadcasts=True, vjp=_index_put_vjp)
register_op("IndexCopyBackward0", "write", saved_inputs={1: "_saved_source"},
            forward=_index_copy, attrs=("dim",), reads=("index",), vjp=_index_copy_vjp)
# index_fill / scatter with a Python scalar: the value is saved nowhere (no forward replay)
register_op("IndexFillBackward0", "write", attrs=("dim",), reads=("index",),
            vjp=lambda rel, a: [rel[0].index_fill(a["dim"], a["index"], 0)])
register_op("IndexFillBackward1", "write", forward=_index_fill_tensor, attrs=("dim",),
            reads=("index",), vjp=_index_fill_vjp)
register_op("ScatterBackward0", "write", forward=_scatter, attrs=("dim",), reads=("index",),
            vjp=_scatter_vjp)
register_op("ScatterBackward1", "write", attrs=("dim",), reads=("index",),
            vjp=lambda rel, a: [rel[0].scatter(a["dim"], a["index"], 0)])
register_op("IndexAddBackward0", "linear_sum", saved_inputs={1: "_saved_source"},
            forward=_index_add, attrs=("dim", "alpha"), reads=("index",),
            meta=("in_shapes", "out_shapes"), zero_operands=(0,), vjp=_index_add_vjp)
register_op("ScatterAddBackward0", "linear_sum", forward=_scatter_add, attrs=("dim",),
            reads=("index",), meta=("out_shapes",), zero_operands=(0,),
            vjp=lambda rel, a: [rel[0], rel[0].gather(a["dim"], a["index"])])
register_op("ScatterReduceBackward0", "scatter_reduce",
            saved_inputs={0: "_saved_self", 1: "_saved_src"}, saved_outputs={0: "_saved_result"},
            forward=_scatter_reduce, attrs=("dim", "reduce", "include_self"),
            reads=("index", "self", "src"), meta=("in_shapes",),
            vjp=autograd_vjp(_scatter_reduce, at=("self", "src")))
# weight (0) and per_sample_weights (1); an absent per_sample_weights is a None edge
register_op("EmbeddingBagBackward0", "embedding_bag",
            saved_inputs={0: "_saved_weight", 1: "_saved_per_sample_weights"},
            forward=_embedding_bag, forward_inputs=(0, 1),
            attrs=("mode", "padding_idx", "scale_grad_by_freq"),
            reads=("indices", "offsets", "weight", "per_sample_weights", "result1", "result2",
                   "result3", "weight_sym_argsize_0"),
            meta=("out_shapes",), vjp=_embedding_bag_vjp)
