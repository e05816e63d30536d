"""Fused scaled-dot-product attention nodes (CPU flash, CUDA flash / efficient / cuDNN).

Decomposed into the rules of its parts: ``u = q kᵀ · scale``, ``x = u + mask``, ``s = softmax(x)``,
``o = s v``. AV and QKᵀ use the AttnLRP uniform ε-rule (the ε-rule in full when only one side
leads to a target), the softmax the AttnLRP softmax rule, a float mask absorbs its z-rule share.
The node saves q, k, v, the mask, ``scale`` and ``is_causal``, so no Promise is needed.

A query row whose every key is masked (the pad positions of a left-padded batch) has attention
weights 0 and output 0 in torch's kernels, not the NaN of a softmax over ``-inf`` alone: the rule
rebuilds the weights the same way, so such a row passes no relevance on and absorbs what reaches
it (through the ε of the AV rule).

The rule reports what it absorbs from its own terms (:meth:`SDPARule.absorbs`): the ε shares of
the AV and QKᵀ rules (Σ ε·sign(z)·R/(z + ε·sign(z))), the softmax rule's Taylor residual
(ΣR·(1 + Σ s x) − Σ x R per row) and a float mask's z-rule share.
"""
from __future__ import annotations

import math

import torch

from ..errors import LRPError
from .base import (Decision, NodeInfo, Rule, add_parts, as_rel, batched, eps_sign, register_op,
                   register_rule, stable_div, stable_div_share)

#: SDPA node type -> the name under which it saves its float / boolean mask (None: no mask)
SDPA_MASKS = {
    "ScaledDotProductFlashAttentionForCpuBackward0": "attn_mask",
    "ScaledDotProductFlashAttentionBackward0": None,
    "ScaledDotProductEfficientAttentionBackward0": "attn_bias",
    "ScaledDotProductCudnnAttentionBackward0": "attn_bias",
    "ScaledDotProductFusedAttentionOverrideableBackward0": "attn_bias",
}
_SDPA_TYPES = list(SDPA_MASKS)


def _saved(node, *names):
    for name in names:
        if hasattr(node, name):
            return getattr(node, name)
    return None


def _operands(a, dtype):
    """(q, k, v, mask, is_causal, groups, scale) from what the SDPA node saved; k and v are
    repeated to q's heads for grouped-query attention."""
    q = as_rel(a["query"], dtype)
    k = as_rel(a["key"], dtype)
    v = as_rel(a["value"], dtype)
    groups = q.shape[-3] // k.shape[-3] if q.dim() >= 3 and k.dim() >= 3 else 1
    if groups > 1:  # grouped-query attention
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    scale = a["scale"]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    mask = a.get("attn_mask", a.get("attn_bias"))
    return q, k, v, mask, bool(a["is_causal"]), groups, scale


def _scores(q, k, mask, causal, scale, dtype):
    """(u, x, s, float_mask): scaled scores, masked logits, attention weights, float mask."""
    u = (q @ k.transpose(-1, -2)) * scale
    x = u
    float_mask = None
    if mask is not None:
        if mask.dtype == torch.bool:
            x = x.masked_fill(~mask, float("-inf"))
        else:  # torch saves a boolean mask as 0/-inf floats: only non-zero entries add anything
            float_mask = as_rel(mask, dtype)
            x = x + float_mask
    if causal:
        L, S = u.shape[-2], u.shape[-1]
        blocked = torch.ones(L, S, dtype=torch.bool, device=u.device).triu_(1)
        x = x.masked_fill(blocked, float("-inf"))
    s = torch.softmax(x, -1)
    if mask is not None:
        # a row with every key masked attends to nothing: weights 0 (the kernels' output is 0
        # there), not the NaN of a softmax over -inf alone
        s = s.masked_fill_(x.amax(-1, keepdim=True) == float("-inf"), 0.0)
    return u, x, s, float_mask


def attention_parts(a, dtype):
    """Rebuild (q, k, v, u, x, s, float_mask, groups, scale) from what the SDPA node saved."""
    q, k, v, mask, causal, groups, scale = _operands(a, dtype)
    u, x, s, float_mask = _scores(q, k, mask, causal, scale, dtype)
    return q, k, v, u, x, s, float_mask, groups, scale


