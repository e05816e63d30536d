"""Zoo: torchvision architectures, random-initialised, explained end to end with lrpplan.

Every model is built with ``weights=None`` (nothing is downloaded) at full depth, in eval mode,
float32, on small inputs (64x64; ViT-B/16 is built with ``image_size=32``, the smallest size that
still gives a multi-token attention). For each model:

* ``lrpplan.explain`` on a batch of 2 traces a plan into a ``tmp_path`` cache without raising
  ``UnsupportedOperation``; the ledger closes; the relevance is finite, non-zero and of the
  input's shape; the explained target and score are the model's own argmax and logit;
* a fresh :class:`lrpplan.Explainer` over the same cache directory explains *new* inputs: it
  replays the stored plan (``cached``) and equals a fresh traced run (``cache=False``) on those
  inputs to ``max |a - b| / max |b| <= 1e-5``. The CNNs replay the batch-2 plan at batch size 1
  (plans carry no sizes); ViT and Swin replay at batch size 2, because their autograd graph
  itself is different at batch size 1.

The node types of each plan (``params['node_type']`` of every rule step) and the plan's
``stats`` (Promises...) are printed (``pytest -s``).

Two models are prepared so that the checks are not vacuous: torchvision zero-initialises the
ViT classifier head (every logit would be 0, and so would every relevance), so the head is
re-initialised; BatchNorm running statistics of a fresh model are mean 0 / variance 1, which lets
activations vanish through EfficientNet and MobileNet (a top logit of 1e-8, everything absorbed
by ε), so the BatchNorm statistics are calibrated on one random batch first (weights stay random).

The independent reference is the LRP-0 identity on ResNet-50 in float64: with every bias zero
(BatchNorm as a pure per-channel scale) and ε = 1e-12, the ε-rule relevance of a ReLU network
is gradient × input.
"""
from __future__ import annotations

import collections
import time

import pytest

torchvision = pytest.importorskip("torchvision")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lrpplan  # noqa: E402

pytestmark = pytest.mark.zoo

M = torchvision.models
RTOL_REPLAY = 1e-5          # replay vs fresh trace, float32
RTOL_REPLAY_F64 = 1e-10     # replay vs fresh trace, float64
RTOL_LEDGER = 1e-4          # residual relative to the largest ledger total


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------- helpers


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b is the reference)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    denom = b.abs().max()
    assert denom > 0, "reference is identically zero"
    return ((a - b).abs().max() / denom).item()


