"""CUDA-only autograd nodes, checked on the CPU: their rules run the same math as the CPU nodes.

``CudnnBatchNormBackward0`` and the CUDA SDPA nodes (efficient / flash / cuDNN) never appear in a
CPU graph, so each test builds a stand-in node object of that type name carrying the saved
attributes the CUDA node saves, and compares the rule's output with the rule run on the real CPU
node (``NativeBatchNormBackward0``, ``ScaledDotProductFlashAttentionForCpuBackward0``) and with a
float64 closed form.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lrpplan.rules import get_rule, op_spec


def _fake_node(type_name: str, **saved):
    cls = type(type_name, (), {})
    node = cls()
    for k, v in saved.items():
        setattr(node, "_saved_" + k, v)
    return node


def _params(rule: str, node_type: str, send) -> dict:
    p = dict(get_rule(rule).defaults)
    p.update({"send": list(send), "node_type": node_type, "forward": op_spec(node_type).forward})
    return p


@pytest.mark.parametrize("seed", [0, 1])
def test_cudnn_batchnorm_matches_native_and_closed_form(seed):
    torch.manual_seed(seed)
    bn = torch.nn.BatchNorm2d(3).double().eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = bn(x)
    native = y.grad_fn
    assert type(native).__name__ == "NativeBatchNormBackward0"
    r = torch.randn_like(y)
    p = _params("affine_norm", "NativeBatchNormBackward0", [True, False, False])
    want = get_rule("affine_norm").run(native, [r], [None, None, bn.bias.detach()], p)[0]

    fake = _fake_node("CudnnBatchNormBackward0", input=x.detach(), weight=bn.weight.detach(),
                      running_mean=bn.running_mean, running_var=bn.running_var,
                      result1=torch.empty(0), result2=torch.empty(0), epsilon=bn.eps,
                      training=False)
    p = _params("affine_norm", "CudnnBatchNormBackward0", [True, False, False])
    got = get_rule("affine_norm").run(fake, [r], [None, None, bn.bias.detach()], p)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    # closed form: y = a x + c, R_x = a x R / (y + eps sign y)
    a = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(1, 3, 1, 1)
    yv = y.detach()
    ref = a * x.detach() * r / (yv + 1e-6 * torch.where(yv >= 0, 1.0, -1.0))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("node_type,mask_name", [
    ("ScaledDotProductEfficientAttentionBackward0", "attn_bias"),
    ("ScaledDotProductCudnnAttentionBackward0", "attn_bias"),
    ("ScaledDotProductFlashAttentionBackward0", None),
])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_sdpa_nodes_match_cpu_flash(node_type, mask_name, causal):
    torch.manual_seed(0)
    q = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = None if mask_name is None else torch.randn(5, 5, dtype=torch.float64)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    cpu = o.grad_fn
    r = torch.randn_like(o)
    p = _params("sdpa", type(cpu).__name__, [True, True, True])
    want = get_rule("sdpa").run(cpu, [r], [None] * 3, p)

    saved = dict(query=q.detach(), key=k.detach(), value=v.detach(), output=o.detach(),
                 scale=None, dropout_p=0.0, is_causal=causal and mask is None)
    if mask_name is not None:
        saved[mask_name] = mask
    fake = _fake_node(node_type, **saved)
    p = _params("sdpa", node_type, [True, True, True])
    got = get_rule("sdpa").run(fake, [r], [None] * 3, p)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # conservation of the decomposition up to what ε and a float mask absorb
    total = sum(t.sum() for t in got)
    assert math.isfinite(float(total))
