"""Recurrent layers (LSTM, GRU, RNN): decomposed cells and fused kernels.

Decomposed cells (``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` in float64 on CPU, GRU and RNN in every
CPU dtype, hand-written cells) are ordinary graphs of linear maps, additions, element-wise
nonlinearities and products; they need only the routing ops registered here
(``UnsafeSplitBackward0``: ``Tensor.unsafe_chunk`` of the gate pre-activations,
``TransposeBackward1``: the in-place ``transpose_`` of a batch-first layer). The products of a
gate (a sigmoid's output) and a signal follow Arras et al.'s *signal-take-all* rule in the
product rule (:class:`lrpplan.rules.elementwise.ProductRule`, parameter ``gates``; the gate
test is :func:`gated_signal`).

Fused kernels (``MkldnnRnnLayerBackward0``: a float32 ``nn.LSTM`` layer direction on CPU) get the
rule ``rnn`` (:class:`RecurrentLayerRule`): the recurrence re-run from the node's saved tensors,
relevance sent back through ATen's decomposed cell with the same rules, so a fused layer
explains like the decomposed one. ``CudnnRnnBackward0`` is not registered (untested here); its
error says to explain on CPU, where the same layer is supported.

Packed sequences (``pack_padded_sequence``) run the decomposed cells on CPU, also in float32; the
packing itself (``PackPaddedSequenceBackward0``) is a routing op: the packed data is the padded
input's real positions in time-major order, so relevance goes back to them and the padding gets
none. (``pad_packed_sequence`` writes into a zero tensor: ``CopySlices``.)
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..errors import RuleError
from .base import (OPS, Decision, MaybeTensor, NodeInfo, Rule, as_rel, register_op,
                   register_rule, stable_div_share)
from .custom import UNSUPPORTED_HINTS
from .routing import _join_vjp, _n_outputs

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# routing ops of the decomposed cells


# the number of outputs follows the split size (one relevance slot per output): in the key
register_op("UnsafeSplitBackward0", "route", attrs=("dim",), facts={"n_out": _n_outputs},
            reads=("split_size",), meta=("out_shapes",), vjp=_join_vjp(False),
            forward=lambda v, a: list(torch.unsafe_split(v[0], a["split_size"], a["dim"])))
register_op("UnsafeSplitWithSizesBackward0", "route", attrs=("dim",),
            facts={"n_out": _n_outputs}, reads=("split_sizes",), meta=("out_shapes",),
            vjp=_join_vjp(False),
            forward=lambda v, a: list(torch.unsafe_split_with_sizes(
                v[0], list(a["split_sizes"]), a["dim"])))
def _packed_positions(a) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The real positions of a padded batch, time-major ``[T, B]`` (``T`` the padded length),
    in the packed order, from the saved batch sizes; and the time-major shape."""
    sizes = tuple(a["input_sym_sizes"])
    batch, steps = (sizes[0], sizes[1]) if a["batch_first"] else (sizes[1], sizes[0])
    batch_sizes = a["result1"]
    real = torch.arange(batch)[None, :] < batch_sizes[:, None]  # [T_packed, B]
    if real.shape[0] < steps:
        real = torch.cat([real, real.new_zeros((steps - real.shape[0], batch))])
    return real, (steps, batch) + sizes[2:]


def _pack_forward(v, a):
    real, _ = _packed_positions(a)
    x = v[0].transpose(0, 1) if a["batch_first"] else v[0]
    return [x[real.to(x.device)], a["result1"]]


def _pack_vjp(rel, a):
    real, shape = _packed_positions(a)
    r = rel[0]
    g = r.new_zeros(shape).index_put((real.to(r.device),), r)
    return [g.transpose(0, 1) if a["batch_first"] else g]


register_op("PackPaddedSequenceBackward0", "route", attrs=("batch_first",),
            reads=("input_sym_sizes", "result1"), forward=_pack_forward, vjp=_pack_vjp)
# ``x.transpose_(d0, d1)``: the in-place transpose; its forward replay is the out-of-place one
register_op("TransposeBackward1", "route", attrs=("dim0", "dim1"),
            forward=lambda v, a: [v[0].transpose(a["dim0"], a["dim1"])],
            vjp=lambda rel, a: [rel[0].transpose(a["dim0"], a["dim1"])])

