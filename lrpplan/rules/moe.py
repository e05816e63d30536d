"""Mixture-of-experts: grouped matrix products and the routing around them.

``torch._grouped_mm`` / ``torch.nn.functional.grouped_mm`` (``GroupedMmBackward0``) multiplies
each *group* of rows of a token matrix by its own expert's weight; the groups are given by the
cumulative ``offs`` the node saves. It is the default experts implementation of the transformers
5 MoE layers (Qwen2-MoE, Qwen3-MoE, Mixtral, gpt-oss: ``experts_implementation="grouped_mm"``).
Per group it is a weight × activation product, so it joins the ε-rule family of
:mod:`lrpplan.rules.linear` (``linear`` rule: ε, z⁺, γ, αβ, flat, w², z-box; the uniform ε-rule when
both operands lead to targets) through one more :data:`~lrpplan.rules.linear.BILINEAR` entry:
its forward and the two vector-Jacobian products, written as grouped products again.

The four operand layouts of ``_grouped_mm`` (read from the live operands at run time; which
tokens went to which expert is never part of a plan, the offsets are read from the node by a value
op on every run):

- 2-D × 3-D, ``offs`` over the rows of ``a`` (the MoE forward): ``z[rows g] = a[rows g] @ b[g]``;
- 3-D × 2-D, ``offs`` over the columns of ``b``: ``z[:, cols g] = a[g] @ b[:, cols g]``;
- 2-D × 2-D, ``offs`` over the shared dim: ``z[g] = a[:, k g] @ b[k g, :]`` (weight gradients);
- 3-D × 3-D, no ``offs``: a batched product.

Rows (columns, k-slices) past the last offset belong to no group: the kernel leaves them
uninitialised; here they are 0, so the relevance arriving there is absorbed by the ε term
(``R / ε · ε``) and nothing reaches the operands' rows that no group read.

``_grouped_mm`` runs in float32, bfloat16 and float16 only and wants 16-byte aligned strides;
other dtypes (float64 relevance) and layouts take a loop over the groups, the same arithmetic.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Attrs, register_op
from .linear import BILINEAR, Bilinear, bilinear_forward

T = torch.Tensor

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _spans(offs: T) -> list[tuple[int, int]]:
    """``(start, end)`` of each group along the grouped dim (one host read of the offsets)."""
    ends = [int(v) for v in offs.tolist()]
    return list(zip([0] + ends[:-1], ends))


def _covered(offs: T, n: int, device: torch.device) -> T:
    """Boolean ``[n]``: the position lies inside some group (before the last offset)."""
    return torch.arange(n, device=device) < offs[-1].to(device)


def _loop(a: T, b: T, offs: Optional[T]) -> T:
    """The grouped product, one ``mm`` per group (any dtype, any layout)."""
    if offs is None:
        return torch.bmm(a, b) if a.dim() == 3 else a @ b
    dtype = torch.result_type(a, b)
    if a.dim() == 2 and b.dim() == 3:
        out = a.new_zeros((a.shape[0], b.shape[-1]), dtype=dtype)
        for g, (s, e) in enumerate(_spans(offs)):
            if e > s:
                out[s:e] = a[s:e] @ b[g]
        return out
    if a.dim() == 3 and b.dim() == 2:
        out = a.new_zeros((a.shape[1], b.shape[-1]), dtype=dtype)
        for g, (s, e) in enumerate(_spans(offs)):
            if e > s:
                out[:, s:e] = a[g] @ b[:, s:e]
        return out
    if a.dim() == 2 and b.dim() == 2:
        spans = _spans(offs)
        out = a.new_zeros((len(spans), a.shape[0], b.shape[-1]), dtype=dtype)
        for g, (s, e) in enumerate(spans):
            if e > s:
                out[g] = a[:, s:e] @ b[s:e]
        return out
    raise ValueError(f"grouped product of {a.dim()}-D and {b.dim()}-D operands")


def grouped_mm(a: T, b: T, offs: Optional[T]) -> T:
    """``torch._grouped_mm(a, b, offs)`` with every position outside the groups 0, in any dtype.

    The fused kernel where it runs (float32 / half operands of one dtype, aligned strides),
    else :func:`_loop`; both give the grouped product, the kernel only faster.
    """
    out = None
    if a.dtype == b.dtype and a.dtype in _FAST_DTYPES and a.device == b.device:
        try:
            out = torch._grouped_mm(a, b, offs=offs)
        except RuntimeError:  # alignment / layout the kernel refuses: the loop computes the same
            out = None
    if out is None:
        return _loop(a, b, offs)
    if offs is None or offs.numel() == 0:
        return out
    # the kernel leaves rows / columns past the last offset uninitialised (2-D × 2-D writes
    # every group whole)
    if a.dim() == 2 and b.dim() == 3:
        keep = _covered(offs, out.shape[0], out.device).unsqueeze(-1)
        return torch.where(keep, out, out.new_zeros(()))
    if a.dim() == 3 and b.dim() == 2:
        keep = _covered(offs, out.shape[1], out.device)
        return torch.where(keep, out, out.new_zeros(()))
    return out


def _t(x: T) -> T:
    return x.transpose(-1, -2)


def _vjp_a(s: T, a: T, b: T, at: Attrs) -> T:
    """``(∂z/∂a)ᵀ s``: per group ``s_g b_gᵀ``, again a grouped product, in every layout:
    rows ``[S,N]·[G,N,K]``; columns ``[M,N]·[N,K]`` over N -> ``[G,M,K]``; shared dim
    ``[G,M,N]·[N,K]`` over K's columns -> ``[M,K]``; batched ``bmm``."""
    return grouped_mm(s, _t(b), at.get("offs"))


def _vjp_b(s: T, a: T, b: T, at: Attrs) -> T:
    """``(∂z/∂b)ᵀ s``: per group ``a_gᵀ s_g``: rows ``[K,S]·[S,N]`` over S -> ``[G,K,N]``;
    columns ``[G,K,M]·[M,N]`` -> ``[K,N]``; shared dim ``[K,M]·[G,M,N]`` over K -> ``[K,N]``."""
    return grouped_mm(_t(a), s, at.get("offs"))


def _fwd(a: T, b: T, bias: Optional[T], at: Attrs) -> T:
    return grouped_mm(a, b, at.get("offs"))


#: the grouped product in the ε-rule family's table; ``_grouped_mm`` has no differentiable bias
#: (the CPU kernel takes none), so there is no bias operand to absorb a share
BILINEAR["GroupedMmBackward0"] = Bilinear(0, 1, None, _fwd, _vjp_a, _vjp_b)

register_op("GroupedMmBackward0", "linear", saved_inputs={0: "_saved_self", 1: "_saved_mat2"},
            reads=("offs",), forward=bilinear_forward(BILINEAR["GroupedMmBackward0"]))