#: score elements per chunk of (sample, head) slices, by device: on a CPU the [L, S]
#: temporaries stay cache-sized at any batch size and head count; on a GPU a chunk is as large
#: as memory allows, since every chunk costs its ~40 kernel launches again
_CHUNK_ELEMENTS = {"cpu": 1 << 22}
_DEFAULT_CHUNK = 1 << 27


def _chunks(q, n_keys: int) -> list[tuple]:
    """Index tuples over q's leading dims: everything at once where it fits the budget, else
    blocks of whole samples, else one sample and several heads at a time."""
    lead = q.shape[:-2]
    budget = _CHUNK_ELEMENTS.get(q.device.type, _DEFAULT_CHUNK)
    per_head = q.shape[-2] * n_keys
    if not lead:
        return [()]
    heads = lead[1] if len(lead) >= 2 else 1
    per_sample = heads * per_head
    if lead[0] * per_sample <= budget:
        return [()]
    if per_sample <= budget:
        step = budget // per_sample
        return [(slice(i, min(lead[0], i + step)),) for i in range(0, lead[0], step)]
    step = max(1, budget // max(1, per_head))
    out: list[tuple] = []
    for i in range(lead[0]):
        if len(lead) == 1:
            out.append((slice(i, i + 1),))
            continue
        for h in range(0, heads, step):
            out.append((slice(i, i + 1), slice(h, min(heads, h + step))))
    return out


def _mask_part(mask, idx, dim: int):
    """The part of a broadcastable mask that goes with the chunk ``idx`` of a ``dim``-D q."""
    if mask is None:
        return None
    m = mask.reshape((1,) * (dim - mask.dim()) + tuple(mask.shape))
    return m[tuple(sl if m.shape[i] > 1 else slice(None) for i, sl in enumerate(idx))]


def _fold_groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return t
    shape = t.shape
    t = t.reshape(*shape[:-3], shape[-3] // groups, groups, shape[-2], shape[-1])
    return t.sum(-3)


@register_rule
class SDPARule(Rule):
    name = "sdpa"
    defaults = {"epsilon": 1e-6, "attention": "attnlrp"}

    def decide(self, info: NodeInfo) -> Decision:
        dropout = float(info.attrs.get("dropout_p") or 0.0)
        if dropout > 0.0:
            raise LRPError(
                f"{info.node_type} ran with dropout_p={dropout}: the dropout mask is not "
                "recoverable from the graph. Explain the model in eval() mode.")
        send = tuple(l and not n for l, n in zip(info.live_inputs, info.none_inputs))
        send = send[:3] + (False,) * (info.n_inputs - 3)
        if info.params.get("attention") == "cp":  # CP-LRP: attention weights are constants
            send = (False, False) + send[2:]
        return Decision(values=(), send=send)

    def absorbs(self, p) -> bool:
        """ε shares, the softmax residual and a float mask's share: reported by :meth:`run`."""
        return True

    def run(self, rel, x, p):
        r = rel[0]
        send = p["send"][:3]
        q, k, v, mask, causal, groups, scale = _operands(x, r.dtype)
        saved_o = x["output"]  # the real output (same dtype: no rounding)
        o = saved_o if saved_o is not None and saved_o.dtype == r.dtype else None
        # a batch of targets (lrpplan.many) in one chunk: no buffers of the forward's shape
        chunks = [()] if batched(r) else _chunks(q, k.shape[-2])
        if chunks == [()]:  # everything at once: no buffers to fill
            *full, absorbed = _attention_relevance(q, k, v, r, o, mask, causal, scale,
                                                   p["epsilon"], send)
        else:
            full = [torch.zeros_like(t) if sent else None for t, sent in zip((q, k, v), send)]
            parts_absorbed = []
            for idx in chunks:
                *parts, part_absorbed = _attention_relevance(
                    q[idx], k[idx], v[idx], r[idx], None if o is None else o[idx],
                    _mask_part(mask, idx, q.dim()), causal, scale, p["epsilon"], send)
                parts_absorbed.append(part_absorbed)
                for dst, part in zip(full, parts):
                    if dst is not None:
                        dst[idx] = part
            absorbed = torch.stack(parts_absorbed).sum()
        out = [None] * len(p["send"])
        out[0] = full[0]
        out[1] = None if full[1] is None else _fold_groups(full[1], groups)
        out[2] = None if full[2] is None else _fold_groups(full[2], groups)
        return out + [absorbed]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a·b of two same-shape tensors without an element-wise temporary."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _attention_relevance(q, k, v, r, o, mask, causal, scale, eps, send):
    """Relevance for (q, k, v) of one chunk of heads (None where not sent), and the relevance
    the chunk absorbs (0-d), from the rules' own terms."""
    send_q, send_k, send_v = send
    u, x, s, float_mask = _scores(q, k, mask, causal, scale, r.dtype)
    if o is None:
        o = s @ v
    # AV: uniform ε-rule, its ε share; the ½ share is folded into r / o (exact: a power of two)
    so, av_share = stable_div_share(r, o, eps)
    absorbed = [av_share]
    if send_v and (send_q or send_k):
        so = so.mul_(0.5)
    rq = rk = rv = None
    if send_v:
        rv = v * (s.transpose(-1, -2) @ so)
    if not (send_q or send_k):
        return rq, rk, rv, add_parts(absorbed, r)
    r_s = (so @ v.transpose(-1, -2)).mul_(s)
    # softmax rule on logits that are finite everywhere: where s = 0 (masked) r_s is 0, so
    # x ⊙ (r_s − s Σ r_s) is 0 there without a select pass
    mask_fin = None if float_mask is None else float_mask.nan_to_num(neginf=0.0)
    x_fin = u if mask_fin is None else u + mask_fin
    r_sum = r_s.sum(-1, keepdim=True)
    # its Taylor residual: Σ_rows Σ r_s · (1 + Σ s x) − Σ x r_s
    x_mean = (s.unsqueeze(-2) @ x_fin.unsqueeze(-1)).reshape(r_sum.shape)
    absorbed += [_dot(r_sum, x_mean.add_(1.0)), -_dot(x_fin, r_s)]
    r_x = (r_s - s * r_sum).mul_(x_fin)
    del r_s
    if mask_fin is not None:  # z-rule on u + mask where the mask adds something finite
        adds = mask_fin != 0
        d = stable_div(r_x, x_fin, eps)
        # the mask's share and the ε share where the z-rule applies: Σ (mask + ε·sign(x)) d
        mask_share = eps_sign(x_fin, eps).add_(mask_fin)
        absorbed.append(_dot(mask_share.masked_fill_(~adds, 0.0), d))
        del mask_share
        r_u = torch.where(adds, u * d, r_x)
        del d
    else:
        r_u = r_x
    su, qk_share = stable_div_share(r_u, u, eps)  # and the ε share of the QKᵀ rule
    absorbed.append(qk_share)
    factor = scale * (0.5 if (send_q and send_k) else 1.0)
    if send_q:
        rq = (su @ k).mul_(q).mul_(factor)
    if send_k:
        rk = (su.transpose(-1, -2) @ q).mul_(k).mul_(factor)
    return rq, rk, rv, torch.stack([t.reshape(()) for t in absorbed if t is not None]).sum()


def _sdpa_forward(vals, a):
    q, k, v, u, x, s, *_ = attention_parts(a, a["query"].dtype)
    return [s @ v]


for _name, _mask in SDPA_MASKS.items():
    register_op(_name, "sdpa",
                saved_inputs={0: "_saved_query", 1: "_saved_key", 2: "_saved_value"},
                saved_outputs={0: "_saved_output"}, forward=_sdpa_forward, forward_inputs=(),
                attrs=("is_causal",),
                facts={"dropout_p": lambda n: float(_saved(n, "_saved_dropout_p") or 0.0)},
                reads=("query", "key", "value", "scale", "output") + ((_mask,) if _mask else ()))