# ---------------------------------------------------------------------------------------------
# gate × signal products (Arras et al. 2017, 2019: signal-take-all)

#: node types whose output is a gate: values in [0, 1] that scale a signal
GATE_TYPES = frozenset({"SigmoidBackward0", "HardsigmoidBackward0"})
#: ops through which a gate stays a gate, besides the routing ops (found by their rule): pure
#: copies, and ``c − g`` (``1 − σ``: the GRU's complementary gate)
GATE_KEEPING = frozenset({"CloneBackward0", "AliasBackward0", "ToCopyBackward0", "RsubBackward1"})
#: products whose operands may be a gate and a signal
GATED_PRODUCTS = frozenset({"MulBackward0"})
#: values of the ``gates`` parameter of the product rule and of the fused recurrent rule
GATE_MODES = ("signal", "uniform")


def check_gates(mode: Any) -> str:
    """The ``gates`` parameter, checked (a ``ValueError`` names the known values)."""
    if mode not in GATE_MODES:
        raise ValueError(f"rule parameter gates={mode!r}; known: {list(GATE_MODES)} ('signal': "
                         "signal-take-all for gate × signal products, 'uniform': ½ each)")
    return mode


def is_gate(fn: Any) -> bool:
    """``fn`` (an autograd node, or None) produces a gate: a sigmoid's output, reached through
    routing ops with one tracked input, copies and ``c − g``. Structural: it reads node types
    and edges only, which the plan key holds."""
    for _ in range(10_000):
        if fn is None:
            return False
        name = type(fn).__name__
        if name in GATE_TYPES:
            return True
        spec = OPS.get(name)
        if name not in GATE_KEEPING and (spec is None or spec.rule != "route"):
            return False
        tracked = [f for f, _ in fn.next_functions if f is not None]
        if len(tracked) != 1:
            return False
        fn = tracked[0]
    return False


def gated_signal(info: NodeInfo) -> Optional[int]:
    """For a product under ``gates="signal"``: the input position of the signal when exactly
    one of the two operands is a gate (:func:`is_gate`), else ``None`` (the ordinary rule)."""
    if check_gates(info.params.get("gates", "signal")) != "signal" \
            or info.node_type not in GATED_PRODUCTS or info.n_inputs != 2:
        return None
    gate = [is_gate(info.node.next_functions[i][0]) for i in range(2)]
    return gate.index(False) if gate[0] != gate[1] else None


# ---------------------------------------------------------------------------------------------
# fused kernels: the recurrence re-run from the node's saved tensors, relevance propagated
# through it with the rules the decomposed cell gets
#
# A fused node (``MkldnnRnnLayerBackward0``: one direction of one layer) hides the cell from the
# graph. Its rule rebuilds the cell from what the node saved (input, weights, initial states)
# exactly as ATen's decomposed cell computes it (``aten/src/ATen/native/RNN.cpp``: the input
# projection of the whole sequence first, then per step ``gates = linear_hh(h) + ih_t``) and
# sends relevance backwards through that decomposition, step by step, with the same rules the
# decomposed graph's nodes get: the ε-rule for the two linear maps (the biases absorb their
# share), the z-rule for the additions, identity for tanh / sigmoid / ReLU, the product rule
# (signal-take-all or uniform, parameter ``gates``) for gate × signal. So a fused layer gives
# the relevance of the same layer run decomposed (float64, or GRU / RNN on CPU), to round-off.

#: ``mode`` of the fused kernels (``at::native::CuDNNMode`` numbering): name, gates per unit
RNN_MODES = {0: ("rnn_tanh", 1), 1: ("rnn_relu", 1), 2: ("lstm", 4), 3: ("gru", 3)}


