"""CUDA-only autograd nodes, checked on the CPU: their rules run the same math as the CPU nodes.

``CudnnBatchNormBackward0`` and the CUDA SDPA nodes (efficient / flash / cuDNN) never appear in a
CPU graph. A rule step reads the node only through value ops, so each test gives the rule the
values those ops would read from the CUDA node (its op spec's static attributes and reads, under
the names the CUDA node saves them) and compares the rule's output with the rule run on the real
CPU node (``NativeBatchNormBackward0``, ``ScaledDotProductFlashAttentionForCpuBackward0``) and
with a float64 closed form.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lrpplan.rules import get_rule, op_spec
from lrpplan.testing import rule_inputs


def _cuda_step(rule: str, node_type: str, send, **saved) -> tuple[dict, dict]:
    """(x, p) of a rule step at a CUDA node that saved ``saved``: the static attributes and the
    run-time reads its op spec names, nothing else (a missing one is a KeyError)."""
    spec = op_spec(node_type)
    x = {name: saved[name] for name in spec.attrs + spec.reads}
    attrs = {name: saved[name] for name in spec.attrs}
    for name, fact in spec.facts.items():
        attrs[name] = x[name] = saved[name]
    p = {**get_rule(rule).defaults, "send": list(send), "node_type": node_type, "attrs": attrs}
    return x, p


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
    x_cpu, p = rule_inputs(native, "affine_norm", {2: bn.bias.detach()}, send=[True, False, False])
    want = get_rule("affine_norm").run([r], x_cpu, p)[0]

    x_cuda, p = _cuda_step("affine_norm", "CudnnBatchNormBackward0", [True, False, False],
                           input=x.detach(), weight=bn.weight.detach(),
                           running_mean=bn.running_mean, running_var=bn.running_var,
                           result1=torch.empty(0), result2=torch.empty(0), epsilon=bn.eps,
                           training=False)
    x_cuda[2] = bn.bias.detach()
    got = get_rule("affine_norm").run([r], x_cuda, p)[0]
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
    x_cpu, p = rule_inputs(cpu, "sdpa", send=[True, True, True])
    want = get_rule("sdpa").run([r], x_cpu, p)

    saved = dict(query=q.detach(), key=k.detach(), value=v.detach(), output=o.detach(),
                 scale=None, dropout_p=0.0, is_causal=causal and mask is None)
    if mask_name is not None:
        saved[mask_name] = mask
    x_cuda, p = _cuda_step("sdpa", node_type, [True, True, True], **saved)
    got = get_rule("sdpa").run([r], x_cuda, p)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # conservation of the decomposition up to what ε and a float mask absorb
    total = sum(t.sum() for t in got)
    assert math.isfinite(float(total))