def calibrate_batchnorm(model: nn.Module, size: int, batch: int = 16) -> nn.Module:
    """Set BatchNorm running statistics from one random batch (only the BN layers in train
    mode, so stochastic depth and dropout stay off), then return the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: exactly this batch's statistics
        bn.train()
    with torch.no_grad():
        model(torch.randn(batch, 3, size, size))
    return model.eval()


def build_vit() -> nn.Module:
    model = M.vit_b_16(weights=None, image_size=32)
    model.heads.head.reset_parameters()  # torchvision zero-initialises the head
    return model


# name -> (factory, input size, calibrate BN)
MODELS = {
    "vgg16": (lambda: M.vgg16(weights=None), 64, False),
    "resnet50": (lambda: M.resnet50(weights=None), 64, True),
    "vit_b_16": (build_vit, 32, False),
    "efficientnet_v2_m": (lambda: M.efficientnet_v2_m(weights=None), 64, True),
    "convnext_tiny": (lambda: M.convnext_tiny(weights=None), 64, False),
    "mobilenet_v3_small": (lambda: M.mobilenet_v3_small(weights=None), 64, True),
    "swin_t": (lambda: M.swin_t(weights=None), 64, False),
    "densenet121": (lambda: M.densenet121(weights=None), 64, True),
}


#: does the autograd graph at batch size 1 have the structure of the graph at batch size 2?
SAME_GRAPH_AT_BATCH_1 = {name: name not in ("vit_b_16", "swin_t") for name in MODELS}


def build(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, int]:
    factory, size, calibrate = MODELS[name]
    model = factory().eval()
    if calibrate:
        calibrate_batchnorm(model, size)
    return model.to(dtype), size


def node_counts(attr: lrpplan.Attribution) -> collections.Counter:
    return collections.Counter(s.params["node_type"] for s in attr.plan.iter_rule_steps())


def check_model(name: str, model: nn.Module, size: int, tmp_path, rules=None,
                dtype: torch.dtype = torch.float32, rtol: float = RTOL_REPLAY):
    """The zoo checks; returns the replayed input and its fresh traced explanation."""
    t0 = time.perf_counter(), time.process_time()
    x = torch.randn(2, 3, size, size, dtype=dtype)

    # 1. trace at batch 2 into an on-disk cache
    attr = lrpplan.explain(model, x, rules=rules, cache=tmp_path)
    t1 = time.perf_counter(), time.process_time()
    assert not attr.cached
    rel = attr.relevance
    assert isinstance(rel, torch.Tensor)
    assert rel.shape == x.shape and rel.dtype == dtype
    assert torch.isfinite(rel).all()
    assert rel.abs().max() > 0
    # the explained target and score are the model's own (independent forward pass)
    with torch.no_grad():
        logits = model(x)
    expected_target = logits.argmax(1)
    assert torch.equal(attr.target, expected_target)
    torch.testing.assert_close(attr.output, logits.gather(1, expected_target[:, None])[:, 0])
    # conservation: the API check and a check relative to the largest total (the API's scale
    # has a floor of 1, which would make a small logit vacuous)
    led = attr.ledger
    assert led.closes(), led
    scale = max(abs(led.start), abs(led.at_inputs), abs(led.absorbed))
    assert abs(led.residual) <= RTOL_LEDGER * scale, led
    assert abs(led.start - attr.output.double().sum().item()) <= 1e-5 * max(1.0, abs(led.start))
    # every rule step names its node type
    counts = node_counts(attr)
    assert sum(counts.values()) == attr.plan.stats["rule_steps"]

    # 2. a new Explainer over the same cache directory, new inputs: replays the stored plan.
    # Plans carry no sizes, so the CNNs replay the batch-2 plan at batch size 1. ViT's and
    # Swin's autograd graph itself changes with the batch size (torch lowers a linear layer or
    # reshape of a [1, S, D] input through views where a batch of 2 needs Clone/Mm/UnsafeView),
    # so those replay at batch size 2.
    batch = 1 if SAME_GRAPH_AT_BATCH_1[name] else 2
    x2 = torch.randn(batch, 3, size, size, dtype=dtype)
    explainer = lrpplan.Explainer(model, rules=rules, cache=tmp_path)
    again = explainer(x2)
    t2 = time.perf_counter(), time.process_time()
    assert again.cached
    assert again.plan_key == attr.plan_key
    assert again.relevance.shape == x2.shape
    assert torch.isfinite(again.relevance).all()
    assert again.ledger.closes(), again.ledger

    # 3. a fresh trace on the same inputs is the reference for the replay (the same batch size:
    # in float32 the conv kernels differ between batch sizes, and the ε-rule amplifies that
    # round-off near z = 0, so batch 1 vs one row of batch 2 is no 1e-5 comparison)
    fresh = lrpplan.explain(model, x2, rules=rules, cache=False)
    t3 = time.perf_counter(), time.process_time()
    assert not fresh.cached
    assert torch.equal(again.target, fresh.target)
    err = rel_err(again.relevance, fresh.relevance)
    assert err <= rtol, f"replay vs trace: max rel err {err:.3g}"

    def took(a, b):  # wall / CPU seconds (CPU summed over threads)
        return f"{b[0] - a[0]:.2f}/{b[1] - a[1]:.2f}s"

    print(f"\n[{name} {str(dtype)[6:]} {size}x{size}] wall/cpu: trace(b=2) {took(t0, t1)}  "
          f"replay(b={batch}) {took(t1, t2)}  trace(b={batch}) {took(t2, t3)}  "
          f"replay vs trace max rel err {err:.2g}")
    print(f"  ledger {led}  at_inputs/start {led.at_inputs / led.start:.3g}")
    print(f"  stats {dict(attr.plan.stats)}")
    print(f"  node types ({len(counts)}): "
          + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    if attr.assumptions:
        print(f"  assumptions: {len(attr.assumptions)}")
    return x2, fresh


# --------------------------------------------------------------------------- zoo

ZOO = list(MODELS)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_float32(name, tmp_path):
    model, size = build(name)
    check_model(name, model, size, tmp_path)


def test_zoo_resnet50_float64(tmp_path):
    model, size = build("resnet50", torch.float64)
    x1, fresh1 = check_model("resnet50", model, size, tmp_path, dtype=torch.float64,
                             rtol=RTOL_REPLAY_F64)
    # in float64 the batch size no longer matters numerically: the sample explained inside a
    # batch of 2 (a replay of the cached plan) is the sample explained alone (a fresh trace)
    pair = lrpplan.Explainer(model, cache=tmp_path)(torch.cat([torch.randn_like(x1), x1]))
    assert pair.cached
    assert rel_err(pair.relevance[1:], fresh1.relevance) <= RTOL_REPLAY_F64


# --------------------------------------------------------------------------- LRP-0 identity


def test_resnet50_lrp0_equals_gradient_times_input():
    """Bias-free ReLU network, ε → 0: LRP-ε relevance = gradient × input (float64)."""
    model = M.resnet50(weights=None).eval().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.zero_()
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.zero_()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)

    attr = lrpplan.explain(model, x, rules=lrpplan.RuleSet.preset("epsilon", epsilon=1e-12),
                           cache=False)
    tiny = lrpplan.explain(model, x, rules=lrpplan.RuleSet.preset("epsilon", epsilon=1e-20),
                           cache=False)

    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    target = logits.detach().argmax(1)
    (grad,) = torch.autograd.grad(logits[0, target[0]], xg)
    gxi = grad * x
    assert torch.equal(attr.target, target)
    assert attr.relevance.dtype == torch.float64
    err = rel_err(attr.relevance, gxi)
    err_tiny = rel_err(tiny.relevance, gxi)
    print(f"\n[resnet50 LRP-0 identity] max rel err vs gradient x input: {err:.3g} (ε=1e-12), "
          f"{err_tiny:.3g} (ε=1e-20); ledger {attr.ledger}")
    assert err <= 1e-6
    # the remaining difference is the stabiliser's alone: it scales with ε (≈ 7e-7 at 1e-12)
    assert err_tiny <= 1e-12
    # nothing may be absorbed in a bias-free network (up to ε = 1e-12)
    assert abs(attr.ledger.absorbed) <= 1e-6 * abs(attr.ledger.start)
    assert attr.ledger.closes()