class _Acc:
    """The absorbed relevance of one step, as the decomposed cell's rules report it."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[Tensor] = []

    def add(self, t: Optional[Tensor]) -> None:
        if t is not None:
            self.parts.append(t)

    def total(self, like: Tensor) -> Tensor:
        if not self.parts:
            return like.new_zeros(())
        return torch.stack([p.reshape(()) for p in self.parts]).sum()


def _zrule(r: Tensor, terms: Sequence[Tensor], live: Sequence[bool], eps: float, acc: _Acc,
           z: Optional[Tensor] = None) -> list[Optional[Tensor]]:
    """The z-rule of :class:`~lrpplan.rules.elementwise.ZRule` over ``z = Σ terms``: live terms
    get ``t · R / stab(z)``; the others and ε absorb their shares."""
    if z is None:
        z = terms[0]
        for t in terms[1:]:
            z = z + t
    s, eps_part = stable_div_share(r, z, eps)
    acc.add(eps_part)
    out: list[Optional[Tensor]] = []
    for t, l in zip(terms, live):
        if l:
            out.append(t * s)
        else:
            out.append(None)
            acc.add(torch.dot(t.reshape(-1), s.reshape(-1)))
    return out


def _product(r: Tensor, gate_live: bool, signal_live: bool, gates: str, acc: _Acc
             ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(R_gate, R_signal) of ``gate * signal`` as :class:`~lrpplan.rules.elementwise.ProductRule`
    gives them (both operands full-shape)."""
    if gates == "signal":
        if signal_live:
            return None, r
        acc.add(r.sum())  # a constant signal keeps it all
        return None, None
    if gate_live and signal_live:
        half = 0.5 * r
        return half, half
    return (r, None) if gate_live else (None, r)


def _linear(r: Tensor, x: Tensor, w: Tensor, b: Optional[Tensor], eps: float, acc: _Acc,
            z: Optional[Tensor] = None) -> Tensor:
    """ε-rule of ``z = x Wᵀ + b`` (the bias absorbs its share): ``R_x = x ⊙ (R / stab(z)) W``."""
    if z is None:
        z = x @ w.t() if b is None else torch.addmm(b, x.reshape(-1, x.shape[-1]),
                                                     w.t()).reshape(*x.shape[:-1], -1)
    s, eps_part = stable_div_share(r, z, eps)
    acc.add(eps_part)
    if b is not None:
        acc.add(torch.dot(b, s.reshape(-1, s.shape[-1]).sum(0)))
    return x * (s @ w)


def _cell_forward(kind: str, ih: Tensor, h: Tensor, c: Optional[Tensor], w_hh: Tensor,
                  b_hh: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor], dict]:
    """One step of ATen's decomposed cell from the precomputed input projection ``ih``:
    ``(h', c', saved values)``."""
    hh = h @ w_hh.t() if b_hh is None else torch.addmm(b_hh, h, w_hh.t())
    if kind == "lstm":
        a = hh + ih
        ai, af, ag, ao = a.chunk(4, 1)
        i, f, g, o = torch.sigmoid(ai), torch.sigmoid(af), torch.tanh(ag), torch.sigmoid(ao)
        fc, ig = f * c, i * g
        c2 = fc + ig
        return o * torch.tanh(c2), c2, {"hh": hh, "a": a, "fc": fc, "ig": ig, "c": c2}
    if kind == "gru":
        ir, iz, in_ = ih.chunk(3, 1)
        hr, hz, hn = hh.chunk(3, 1)
        r = torch.sigmoid(hr + ir)
        z = torch.sigmoid(hz + iz)
        q = hn * r
        n = torch.tanh(in_ + q)
        d = h - n
        dz = d * z
        return dz + n, None, {"hh": hh, "q": q, "n": n, "d": d, "dz": dz}
    a = hh + ih
    return (torch.tanh(a) if kind == "rnn_tanh" else torch.relu(a)), None, {"hh": hh, "a": a}


