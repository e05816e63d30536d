"""Every rule family against an independent float64 reference (``tests/references.py``).

Each case builds a tiny graph with torch ops, runs :func:`lrpplan.attribute` with an explicit
random seed and compares the relevance at the explained inputs with the reference the case is
paired with (``REFERENCES[name]``). The references never call lrpplan: linear operations become
explicit matrices through ``torch.autograd.functional.jacobian``, routing operations are
differentiated by autograd, the rest is written out in closed form. Each case also checks that
the relevance is finite and that the conservation ledger closes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpplan

try:  # tests/ as a package or as a plain directory on sys.path
    from .references import REFERENCES, as_matrix
except ImportError:
    from references import REFERENCES, as_matrix

Tensor = torch.Tensor
DTYPE = torch.float64
SEEDS = [0, 1, 2]
RTOL = 1e-8


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# case registry


@dataclass
class Case:
    """A graph to explain and the reference relevance of each explained input."""

    output: Any                      # tensor or list of tensors
    inputs: Sequence[Tensor]
    seed: Any                        # structure of ``output``
    expected: Sequence[Optional[Tensor]]  # None: the input receives no relevance
    rules: Any = None
    assumption: Optional[str] = None  # substring expected in ``Attribution.assumptions``


#: pytest params (builder, reference); a builder maps (generator, reference) to a Case
CASES: list = []


def case(name: str, reference: str, marks: Sequence[Any] = ()) -> Callable:
    """Register a case builder paired with ``REFERENCES[reference]``."""
    def register(builder: Callable[[torch.Generator, Callable], Case]) -> Callable:
        CASES.append(pytest.param(builder, REFERENCES[reference], id=f"{reference}-{name}",
                                  marks=list(marks)))
        return builder
    return register


def randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return torch.randn(shape, generator=g, dtype=DTYPE) * scale


def leaf(g: torch.Generator, *shape: int) -> Tensor:
    return randn(g, *shape).requires_grad_(True)


def positive(g: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(shape, generator=g, dtype=DTYPE) + 0.5


def init(module: nn.Module, g: torch.Generator, scale: float = 0.5) -> nn.Module:
    """The module in float64 with all parameters drawn from ``g``."""
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(randn(g, *p.shape, scale=scale))
    return module


def eps_rules(epsilon: Optional[float]) -> Optional[lrpplan.RuleSet]:
    return None if epsilon is None else lrpplan.RuleSet.preset("epsilon", epsilon=epsilon)


def variant_rules(variant: str, **params: Any) -> lrpplan.RuleSet:
    """ε-family ``variant`` on every weight × activation node (linear and convolution)."""
    return lrpplan.RuleSet("custom", rule_params={"linear": {"variant": variant, **params}})


def _eps(epsilon: Optional[float]) -> float:
    return 1e-6 if epsilon is None else epsilon


# ---------------------------------------------------------------------------------------------
# weight × activation: the ε family (ε, z⁺, γ, αβ, flat, w², zᴮ) in matrix form, W from the
# Jacobian of the layer

LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "linear-2d-bias": (lambda: nn.Linear(5, 4), (3, 5)),
    "linear-2d-nobias": (lambda: nn.Linear(5, 4, bias=False), (3, 5)),
    "linear-3d-bias": (lambda: nn.Linear(5, 4), (2, 3, 5)),
    "linear-3d-nobias": (lambda: nn.Linear(5, 4, bias=False), (2, 3, 5)),
    "conv2d-stride-padding": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 6, 6)),
    "conv2d-groups-nobias": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False),
                             (2, 4, 5, 5)),
    "conv2d-dilation": (lambda: nn.Conv2d(2, 3, 3, stride=(1, 2), padding=2, dilation=2),
                        (1, 2, 7, 7)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 8)),
    "conv-transpose2d": (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1), (1, 3, 4, 4)),
}


def _layer_case(factory, shape, rules, **ref_kwargs):
    def build(g: torch.Generator, ref: Callable) -> Case:
        module = init(factory(), g)
        x = leaf(g, *shape)
        z = module(x)
        r = randn(g, *z.shape)
        weight, bias = as_matrix(module, x)
        return Case(z, (x,), r, (ref(weight, bias, x.detach(), r, **ref_kwargs),), rules)
    return build


for _name, (_factory, _shape) in LAYERS.items():
    for _epsilon in (None, 0.5):
        case(f"{_name}-eps{_eps(_epsilon):g}", "epsilon")(
            _layer_case(_factory, _shape, eps_rules(_epsilon), epsilon=_eps(_epsilon)))
    for _epsilon in (1e-6, 0.5):
        case(f"{_name}-eps{_epsilon:g}", "zplus")(
            _layer_case(_factory, _shape, lrpplan.RuleSet.preset("zplus", epsilon=_epsilon),
                        epsilon=_epsilon))
    case(_name, "gamma")(_layer_case(_factory, _shape, variant_rules("gamma", gamma=0.25), gamma=0.25))
    case(f"{_name}-gamma0.5-eps0.1", "gamma")(
        _layer_case(_factory, _shape,
                    variant_rules("gamma", gamma=0.5, epsilon=0.1), gamma=0.5, epsilon=0.1))
    case(f"{_name}-a2b1", "alpha_beta")(
        _layer_case(_factory, _shape, variant_rules("alphabeta", alpha=2.0, beta=1.0),
                    alpha=2.0, beta=1.0))
    case(f"{_name}-a1b0", "alpha_beta")(
        _layer_case(_factory, _shape, variant_rules("alphabeta", alpha=1.0, beta=0.0),
                    alpha=1.0, beta=0.0))
    case(_name, "flat")(_layer_case(_factory, _shape, variant_rules("flat")))
    case(_name, "wsquare")(_layer_case(_factory, _shape, variant_rules("wsquare")))
    case(_name, "zbox")(_layer_case(_factory, _shape, variant_rules("zbox"), low=-3.0, high=3.0))
    case(f"{_name}-low-1-high2", "zbox")(
        _layer_case(_factory, _shape, variant_rules("zbox", low=-1.0, high=2.0),
                    low=-1.0, high=2.0))
    # presets that change convolutions only: everything else keeps the ε-rule
    _conv = _name.startswith("conv")
    case(f"{_name}-preset-epsilon-plus", "zplus" if _conv else "epsilon")(
        _layer_case(_factory, _shape, lrpplan.RuleSet.preset("epsilon-plus")))
    case(f"{_name}-preset-epsilon-gamma", "gamma" if _conv else "epsilon")(
        _layer_case(_factory, _shape, lrpplan.RuleSet.preset("epsilon-gamma"),
                    **({"gamma": 0.25} if _conv else {})))
    case(f"{_name}-preset-epsilon-alpha2-beta1", "alpha_beta" if _conv else "epsilon")(
        _layer_case(_factory, _shape, lrpplan.RuleSet.preset("epsilon-alpha2-beta1"),
                    **({"alpha": 2.0, "beta": 1.0} if _conv else {})))
    if _conv:
        case(f"{_name}-preset-epsilon-plus-eps0.5", "zplus")(
            _layer_case(_factory, _shape, lrpplan.RuleSet.preset("epsilon-plus", epsilon=0.5),
                        epsilon=0.5))
        case(f"{_name}-preset-epsilon-gamma-gamma0.5", "gamma")(
            _layer_case(_factory, _shape, lrpplan.RuleSet.preset("epsilon-gamma", gamma=0.5),
                        gamma=0.5))
        case(f"{_name}-preset-epsilon-alpha-beta-a1b0", "alpha_beta")(
            _layer_case(_factory, _shape,
                        lrpplan.RuleSet.preset("epsilon-alpha2-beta1", alpha=1.0, beta=0.0),
                        alpha=1.0, beta=0.0))


# ---------------------------------------------------------------------------------------------
# matmul of two explained activations: uniform ε-rule


def _matmul_case(op, shape_a, shape_b, epsilon=None):
    def build(g, ref):
        a, b = leaf(g, *shape_a), leaf(g, *shape_b)
        z = op(a, b)
        r = randn(g, *z.shape)
        return Case(z, (a, b), r, ref(a.detach(), b.detach(), r, _eps(epsilon)),
                    eps_rules(epsilon))
    return build


case("bmm", "uniform_matmul")(_matmul_case(torch.bmm, (2, 3, 4), (2, 4, 5)))
case("bmm-eps0.5", "uniform_matmul")(_matmul_case(torch.bmm, (2, 3, 4), (2, 4, 5), 0.5))
case("mm", "uniform_matmul")(_matmul_case(torch.mm, (3, 4), (4, 5)))
case("matmul-4d", "uniform_matmul")(_matmul_case(torch.matmul, (2, 2, 3, 4), (2, 2, 4, 5)))


# ---------------------------------------------------------------------------------------------
# Add / Sub: z-rule


@case("add-broadcast", "z_rule")
def _add_broadcast(g, ref):
    x, y = leaf(g, 3, 4), leaf(g, 4)
    z = x + y
    r = randn(g, *z.shape)
    return Case(z, (x, y), r, ref([x.detach(), y.detach()], r, [x.shape, y.shape]))


@case("add-broadcast-eps0.5", "z_rule")
def _add_broadcast_eps(g, ref):
    x, y = leaf(g, 2, 3, 4), leaf(g, 3, 1)
    z = x + y
    r = randn(g, *z.shape)
    return Case(z, (x, y), r, ref([x.detach(), y.detach()], r, [x.shape, y.shape], 0.5),
                eps_rules(0.5))


@case("add-alpha", "z_rule")
def _add_alpha(g, ref):
    x, y = leaf(g, 3, 4), leaf(g, 3, 4)
    z = torch.add(x, y, alpha=2.0)
    r = randn(g, *z.shape)
    return Case(z, (x, y), r, ref([x.detach(), 2.0 * y.detach()], r, [x.shape, y.shape]))


@case("add-parameter-absorbs", "z_rule")
def _add_parameter(g, ref):
    x = leaf(g, 3, 4)
    p = nn.Parameter(randn(g, 4))
    z = x + p
    r = randn(g, *z.shape)
    return Case(z, (x,), r, ref([x.detach(), p.detach()], r, [x.shape, p.shape])[:1])


@case("add-branch-absorbs", "z_rule")
def _add_branch(g, ref):
    """The operand that leads to no explained input (lin(c)) absorbs its share."""
    lin = init(nn.Linear(4, 4), g)
    x, c = leaf(g, 3, 4), randn(g, 3, 4)
    other = lin(c)
    z = x + other
    r = randn(g, *z.shape)
    return Case(z, (x,), r, ref([x.detach(), other.detach()], r, [x.shape, other.shape])[:1])


@case("sub", "z_rule")
def _sub(g, ref):
    x, y = leaf(g, 3, 4), leaf(g, 3, 4)
    z = x - y
    r = randn(g, *z.shape)
    return Case(z, (x, y), r, ref([x.detach(), -y.detach()], r, [x.shape, y.shape]))


@case("sub-parameter-absorbs", "z_rule")
def _sub_parameter(g, ref):
    x = leaf(g, 2, 3, 4)
    p = nn.Parameter(randn(g, 3, 4))
    z = x - p
    r = randn(g, *z.shape)
    return Case(z, (x,), r, ref([x.detach(), -p.detach()], r, [x.shape, p.shape])[:1])


@case("rsub", "z_rule")
def _rsub(g, ref):
    x, y = leaf(g, 3, 4), leaf(g, 3, 4)
    z = torch.rsub(x, y)  # y - x
    r = randn(g, *z.shape)
    return Case(z, (x, y), r, ref([-x.detach(), y.detach()], r, [x.shape, y.shape]))


@case("add-python-scalar", "identity")
def _add_scalar(g, ref):
    """A constant autograd does not save is taken as 0: all relevance to x (an assumption)."""
    x = leaf(g, 3, 4)
    z = x + 0.7
    r = randn(g, *z.shape)
    return Case(z, (x,), r, (ref(r),), assumption="taken as 0")


# ---------------------------------------------------------------------------------------------
# Mul / Div


def _product_case(op, shapes, explained, shares, constant=None):
    """``op(*operands)``; ``constant`` makes extra (non-grad) operands."""
    def build(g, ref):
        operands = [leaf(g, *s) if e else nn.Parameter(positive(g, *s))
                    for s, e in zip(shapes, explained)]
        extra = [] if constant is None else [constant(g)]
        z = op(*operands, *extra)
        r = randn(g, *z.shape)
        ins = [o for o, e in zip(operands, explained) if e]
        exp = ref(r, shares, [o.shape for o in ins])
        return Case(z, ins, r, exp)
    return build


case("mul-full-shape", "product")(
    _product_case(torch.mul, [(3, 4), (3, 4)], [True, True], [0.5, 0.5]))
case("mul-broadcast-scale", "product")(
    _product_case(torch.mul, [(3, 4), (3, 1)], [True, True], [1.0, 0.0]))
case("mul-broadcast-scale-first", "product")(
    _product_case(torch.mul, [(1, 4), (3, 4)], [True, True], [0.0, 1.0]))
case("mul-parameter", "product")(
    _product_case(torch.mul, [(3, 4), (3, 4)], [True, False], [1.0]))
case("mul-const-tensor", "product")(
    _product_case(lambda x, c: x * c, [(3, 4)], [True], [1.0], lambda g: randn(g, 3, 4)))
case("mul-python-scalar", "product")(
    _product_case(lambda x: x * 3.0, [(3, 4)], [True], [1.0]))
case("div-python-scalar", "product")(
    _product_case(lambda x: x / 4.0, [(3, 4)], [True], [1.0]))
case("div-const-tensor", "product")(
    _product_case(lambda x, c: x / c, [(3, 4)], [True], [1.0], lambda g: positive(g, 3, 4)))
case("div-full-shape", "product")(
    _product_case(lambda x, y: x / y.exp(), [(3, 4), (3, 4)], [True, True], [0.5, 0.5]))
case("div-broadcast-scale", "product")(
    _product_case(lambda x, y: x / (y * y + 0.5), [(2, 3, 4), (2, 3, 1)], [True, True],
                  [1.0, 0.0]))


# ---------------------------------------------------------------------------------------------
# sums, means, average pooling, upsampling: ε-rule through the map's Jacobian (no bias)


def _linear_map_case(fn, shape, epsilon=None):
    def build(g, ref):
        x = leaf(g, *shape)
        z = fn(x)
        r = randn(g, *z.shape)
        return Case(z, (x,), r, (ref(fn, x.detach(), r, _eps(epsilon)),), eps_rules(epsilon))
    return build


LINEAR_MAPS: dict[str, tuple[Callable[[Tensor], Tensor], tuple[int, ...]]] = {
    "sum-dim": (lambda x: x.sum(1), (2, 3, 4)),
    "sum-dims-keepdim": (lambda x: x.sum((1, 2), keepdim=True), (2, 3, 4)),
    "sum-all": (lambda x: x.sum(), (3, 4)),
    "mean-last": (lambda x: x.mean(-1), (2, 3, 4)),
    "mean-dims": (lambda x: x.mean((0, 2)), (2, 3, 4)),
    "mean-all": (lambda x: x.mean(), (3, 4)),
    "adaptive-avg-pool2d": (nn.AdaptiveAvgPool2d((2, 3)), (2, 3, 5, 7)),
    "adaptive-avg-pool2d-1": (nn.AdaptiveAvgPool2d(1), (2, 3, 4, 4)),
    "avg-pool2d": (nn.AvgPool2d(2), (2, 3, 4, 6)),
    "avg-pool2d-pad": (nn.AvgPool2d(3, stride=2, padding=1), (1, 2, 5, 5)),
    "avg-pool2d-pad-exclude": (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
                               (1, 2, 5, 5)),
    "upsample-bilinear": (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"),
                          (1, 2, 3, 3)),
    "upsample-bilinear-align": (
        lambda x: F.interpolate(x, size=(5, 4), mode="bilinear", align_corners=True),
        (1, 2, 3, 3)),
}

for _name, (_fn, _shape) in LINEAR_MAPS.items():
    case(_name, "linear_map")(_linear_map_case(_fn, _shape))
for _name in ("sum-dim", "mean-dims", "avg-pool2d-pad"):
    case(f"{_name}-eps0.5", "linear_map")(_linear_map_case(*LINEAR_MAPS[_name], epsilon=0.5))


# ---------------------------------------------------------------------------------------------
# element-wise nonlinearities: identity

UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu-tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "exp": torch.exp,
    "sigmoid": torch.sigmoid,
}


def _unary_case(fn):
    def build(g, ref):
        x = leaf(g, 3, 5)
        z = fn(x)
        r = randn(g, *z.shape)
        return Case(z, (x,), r, (ref(r),))
    return build


for _name, _fn in UNARY.items():
    case(_name, "identity")(_unary_case(_fn))


# ---------------------------------------------------------------------------------------------
# routing: relevance routed like the gradient of the routing op alone

_IDX = torch.tensor([0, 2, 2, 1])
_GATHER = torch.tensor([[[0, 0, 3], [1, 2, 2], [3, 1, 0]],
                        [[2, 2, 2], [0, 1, 3], [3, 3, 0]]])
_COND = torch.tensor([[True, False, True, True], [False, False, True, False],
                      [True, True, False, True]])

ROUTES: dict[str, tuple[Callable[..., Any], list[tuple[int, ...]]]] = {
    "permute": (lambda x: x.permute(2, 0, 1), [(2, 3, 4)]),
    "transpose": (lambda x: x.transpose(1, 2), [(2, 3, 4)]),
    "t": (lambda x: x.t(), [(3, 4)]),
    "reshape": (lambda x: x.reshape(2, -1), [(2, 3, 4)]),
    "unsqueeze-squeeze": (lambda x: x.unsqueeze(1).squeeze(0), [(1, 3, 4)]),
    "cat": (lambda x, y: torch.cat([x, y], 1), [(2, 3, 4), (2, 2, 4)]),
    "stack": (lambda x, y: torch.stack([x, y], 0), [(3, 4), (3, 4)]),
    "split": (lambda x: x.split([1, 3], dim=2), [(2, 3, 4)]),
    "split-first-only": (lambda x: x.split(2, dim=2)[0], [(2, 3, 4)]),
    "chunk": (lambda x: x.chunk(2, dim=1), [(2, 4, 3)]),
    "unbind": (lambda x: x.unbind(1), [(2, 3, 4)]),
    "slice": (lambda x: x[:, 1:3, ::2], [(2, 4, 5)]),
    "select": (lambda x: x[:, 1], [(2, 3, 4)]),
    "index-repeated": (lambda x: x[:, _IDX], [(2, 3, 4)]),
    "index-select": (lambda x: x.index_select(1, _IDX[:3]), [(2, 3, 4)]),
    "gather": (lambda x: torch.gather(x, 2, _GATHER), [(2, 3, 4)]),
    "expand": (lambda x: x.expand(2, 3, 4), [(2, 1, 4)]),
    "repeat": (lambda x: x.repeat(1, 2, 3), [(2, 3, 4)]),
    "flip": (lambda x: x.flip(1), [(2, 3, 4)]),
    "roll": (lambda x: x.roll(1, 2), [(2, 3, 4)]),
    "where": (lambda x, y: torch.where(_COND, x, y), [(3, 4), (3, 4)]),
    "masked-fill": (lambda x: x.masked_fill(_COND, 0.0), [(3, 4)]),
    "max-dim": (lambda x: x.max(dim=1).values, [(2, 3, 4)]),
    "amax": (lambda x: x.amax(dim=-1), [(2, 3, 4)]),
    "max-pool2d": (lambda x: F.max_pool2d(x, 2), [(1, 2, 4, 6)]),
    "max-pool2d-overlap": (lambda x: F.max_pool2d(x, 3, stride=1, padding=1), [(1, 2, 4, 4)]),
}


def _route_case(fn, shapes):
    def build(g, ref):
        xs = [leaf(g, *s) for s in shapes]
        out = fn(*xs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        seeds = [randn(g, *o.shape) for o in outs]
        expected = ref(fn, [x.detach() for x in xs], seeds)
        if isinstance(out, (tuple, list)):
            return Case(outs, xs, seeds, expected)
        return Case(out, xs, seeds[0], expected)
    return build


for _name, (_fn, _shapes) in ROUTES.items():
    case(_name, "route")(_route_case(_fn, _shapes))


# ---------------------------------------------------------------------------------------------
# softmax: AttnLRP rule


def _softmax_case(shape, dim):
    def build(g, ref):
        x = leaf(g, *shape)
        s = torch.softmax(x, dim)
        r = randn(g, *s.shape)
        return Case(s, (x,), r, (ref(x.detach(), r, dim),))
    return build


case("last-dim", "softmax")(_softmax_case((3, 5), -1))
case("dim1-3d", "softmax")(_softmax_case((2, 4, 3), 1))


@case("after-linear", "softmax")
def _linear_softmax(g, ref):
    """The logits are an intermediate (recovered through a Promise), the input a layer below."""
    lin = init(nn.Linear(4, 5), g)
    h = leaf(g, 3, 4)
    logits = lin(h)
    s = torch.softmax(logits, -1)
    r = randn(g, *s.shape)
    r_logits = ref(logits.detach(), r, -1)
    weight, bias = as_matrix(lin, h)
    return Case(s, (h,), r, (REFERENCES["epsilon"](weight, bias, h.detach(), r_logits),))


# ---------------------------------------------------------------------------------------------
# normalisation


def _layer_norm_case(shape, normalized, affine=True, epsilon=None):
    def build(g, ref):
        ln = nn.LayerNorm(normalized, elementwise_affine=affine).double()
        init(ln, g, scale=1.0)
        x = leaf(g, *shape)
        y = ln(x)
        r = randn(g, *y.shape)
        w = ln.weight.detach() if affine else None
        b = ln.bias.detach() if affine else None
        exp = ref(x.detach(), r, len(normalized), w, b, ln.eps, _eps(epsilon))
        return Case(y, (x,), r, (exp,), eps_rules(epsilon))
    return build


case("affine", "layer_norm")(_layer_norm_case((2, 3, 6), (6,)))
case("affine-eps0.5", "layer_norm")(_layer_norm_case((2, 3, 6), (6,), epsilon=0.5))
case("two-dims", "layer_norm")(_layer_norm_case((2, 3, 4), (3, 4)))
case("no-affine", "layer_norm")(_layer_norm_case((4, 6), (6,), affine=False))


def _group_norm_case(groups, channels, shape, affine=True, epsilon=None):
    def build(g, ref):
        gn = nn.GroupNorm(groups, channels, affine=affine).double()
        init(gn, g, scale=1.0)
        x = leaf(g, *shape)
        y = gn(x)
        r = randn(g, *y.shape)
        w = gn.weight.detach() if affine else None
        b = gn.bias.detach() if affine else None
        exp = ref(x.detach(), r, groups, w, b, gn.eps, _eps(epsilon))
        return Case(y, (x,), r, (exp,), eps_rules(epsilon))
    return build


case("affine", "group_norm")(_group_norm_case(2, 4, (2, 4, 3, 3)))
case("affine-eps0.5", "group_norm")(_group_norm_case(2, 4, (2, 4, 3, 3), epsilon=0.5))
case("one-group-no-affine", "group_norm")(_group_norm_case(1, 3, (2, 3, 5), affine=False))


def _batch_norm_case(factory, shape, epsilon=None):
    def build(g, ref):
        bn = init(factory(), g, scale=1.0)
        c = shape[1]
        bn.running_mean = randn(g, c)
        bn.running_var = positive(g, c)
        bn.eval()
        x = leaf(g, *shape)
        y = bn(x)
        r = randn(g, *y.shape)
        exp = ref(x.detach(), r, bn.running_mean, bn.running_var, bn.weight.detach(),
                  bn.bias.detach(), bn.eps, _eps(epsilon))
        return Case(y, (x,), r, (exp,), eps_rules(epsilon))
    return build


case("2d-eval", "batch_norm")(_batch_norm_case(lambda: nn.BatchNorm2d(3), (2, 3, 4, 4)))
case("2d-eval-eps0.5", "batch_norm")(
    _batch_norm_case(lambda: nn.BatchNorm2d(3), (2, 3, 4, 4), epsilon=0.5))
case("1d-eval", "batch_norm")(_batch_norm_case(lambda: nn.BatchNorm1d(5), (4, 5)))


# ---------------------------------------------------------------------------------------------
# scaled dot-product attention: explicit decomposition


def _sdpa_case(lq=5, ls=5, e=4, ev=4, heads=2, kv_heads=2, mask=None, is_causal=False,
               scale=None, explained=(True, True, True), epsilon=None):
    def build(g, ref):
        q, k, v = randn(g, 2, heads, lq, e), randn(g, 2, kv_heads, ls, e), \
            randn(g, 2, kv_heads, ls, ev)
        q, k, v = (t.requires_grad_(flag) for t, flag in zip((q, k, v), explained))
        m = None if mask is None else mask(g, lq, ls)
        kwargs = {} if scale is None else {"scale": scale}
        if kv_heads != heads:
            kwargs["enable_gqa"] = True
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=is_causal, **kwargs)
        r = randn(g, *o.shape)
        groups = heads // kv_heads
        kr, vr = k.detach(), v.detach()
        if groups > 1:
            kr, vr = kr.repeat_interleave(groups, 1), vr.repeat_interleave(groups, 1)
        exp = ref(q.detach(), kr, vr, r, mask=m, is_causal=is_causal, scale=scale,
                  explained=explained, epsilon=_eps(epsilon))
        exp = list(exp)
        if groups > 1:
            for i in (1, 2):
                if exp[i] is not None:
                    t = exp[i]
                    exp[i] = t.reshape(2, kv_heads, groups, *t.shape[2:]).sum(2)
        ins = [t for t, flag in zip((q, k, v), explained) if flag]
        exp = [t for t, flag in zip(exp, explained) if flag]
        return Case(o, ins, r, exp, eps_rules(epsilon))
    return build


def _bool_mask(g, lq, ls):
    m = torch.rand(lq, ls, generator=g) > 0.4
    m[:, 0] = True  # no fully masked row
    return m


def _float_mask(g, lq, ls):
    m = randn(g, lq, ls)
    m[torch.rand(lq, ls, generator=g) > 0.7] = float("-inf")
    m[:, 0] = 0.3
    return m


def _float_mask_batched(g, lq, ls):
    return randn(g, 2, 1, lq, ls)


def _float_mask_zeros(g, lq, ls):
    """0/-inf entries (what a boolean mask becomes) next to entries that add something."""
    m = torch.zeros(lq, ls, dtype=DTYPE)
    m[torch.rand(lq, ls, generator=g) > 0.6] = float("-inf")
    m[:, :2] = randn(g, lq, 2)
    return m


case("no-mask", "sdpa")(_sdpa_case(lq=5, ls=6, ev=3))
case("no-mask-eps0.5", "sdpa")(_sdpa_case(epsilon=0.5))
case("causal", "sdpa")(_sdpa_case(is_causal=True))
case("bool-mask", "sdpa")(_sdpa_case(mask=_bool_mask))
case("float-mask", "sdpa")(_sdpa_case(lq=5, ls=6, mask=_float_mask))
case("float-mask-batched", "sdpa")(_sdpa_case(mask=_float_mask_batched))
case("float-mask-with-zeros", "sdpa")(_sdpa_case(mask=_float_mask_zeros))
case("scale", "sdpa")(_sdpa_case(scale=0.3, is_causal=True))
case("only-v", "sdpa")(_sdpa_case(explained=(False, False, True)))
case("only-q", "sdpa")(_sdpa_case(explained=(True, False, False), mask=_float_mask))
case("q-and-k", "sdpa")(_sdpa_case(explained=(True, True, False)))
case("gqa", "sdpa")(_sdpa_case(heads=4, kv_heads=2, is_causal=True))


# ---------------------------------------------------------------------------------------------
# small composites (Promises, aggregation at branch points)


@case("mlp-gelu", "epsilon")
def _mlp_gelu(g, ref):
    l1, l2 = init(nn.Linear(4, 6), g), init(nn.Linear(6, 3), g)
    x = leaf(g, 5, 4)
    h = l1(x)
    z = l2(F.gelu(h))
    r = randn(g, *z.shape)
    a = F.gelu(h).detach()
    w2, b2 = as_matrix(l2, a)
    w1, b1 = as_matrix(l1, x)
    r_h = ref(w2, b2, a, r)  # identity through gelu
    return Case(z, (x,), r, (ref(w1, b1, x.detach(), r_h),))


@case("residual", "z_rule")
def _residual(g, ref):
    lin = init(nn.Linear(4, 4), g)
    x = leaf(g, 3, 4)
    h = torch.relu(lin(x))
    z = x + h
    r = randn(g, *z.shape)
    r_skip, r_h = ref([x.detach(), h.detach()], r, [x.shape, h.shape])
    weight, bias = as_matrix(lin, x)
    r_branch = REFERENCES["epsilon"](weight, bias, x.detach(), r_h)
    return Case(z, (x,), r, (r_skip + r_branch,))


# ---------------------------------------------------------------------------------------------
# the tests


def _as_tuple(rel: Any) -> tuple:
    return tuple(rel) if isinstance(rel, (tuple, list)) else (rel,)


def assert_matches(actual: Tensor, expected: Tensor, rtol: float = RTOL) -> None:
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-10 * scale)


def run_case(c: Case) -> lrpplan.Attribution:
    inputs = c.inputs[0] if len(c.inputs) == 1 else list(c.inputs)
    return lrpplan.attribute(c.output, inputs, seed=c.seed, rules=c.rules, cache=False)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("build, reference", CASES)
def test_rule_matches_reference(build, reference, seed):
    g = torch.Generator().manual_seed(seed)
    c = build(g, reference)
    attr = run_case(c)
    relevance = _as_tuple(attr.relevance)
    assert len(relevance) == len(c.inputs)
    for i, (got, want, x) in enumerate(zip(relevance, c.expected, c.inputs)):
        want = torch.zeros_like(x) if want is None else want
        assert got is not None, f"input {i} got no relevance"
        assert got.shape == x.shape and got.dtype == DTYPE
        assert torch.isfinite(got).all(), f"input {i}: non-finite relevance"
        assert_matches(got, want)
    assert attr.ledger.closes(rtol=1e-9, atol=1e-9), attr.ledger
    if c.assumption is not None:
        assert any(c.assumption in a for a in attr.assumptions), attr.assumptions


def test_registry_is_covered():
    """Every reference in the registry is paired with at least one case."""
    used = {p.values[1] for p in CASES}
    assert set(REFERENCES.values()) - used == {REFERENCES["gradient_x_input"]}


# ---------------------------------------------------------------------------------------------
# LRP-0 identity: bias-free piecewise-linear networks, ε → 0: relevance = gradient × input


NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(),
                                  nn.Linear(8, 8, bias=False), nn.ReLU(),
                                  nn.Linear(8, 4, bias=False)), (3, 6)),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, bias=False), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4, 3, bias=False)), (2, 2, 8, 8)),
    "sequence-mlp": (lambda: nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU(),
                                           nn.Linear(7, 3, bias=False)), (2, 4, 5)),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_lrp0_equals_gradient_times_input(name, seed):
    g = torch.Generator().manual_seed(seed)
    factory, shape = NETWORKS[name]
    model = init(factory(), g)
    x = leaf(g, *shape)
    out = model(x)
    target = torch.zeros_like(out)
    target.view(-1, out.shape[-1])[:, 1] = 1.0  # one-hot per sample (and position)
    seed_rel = target * out.detach()
    attr = lrpplan.attribute(out, x, seed=seed_rel,
                             rules=lrpplan.RuleSet.preset("epsilon", epsilon=1e-12), cache=False)
    expected = REFERENCES["gradient_x_input"](model, x, target)
    assert_matches(attr.relevance, expected, rtol=1e-9)
    assert abs(attr.ledger.at_inputs - attr.ledger.start) <= 1e-9 * max(1.0, abs(attr.ledger.start))
    assert attr.ledger.closes(rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# embedding: token relevance = relevance at the embedding output summed over the hidden dim


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.proj(self.embed(ids))).mean(1))


@pytest.mark.parametrize("seed", SEEDS)
def test_embedding_token_relevance(seed):
    g = torch.Generator().manual_seed(seed)
    model = init(_TinyLM(), g)
    ids = torch.randint(0, 11, (3, 5), generator=g)
    attr = lrpplan.explain(model, ids, cache=False)
    assert attr.relevance.shape == ids.shape

    # the same graph, explained at the embedding output tensor
    captured = {}
    handle = model.embed.register_forward_hook(lambda m, i, o: captured.setdefault("e", o))
    try:
        logits = model(ids)
    finally:
        handle.remove()
    emb = captured["e"]
    target = logits.detach().argmax(-1)
    assert torch.equal(attr.target, target)
    score = logits.gather(-1, target[:, None])[:, 0]
    at_emb = lrpplan.attribute(score, emb, seed=score.detach(), cache=False).relevance
    assert_matches(attr.relevance, at_emb.sum(-1))

    # and independently: ε-rule through head, mean, proj (identity through tanh)
    eps_ref = REFERENCES["epsilon"]
    e = emb.detach()
    p = model.proj(e).detach()
    m = torch.tanh(p).mean(1)
    onehot = F.one_hot(target, 4).to(DTYPE)
    r_m = eps_ref(*as_matrix(model.head, m), m, onehot * logits.detach())
    r_t = REFERENCES["linear_map"](lambda t: t.mean(1), torch.tanh(p), r_m)
    r_e = eps_ref(*as_matrix(model.proj, e), e, r_t)
    assert_matches(attr.relevance, r_e.sum(-1))
    assert attr.ledger.closes(rtol=1e-9, atol=1e-9)