def _cell_relevance(kind: str, rh: Tensor, rc: Optional[Tensor], ih: Tensor, h: Tensor,
                    c: Optional[Tensor], sv: dict, live_in: bool, live_h: bool, live_c: bool,
                    gates: str, eps: float, acc: _Acc
                    ) -> tuple[Optional[Tensor], Tensor, Optional[Tensor], Optional[Tensor]]:
    """Relevance of one decomposed step from the relevance of its outputs: ``(R_hh, R_ih,
    R_c_prev, R_h_direct)``: of ``h Wᵀ + b`` (None when ``h`` leads to no explained input), of
    the input projection, of the previous cell state, and what reaches ``h`` directly (the
    GRU's ``h − n``)."""
    hh = sv["hh"]
    live_a = live_in or live_h  # gate pre-activations lead to an explained input
    if kind == "lstm":
        r_o, r_tanh = _product(rh, live_a, live_a or live_c, gates, acc)
        rc2 = r_tanh if rc is None else (rc if r_tanh is None else rc + r_tanh)
        r_fc, r_ig = _zrule(rc2, [sv["fc"], sv["ig"]], [live_a or live_c, live_a], eps, acc,
                            z=sv["c"])
        r_f = r_cp = r_i = r_g = None
        if r_fc is not None:
            r_f, r_cp = _product(r_fc, live_a, live_c, gates, acc)
        if r_ig is not None:
            r_i, r_g = _product(r_ig, live_a, live_a, gates, acc)
        zero = torch.zeros_like(rh)
        ra = torch.cat([zero if t is None else t for t in (r_i, r_f, r_g, r_o)], 1)
        r_hh, r_ih = _zrule(ra, [hh, ih], [live_h, live_in], eps, acc, z=sv["a"])
        return r_hh, (torch.zeros_like(ih) if r_ih is None else r_ih), r_cp, None
    if kind == "gru":
        n, d, q = sv["n"], sv["d"], sv["q"]
        r_dz, r_n1 = _zrule(rh, [sv["dz"], n], [live_a, live_a], eps, acc, z=sv["dz"] + n)
        r_z, r_d = _product(r_dz, live_a, live_a, gates, acc)
        r_hd, r_n2 = _zrule(r_d, [h, -n], [live_h, True], eps, acc, z=d)
        rn = r_n1 + r_n2
        ir, iz, in_ = ih.chunk(3, 1)
        hr, hz, hn = hh.chunk(3, 1)
        r_in, r_q = _zrule(rn, [in_, q], [live_in, live_a], eps, acc, z=in_ + q)
        r_r = r_hn = None
        if r_q is not None:
            r_r, r_hn = _product(r_q, live_a, live_h, gates, acc)
        zero = torch.zeros_like(rh)
        r_ir = r_hr = r_iz = r_hzz = None
        if r_r is not None:
            r_hr, r_ir = _zrule(r_r, [hr, ir], [live_h, live_in], eps, acc)
        if r_z is not None:
            r_hzz, r_iz = _zrule(r_z, [hz, iz], [live_h, live_in], eps, acc)
        r_ih = torch.cat([zero if t is None else t for t in (r_ir, r_iz, r_in)], 1)
        r_hh = None
        if live_h:
            r_hh = torch.cat([zero if t is None else t for t in (r_hr, r_hzz, r_hn)], 1)
        return r_hh, r_ih, None, r_hd
    r_hh, r_ih = _zrule(rh, [hh, ih], [live_h, live_in], eps, acc, z=sv["a"])
    return r_hh, (torch.zeros_like(ih) if r_ih is None else r_ih), None, None


def rnn_layer_forward(kind: str, reverse: bool, x: Tensor, w_ih: Tensor, w_hh: Tensor,
                      b_ih: Optional[Tensor], b_hh: Optional[Tensor], h0: Tensor,
                      c0: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor,
                                                     list]:
    """One direction of one layer, time-major ``x [T, B, in]``: ``(output [T, B, H], h_T, c_T,
    the input projection, per step (t, h_prev, c_prev, saved values))`` in processing order."""
    ih = x @ w_ih.t() if b_ih is None else torch.addmm(
        b_ih, x.reshape(-1, x.shape[-1]), w_ih.t()).reshape(x.shape[0], x.shape[1], -1)
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    h, c = h0, c0
    outs: list[Optional[Tensor]] = [None] * x.shape[0]
    cache = []
    for t in steps:
        h2, c2, sv = _cell_forward(kind, ih[t], h, c, w_hh, b_hh)
        cache.append((t, h, c, sv))
        h, c = h2, c2
        outs[t] = h
    out = torch.stack(outs, 0) if outs else x.new_zeros((0,) + tuple(h0.shape))
    return out, h, c, ih, cache


def rnn_layer_relevance(kind: str, reverse: bool, rel: Sequence[MaybeTensor], x: Tensor,
                        w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                        b_hh: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
                        send: Sequence[bool], gates: str, eps: float
                        ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Tensor]:
    """Relevance of one fused layer direction: ``(R_x, R_h0, R_c0, absorbed)`` from the
    relevance at ``(output, h_T, c_T)`` (``rel``; None where none arrived). ``send``: whether
    ``x``, ``h0``, ``c0`` lead to explained inputs."""
    send_x, send_h, send_c = send
    out, _, _, ih, cache = rnn_layer_forward(kind, reverse, x, w_ih, w_hh, b_ih, b_hh, h0, c0)
    acc = _Acc()
    r_out, r_hT, r_cT = rel
    # liveness of the states after each step (processing order), as the decomposed graph has it
    live_h, live_c = [send_h], [send_c and kind == "lstm"]
    for _ in cache:
        live_h.append(send_x or live_h[-1] or live_c[-1])
        live_c.append(kind == "lstm" and live_h[-1])
    r_ih = torch.zeros_like(ih)
    rh = torch.zeros_like(h0) if r_hT is None else r_hT
    rc = None if (kind != "lstm" or r_cT is None) else r_cT
    for k in range(len(cache) - 1, -1, -1):
        t, h, c, sv = cache[k]
        if r_out is not None:
            rh = rh + r_out[t]
        r_hh, r_ih_t, r_cp, r_direct = _cell_relevance(
            kind, rh, rc, ih[t], h, c, sv, send_x, live_h[k], live_c[k], gates, eps, acc)
        r_ih[t] = r_ih_t
        rh = torch.zeros_like(h0)
        if r_hh is not None:
            rh = _linear(r_hh, h, w_hh, b_hh, eps, acc, z=sv["hh"])
        if r_direct is not None:
            rh = rh + r_direct
        rc = r_cp
    # without an explained input the z-rules kept the projection's share (r_ih is 0 then)
    r_x = _linear(r_ih, x, w_ih, b_ih, eps, acc, z=ih) if send_x else None
    r_h0 = rh if send_h else None
    r_c0 = rc if (send_c and kind == "lstm") else None
    return r_x, r_h0, r_c0, acc.total(h0)


#: input positions of ``MkldnnRnnLayerBackward0``: input, w_ih, w_hh, b_ih, b_hh, hx, cx
_MKLDNN_SAVED = {0: "_saved_input", 1: "_saved_weight0", 2: "_saved_weight1",
                 3: "_saved_weight2", 4: "_saved_weight3", 5: "_saved_hx_", 6: "_saved_cx_"}


def _mkldnn_mode(a: Any) -> str:
    mode = int(a["mode"])
    if mode not in RNN_MODES:
        raise ValueError(f"MkldnnRnnLayerBackward0 with mode {mode}: known {sorted(RNN_MODES)}")
    return RNN_MODES[mode][0]


def _layer_values(vals: Sequence[MaybeTensor], kind: str, has_biases: bool, dtype: torch.dtype
                  ) -> tuple:
    x, w_ih, w_hh = (as_rel(vals[i], dtype) for i in (0, 1, 2))
    b_ih = as_rel(vals[3], dtype) if has_biases else None
    b_hh = as_rel(vals[4], dtype) if has_biases else None
    h0 = as_rel(vals[5], dtype)
    c0 = as_rel(vals[6], dtype) if kind == "lstm" else None
    return x, w_ih, w_hh, b_ih, b_hh, h0, c0


def _mkldnn_forward(vals, a):
    kind = _mkldnn_mode(a)
    has_biases = bool(a["has_biases"])
    x, w_ih, w_hh, b_ih, b_hh, h0, c0 = _layer_values(vals, kind, has_biases, vals[0].dtype)
    out, h, c, _, _ = rnn_layer_forward(kind, bool(a["reverse"]), x, w_ih, w_hh, b_ih,
                                        b_hh, h0, c0)
    return [out, h, c if c is not None else torch.zeros_like(h)]


@register_rule
class RecurrentLayerRule(Rule):
    """A fused recurrent layer (one direction of one layer): its recurrence re-run from the
    node's saved input, weights and initial states, relevance sent back through ATen's
    decomposed cell with the rules that cell's nodes get (module docstring).

    Parameters (plan step): ``kind`` (``"lstm"``, ``"gru"``, ``"rnn_tanh"``, ``"rnn_relu"``),
    ``reverse``, ``has_biases``, all read from the node at trace time and in the plan key
    (static ``attrs``); rule-set parameters ``epsilon`` and ``gates`` (as for the product rule).
    Absorbs the bias and ε shares and the shares of initial states that lead to no explained
    input.
    """

    name = "rnn"
    defaults = {"epsilon": 1e-6, "gates": "signal"}
    batched_relevance = False  # the recurrence fills per-step buffers of the forward's shape

    def absorbs(self, p) -> bool:
        return True

    def proportional(self, p) -> bool:
        return True  # x ⊙ (ε-rule factors), h0 and c0 likewise

    def decide(self, info: NodeInfo) -> Decision:
        node = info.node
        kind = _mkldnn_mode(info.attrs)
        check_gates(info.params.get("gates", "signal"))
        if tuple(getattr(node, "_saved_batch_sizes", ()) or ()):
            raise RuleError("the rule 'rnn' does not support MkldnnRnnLayerBackward0 of a packed "
                            "sequence")
        x, hx = node._saved_input, node._saved_hx_
        if x.dim() != 3 or hx.dim() != 2 or x.shape[1] != hx.shape[0]:
            raise RuleError(f"MkldnnRnnLayerBackward0: input {list(x.shape)} and state "
                             f"{list(hx.shape)} are not time-major [T, B, in] and [B, H]")
        has_biases = bool(info.attrs["has_biases"])
        live = [l and not n for l, n in zip(info.live_inputs, info.none_inputs)]
        send = tuple(live[i] if i in (0, 5) or (i == 6 and kind == "lstm") else False
                     for i in range(info.n_inputs))
        values = (0, 1, 2) + ((3, 4) if has_biases else ()) + (5,) + ((6,) if kind == "lstm"
                                                                       else ())
        return Decision(values=values, send=send, params={
            "kind": kind, "reverse": bool(info.attrs["reverse"]), "has_biases": has_biases})

    def run(self, rel, x, p):
        ref = next(r for r in rel if r is not None)
        kind = p["kind"]
        v, w_ih, w_hh, b_ih, b_hh, h0, c0 = _layer_values(x, kind, p["has_biases"], ref.dtype)
        send = p["send"]
        rels = [None if r is None else as_rel(r, ref.dtype) for r in
                list(rel) + [None] * (3 - len(rel))]
        r_x, r_h0, r_c0, absorbed = rnn_layer_relevance(
            kind, p["reverse"], rels[:3], v, w_ih, w_hh, b_ih, b_hh, h0, c0,
            (send[0], send[5], len(send) > 6 and send[6]), p["gates"], p["epsilon"])
        out: list[MaybeTensor] = [None] * len(send)
        out[0], out[5] = r_x, r_h0
        if len(send) > 6:
            out[6] = r_c0
        return out + [absorbed]


register_op("MkldnnRnnLayerBackward0", "rnn", saved_inputs=_MKLDNN_SAVED,
            saved_outputs={0: "_saved_result0", 1: "_saved_result1", 2: "_saved_result2"},
            forward=_mkldnn_forward, forward_inputs=(0, 1, 2, 3, 4, 5, 6),
            attrs=("mode", "reverse", "has_biases", "batch_first"))


# the cuDNN/MIOpen recurrent kernels (a whole multi-layer stack in one node, CUDA/ROCm only) have
# no rule yet: no GPU was available to test one. The same module on CPU is supported.
for _name in ("CudnnRnnBackward0", "MiopenRnnBackward0"):
    UNSUPPORTED_HINTS[_name] = (
        "It is a whole cuDNN/MIOpen recurrent layer (nn.LSTM, nn.GRU or nn.RNN on a GPU) in one "
        "node, which has no rule yet. Explain on CPU instead (model.cpu() and CPU inputs): "
        "there the layer runs as MkldnnRnnLayerBackward0 (float32 LSTM) or as decomposed "
        "cells, both supported with the LSTM/GRU rules (docs/rules.md, 'Recurrent networks').")
