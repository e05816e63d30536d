"""The long tail of operations (issue 15): pads, pixel shuffle, adaptive max-pool, cumsum,
nn.Bilinear, index writes, scatter / index_add / scatter_reduce, unfold / fold, EmbeddingBag,
and saved ints read back signed.

Each rule against an independent float64 reference (``tests/references.py``): routing by
autograd's VJP, LRP-0 against gradient × input where it must equal it, the ε-rule through a
linear map in matrix form, closed forms otherwise (the uniform rule of nn.Bilinear and of a
product, the routing of a max). Each op also runs inside a small model where a value must come
through a Promise (its forward replay): replay = trace, no ledger leak, plans replayed at other
batch sizes. Two zoo models: a graph network with scatter-based message passing and a
super-resolution CNN with pixel shuffle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpplan
from lrpplan import testing
from lrpplan.config import RuleSet
from lrpplan.graph import capture
from lrpplan.rules import RULES

try:  # tests/ as a package or as a plain directory on sys.path
    from .references import (as_matrix, rule_epsilon, rule_gradient_x_input, rule_route,
                             stabilize)
except ImportError:
    from references import (as_matrix, rule_epsilon, rule_gradient_x_input, rule_route,
                            stabilize)

DT = torch.float64
EPS = 1e-6  # the rules' default ε


def tiny_rules(eps: float = 1e-12) -> RuleSet:
    """ε = ``eps`` in every rule that has one (so LRP-0 on a linear network is gradient × input)."""
    return RuleSet("tiny", rule_params={name: {"epsilon": eps} for name, rule in RULES.items()
                                        if "epsilon" in rule.defaults})


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _node_types(y: torch.Tensor) -> set:
    seen, stack, out = set(), [y.grad_fn], set()
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        out.add(type(n).__name__)
        stack.extend(f for f, _ in n.next_functions)
    return out


def _close(got, want, rtol=1e-9):
    scale = max(float(want.abs().max()), 1e-30)
    err = float((got - want).abs().max())
    assert err <= rtol * scale, f"max abs error {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------------------------------
# routing ops: relevance routed like the gradient; LRP-0 equals gradient × input


IDX = torch.tensor([3, 0])


def _set_rows(x):
    y = x * 1.0
    y[IDX] = x[:2]
    return y


def _set_mask(x):
    y = x * 1.0
    y[torch.tensor([True, False, True, False, False])] = x[3:5].flip(0)
    return y


def _set_cols(x):
    y = x * 1.0
    y[:, torch.tensor([2, 0])] = x[:, 1:3]
    return y


ROUTING = {
    "pixel_shuffle": ((2, 8, 3, 3), lambda x: F.pixel_shuffle(x, 2), "PixelShuffleBackward0"),
    "pixel_unshuffle": ((2, 2, 4, 6), lambda x: F.pixel_unshuffle(x, 2),
                        "PixelUnshuffleBackward0"),
    "reflect1d": ((2, 3, 6), lambda x: F.pad(x, [2, 3], mode="reflect"),
                  "ReflectionPad1DBackward0"),
    "reflect2d": ((2, 2, 5, 4), lambda x: F.pad(x, [1, 2, 3, 1], mode="reflect"),
                  "ReflectionPad2DBackward0"),
    "reflect3d": ((1, 2, 3, 4, 3), lambda x: F.pad(x, [1, 2, 2, 1, 1, 1], mode="reflect"),
                  "ReflectionPad3DBackward0"),
    "replicate1d": ((2, 3, 6), lambda x: F.pad(x, [2, 3], mode="replicate"),
                    "ReplicationPad1DBackward0"),
    "replicate2d": ((2, 2, 5, 4), lambda x: F.pad(x, [1, 2, 3, 1], mode="replicate"),
                    "ReplicationPad2DBackward0"),
    "replicate3d": ((1, 2, 3, 4, 3), lambda x: F.pad(x, [1, 2, 2, 1, 1, 1], mode="replicate"),
                    "ReplicationPad3DBackward0"),
    "adaptive_max1d": ((2, 3, 7), lambda x: F.adaptive_max_pool1d(x, 3),
                       "AdaptiveMaxPool2DBackward0"),
    "adaptive_max2d": ((2, 3, 7, 5), lambda x: F.adaptive_max_pool2d(x, (3, 2)),
                       "AdaptiveMaxPool2DBackward0"),
    "adaptive_max3d": ((1, 2, 5, 4, 5), lambda x: F.adaptive_max_pool3d(x, 2),
                       "AdaptiveMaxPool3DBackward0"),
    "unfold": ((2, 2, 5, 4), lambda x: F.unfold(x, (2, 3), dilation=(1, 2), padding=1, stride=2),
               "Im2ColBackward0"),
    "setitem_rows": ((5, 4), _set_rows, "IndexPutBackward0"),
    "setitem_mask": ((5, 4), _set_mask, "IndexPutBackward0"),
    "setitem_cols": ((5, 4), _set_cols, "IndexPutBackward0"),
    "index_copy": ((5, 4), lambda x: x.index_copy(0, IDX, x[1:3]), "IndexCopyBackward0"),
    "index_fill_tensor": ((5, 4), lambda x: x.index_fill(1, IDX[:1], x[0, 0]),
                          "IndexFillBackward1"),
    "scatter": ((3, 4), lambda x: x.scatter(0, torch.tensor([[2, 0, 1, 2]]), x[1:2]),
                "ScatterBackward0"),
    "scatter_amax": ((4, 4), lambda x: x[:3].scatter_reduce(
        0, torch.tensor([[0, 1, 1, 2]]), x[3:], "amax"), "ScatterReduceBackward0"),
    "scatter_amin": ((4, 4), lambda x: x[:3].scatter_reduce(
        0, torch.tensor([[0, 2, 1, 2]]), x[3:], "amin", include_self=False),
        "ScatterReduceBackward0"),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(ROUTING))
def test_routing_ops_route_relevance_like_the_gradient(name, dtype):
    shape, fn, node_type = ROUTING[name]
    g = _gen(0)
    x = torch.randn(shape, dtype=DT, generator=g).to(dtype).requires_grad_(True)
    y = fn(x)
    assert node_type in _node_types(y)
    r = torch.randn(y.shape, dtype=DT, generator=g).to(dtype)
    got = lrpplan.attribute(y, x, seed=r, cache=False)
    want, = rule_route(fn, [x.detach().double()], [r.double()])
    _close(got.relevance.double(), want, 1e-12 if dtype == torch.float64 else 1e-5)
    assert got.ledger.leaks() == [] and got.ledger.closes()
    # LRP-0: relevance y ⊙ g at the output comes back as x ⊙ gradient
    gout = torch.randn(y.shape, dtype=DT, generator=g).to(dtype)
    lrp0 = lrpplan.attribute(y, x, seed=(y * gout).detach(), cache=False)
    want0 = rule_gradient_x_input(fn, x.detach().double(), gout.double())
    _close(lrp0.relevance.double(), want0, 1e-12 if dtype == torch.float64 else 1e-5)


def test_scatter_reduce_max_routes_to_the_winners_and_ties_share():
    """amax: each output element's relevance to the source elements equal to the maximum (a
    tie splits it evenly); the constant operand absorbs where it wins; closed form."""
    src = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, -1.0], [3.0, 0.5, -4.0]], dtype=DT,
                       requires_grad=True)
    index = torch.tensor([[0, 1, 1], [0, 1, 2], [0, 1, 2]])
    base = torch.tensor([[0.0, 9.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -9.0]], dtype=DT)
    y = base.scatter_reduce(0, index, src, "amax")
    r = torch.randn(y.shape, dtype=DT, generator=_gen(3))
    got = lrpplan.attribute(y, src, seed=r, cache=False)
    # closed form: out[j] = max(base[j], src[i] for index[i] = j); winners share R[j] evenly
    want = torch.zeros_like(src)
    wins = torch.zeros_like(y)
    for (i, c), j in zip(torch.cartesian_prod(torch.arange(3), torch.arange(3)).tolist(),
                         index.flatten().tolist()):
        wins[j, c] += float(src[i, c] == y[j, c])
    wins += (base == y).to(DT)
    for (i, c), j in zip(torch.cartesian_prod(torch.arange(3), torch.arange(3)).tolist(),
                         index.flatten().tolist()):
        if src[i, c] == y[j, c]:
            want[i, c] = r[j, c] / wins[j, c]
    torch.testing.assert_close(got.relevance, want, rtol=1e-12, atol=1e-14)
    assert want[0, 1] == want[1, 1] == want[2, 1] * 0 + r[1, 1] / 2  # the 5.0 tie
    absorbed = float(r.sum() - want.sum())
    assert abs(got.ledger.absorbed - absorbed) < 1e-12
    assert got.ledger.leaks() == [] and got.ledger.closes()


def test_written_constants_absorb_the_relevance_at_their_positions():
    g = _gen(1)
    x = torch.randn(5, 4, dtype=DT, generator=g).requires_grad_(True)
    cases = {
        "setitem_scalar": (lambda t: _put(t, 0.0), (IDX, slice(None))),
        "index_fill": (lambda t: t.index_fill(1, torch.tensor([1, 3]), 7.0),
                       (slice(None), torch.tensor([1, 3]))),
        "scatter_value": (lambda t: t.scatter(0, torch.tensor([[4, 0, 2, 1]]), 2.5),
                          (torch.tensor([4, 0, 2, 1]), torch.arange(4))),
    }
    types = {"setitem_scalar": "IndexPutBackward0", "index_fill": "IndexFillBackward0",
             "scatter_value": "ScatterBackward1"}
    for name, (fn, where) in cases.items():
        y = fn(x * 1.0)
        assert types[name] in _node_types(y), name
        r = torch.randn(y.shape, dtype=DT, generator=g)
        got = lrpplan.attribute(y, x, seed=r, cache=False)
        keep = torch.ones_like(r)
        keep[where] = 0.0
        torch.testing.assert_close(got.relevance, r * keep, rtol=0, atol=0)
        assert abs(got.ledger.absorbed - float((r * (1 - keep)).sum())) < 1e-12, name
        assert got.ledger.leaks() == [] and got.ledger.closes(), name


def _put(t, value):
    t[IDX] = value
    return t


def test_untracked_operand_0_absorbs_what_it_keeps():
    """``zeros.scatter(0, idx, src)``: the zeros keep the positions nothing is written to."""
    src = torch.randn(2, 4, dtype=DT, generator=_gen(2)).requires_grad_(True)
    index = torch.tensor([[0, 1, 2, 0]])
    y = torch.zeros(3, 4, dtype=DT).scatter(0, index, src[:1])
    r = torch.randn(3, 4, dtype=DT, generator=_gen(3))
    got = lrpplan.attribute(y, src, seed=r, cache=False)
    want = torch.zeros_like(src)
    want[0] = r.gather(0, index)[0]
    torch.testing.assert_close(got.relevance, want, rtol=0, atol=0)
    assert abs(got.ledger.absorbed - float(r.sum() - want.sum())) < 1e-12
    assert got.ledger.leaks() == []
    # unfold's zero padding is a constant too
    x = torch.randn(1, 1, 3, 3, dtype=DT, generator=_gen(4)).requires_grad_(True)
    u = F.unfold(x, 2, padding=1)
    ru = torch.rand(u.shape, dtype=DT, generator=_gen(5))
    got = lrpplan.attribute(u, x, seed=ru, cache=False)
    kept = F.unfold(torch.ones_like(x), 2, padding=1)
    assert abs(got.ledger.absorbed - float((ru * (1 - kept)).sum())) < 1e-12
    assert got.ledger.leaks() == [] and got.ledger.closes()


# ---------------------------------------------------------------------------------------------
# sums of inputs: the ε-rule through a linear map (matrix form), LRP-0 = gradient × input


def _flat(fn: Callable, shapes):
    """``fn`` of several operands as a function of one flat vector (for :func:`as_matrix`)."""
    sizes = [math.prod(s) for s in shapes]

    def flat_fn(v):
        parts = torch.split(v, sizes)
        return fn(*[p.reshape(s) for p, s in zip(parts, shapes)])
    return flat_fn


I5 = torch.tensor([0, 2, 2, 1, 2])
S54 = torch.tensor([[0, 2, 1, 1], [2, 2, 0, 1], [0, 0, 0, 2], [1, 2, 1, 0], [2, 1, 2, 2]])

LINEAR = {
    # name: (operand shapes, fn, explained operands, node type)
    "cumsum": ([(3, 6)], lambda x: x.cumsum(-1), (0,), "CumsumBackward0"),
    "fold": ([(2, 8, 25)], lambda x: F.fold(x, (4, 4), 2, padding=1, stride=1), (0,),
             "Col2ImBackward0"),
    "index_add": ([(3, 4), (5, 4)], lambda a, b: a.index_add(0, I5, b, alpha=0.5), (0, 1),
                  "IndexAddBackward0"),
    "scatter_add": ([(3, 4), (5, 4)], lambda a, b: a.scatter_add(0, S54, b), (0, 1),
                    "ScatterAddBackward0"),
    "scatter_sum": ([(3, 4), (5, 4)], lambda a, b: a.scatter_reduce(0, S54, b, "sum"), (0, 1),
                    "ScatterReduceBackward0"),
    "scatter_sum_no_self": ([(3, 4), (5, 4)],
                            lambda a, b: a.scatter_reduce(0, S54, b, "sum",
                                                          include_self=False), (1,),
                            "ScatterReduceBackward0"),
    "scatter_mean": ([(3, 4), (5, 4)], lambda a, b: a.scatter_reduce(0, S54, b, "mean"), (0, 1),
                     "ScatterReduceBackward0"),
    "scatter_mean_no_self": ([(3, 4), (5, 4)],
                             lambda a, b: a.scatter_reduce(0, S54, b, "mean",
                                                           include_self=False), (0, 1),
                             "ScatterReduceBackward0"),
    "index_put_accumulate": ([(3, 4), (4, 4)],
                             lambda a, b: a.index_put((torch.tensor([1, 1, 0, 2]),), b,
                                                      accumulate=True), (0, 1),
                             "IndexPutBackward0"),
}


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_linear_ops_follow_the_epsilon_rule_in_matrix_form(name):
    shapes, fn, explained, node_type = LINEAR[name]
    g = _gen(7)
    ops = [torch.randn(s, dtype=DT, generator=g) for s in shapes]
    leaves = [o.clone().requires_grad_(k in explained) for k, o in enumerate(ops)]
    y = fn(*leaves)
    assert node_type in _node_types(y)
    r = torch.randn(y.shape, dtype=DT, generator=g)
    got = lrpplan.attribute(y, [leaves[k] for k in explained], seed=r, cache=False)
    rels = got.relevance if isinstance(got.relevance, tuple) else (got.relevance,)
    # the matrix form over the explained operands; the others are a constant (a bias)
    fixed = {k: ops[k] for k in range(len(ops)) if k not in explained}

    def of_explained(*xs):
        it = iter(xs)
        return fn(*[fixed[k] if k in fixed else next(it) for k in range(len(ops))])

    flat = _flat(of_explained, [shapes[k] for k in explained])
    xv = torch.cat([ops[k].flatten() for k in explained])
    w, b = as_matrix(flat, xv)
    want = rule_epsilon(w, b, xv, r.flatten(), EPS)
    _close(torch.cat([t.flatten() for t in rels]), want, 1e-9)
    assert got.ledger.leaks() == [] and got.ledger.closes()
    # LRP-0 (ε → 0) with a zero constant: gradient × input
    zeroed = [o.clone().requires_grad_(k in explained) if k in explained else torch.zeros_like(o)
              for k, o in enumerate(ops)]
    y0 = fn(*zeroed)
    gout = torch.randn(y0.shape, dtype=DT, generator=g)
    lrp0 = lrpplan.attribute(y0, [zeroed[k] for k in explained], seed=(y0 * gout).detach(),
                             rules=tiny_rules(), cache=False)
    rels0 = lrp0.relevance if isinstance(lrp0.relevance, tuple) else (lrp0.relevance,)
    grads = torch.autograd.grad(y0, [zeroed[k] for k in explained], gout)
    want0 = torch.cat([(zeroed[k].detach() * gr).flatten() for k, gr in zip(explained, grads)])
    _close(torch.cat([t.flatten() for t in rels0]), want0, 1e-8)


def test_unsaved_constant_operand_is_taken_from_the_output_or_recorded():
    """``zeros(N, C).index_add(0, dst, messages)`` (graph networks): autograd keeps the zeros
    nowhere. When a consumer saved the output, the constant's share is exact; else it is 0 and
    the plan says so."""
    g = _gen(8)
    msg = torch.randn(5, 4, dtype=DT, generator=g).requires_grad_(True)
    base = torch.full((3, 4), 0.75, dtype=DT)
    w = torch.randn(4, 2, dtype=DT, generator=g).requires_grad_(True)  # mm saves agg
    agg = base.index_add(0, I5, msg)
    out = agg @ w  # MmBackward0 saves agg
    r = torch.randn(out.shape, dtype=DT, generator=g)
    got = lrpplan.attribute(out, msg, seed=r, cache=False)
    # reference: mm ε-rule, then the ε-rule of index_add with the constant as a bias
    wd = w.detach()
    r_agg = rule_epsilon(*as_matrix(lambda a: a @ wd, agg.detach()), agg.detach(), r, EPS)
    want = rule_epsilon(*as_matrix(lambda m: base.index_add(0, I5, m), msg.detach()),
                        msg.detach(), r_agg, EPS)
    _close(got.relevance, want, 1e-9)
    assert got.ledger.leaks() == [] and not got.assumptions
    # the output saved nowhere: the constant is taken as 0, recorded
    got = lrpplan.attribute(base.index_add(0, I5, msg), msg, seed=r_agg, cache=False)
    assert any("IndexAddBackward0" in a and "taken as 0" in a for a in got.assumptions)
    assert got.ledger.leaks() == []


# ---------------------------------------------------------------------------------------------
# products: nn.Bilinear (uniform split), scatter_reduce prod, embedding bags


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("explained", ["both", "left", "right"])
def test_bilinear_uniform_epsilon_rule_closed_form(seed, explained):
    g = _gen(seed)
    torch.manual_seed(seed)
    layer = nn.Bilinear(3, 4, 5, bias=True).to(DT)
    a = torch.randn(6, 3, dtype=DT, generator=g).requires_grad_(True)
    b = torch.randn(6, 4, dtype=DT, generator=g).requires_grad_(True)
    y = layer(a, b)
    assert "TrilinearBackward0" in _node_types(y)
    r = torch.randn(y.shape, dtype=DT, generator=g)
    targets = {"both": [a, b], "left": [a], "right": [b]}[explained]
    got = lrpplan.attribute(y, targets, seed=r, cache=False)
    rels = got.relevance if isinstance(got.relevance, tuple) else (got.relevance,)
    # closed form: z = a W b, bias by the z-rule of the add, then R_a = share · a ⊙ (W b s)
    W, bias = layer.weight.detach(), layer.bias.detach()
    ad, bd = a.detach(), b.detach()
    z = torch.einsum("ni,kij,nj->nk", ad, W, bd)
    r_z = z * r / stabilize(z + bias, EPS)
    s = r_z / stabilize(z, EPS)
    share = 0.5 if explained == "both" else 1.0
    want_a = share * ad * torch.einsum("kij,nj,nk->ni", W, bd, s)
    want_b = share * bd * torch.einsum("kij,ni,nk->nj", W, ad, s)
    want = {"both": [want_a, want_b], "left": [want_a], "right": [want_b]}[explained]
    for got_t, want_t in zip(rels, want):
        _close(got_t, want_t, 1e-10)
    assert got.ledger.leaks() == [] and got.ledger.closes()


def test_scatter_reduce_prod_uniform_rule_closed_form():
    g = _gen(4)
    base = torch.randn(3, 4, dtype=DT, generator=g).requires_grad_(True)
    src = torch.randn(5, 4, dtype=DT, generator=g).requires_grad_(True)
    index = S54.clone()
    index[:, 3] = 0  # nothing reduced into [1, 3] and [2, 3]
    for include_self in (True, False):
        y = base.scatter_reduce(0, index, src, "prod", include_self=include_self)
        r = torch.randn(y.shape, dtype=DT, generator=g)
        got = lrpplan.attribute(y, [base, src], seed=r, cache=False)
        count = torch.zeros(3, 4, dtype=DT).scatter_add(0, index, torch.ones(5, 4, dtype=DT))
        self_factor = torch.ones_like(count) if include_self else (count == 0).to(DT)
        per = r / (count + self_factor)
        torch.testing.assert_close(got.relevance[0], per * self_factor, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.relevance[1], per.gather(0, index), rtol=1e-12, atol=0)
        assert got.ledger.leaks() == [] and abs(got.ledger.absorbed) < 1e-12


BAGS = torch.tensor([1, 2, 4, 5, 4, 3, 7, 0])
OFFSETS = torch.tensor([0, 2, 2, 5])  # bag 1 is empty


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("variant", ["offsets", "last_offset", "padding_idx", "2d"])
def test_embedding_bag_weight_relevance(mode, variant):
    g = _gen(5)
    weight = torch.randn(9, 4, dtype=DT, generator=g).requires_grad_(True)
    kwargs: dict = {"mode": mode}
    if variant == "2d":
        ids, kwargs["offsets"] = BAGS.reshape(4, 2), None
    elif variant == "last_offset":
        ids, kwargs["offsets"], kwargs["include_last_offset"] = BAGS, torch.tensor([0, 2, 5, 8]), \
            True
    else:
        ids, kwargs["offsets"] = BAGS, OFFSETS
        if variant == "padding_idx":
            kwargs["padding_idx"] = 4

    def fn(w):
        return F.embedding_bag(ids, w, **kwargs)

    y = fn(weight)
    assert "EmbeddingBagBackward0" in _node_types(y)
    r = torch.randn(y.shape, dtype=DT, generator=g)
    got = lrpplan.attribute(y, weight, seed=r, cache=False)
    if mode == "max":
        want, = rule_route(fn, [weight.detach()], [r])
    else:
        want = rule_epsilon(*as_matrix(fn, weight.detach()), weight.detach(), r, EPS)
    _close(got.relevance, want, 1e-9)
    assert got.ledger.leaks() == [] and got.ledger.closes()
    if mode == "sum":  # LRP-0 = gradient × input
        gout = torch.randn(y.shape, dtype=DT, generator=g)
        lrp0 = lrpplan.attribute(y, weight, seed=(y * gout).detach(), rules=tiny_rules(),
                                 cache=False)
        _close(lrp0.relevance, rule_gradient_x_input(fn, weight.detach(), gout), 1e-8)


@pytest.mark.parametrize("explained", ["both", "per_sample_weights"])
def test_embedding_bag_per_sample_weights_uniform_closed_form(explained):
    g = _gen(6)
    weight = torch.randn(9, 4, dtype=DT, generator=g).requires_grad_(True)
    psw = torch.rand(8, dtype=DT, generator=g).add_(0.5).requires_grad_(True)
    y = F.embedding_bag(BAGS, weight, OFFSETS, mode="sum", per_sample_weights=psw)
    r = torch.randn(y.shape, dtype=DT, generator=g)
    targets = [weight, psw] if explained == "both" else [psw]
    got = lrpplan.attribute(y, targets, seed=r, cache=False)
    s = r / stabilize(y.detach(), EPS)
    bag = torch.tensor([0, 0, 2, 2, 2, 3, 3, 3])  # bag of each index (bag 1 empty)
    share = 0.5 if explained == "both" else 1.0
    w = weight.detach()
    want_psw = share * psw.detach() * (w[BAGS] * s[bag]).sum(-1)
    want_w = torch.zeros_like(w).index_add_(0, BAGS, psw.detach()[:, None] * s[bag]) * w * share
    rels = got.relevance if isinstance(got.relevance, tuple) else (got.relevance,)
    _close(rels[-1], want_psw, 1e-10)
    if explained == "both":
        _close(rels[0], want_w, 1e-10)
    assert got.ledger.leaks() == [] and got.ledger.closes()


# ---------------------------------------------------------------------------------------------
# signed saved ints: negative slice bounds (Falcon), shifts, dims and pads in forward replays


@dataclass(frozen=True)
class Case:
    """An op inside a small model where a value must come through its forward replay."""

    shape_a: tuple
    shape_b: Optional[tuple]
    fn: Callable[..., torch.Tensor]
    #: the node type whose forward replay the plan must contain; None: the op saves its
    #: output (scatter_reduce), so no replay is needed and none may be run
    replayed: Optional[str]
    linear: bool = True        # LRP-0 must equal gradient × input
    extra: Optional[Callable[[], nn.Module]] = None


def _dup_index(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([0, 2, 2, 1, 0])[:n].expand(like.shape[0], -1)


def _scatter_reduce(reduce, include_self=True):
    def fn(m, a, b):
        return a.scatter_reduce(1, _dup_index(5, a)[:, : b.shape[1]], b, reduce,
                                include_self=include_self)
    return fn


def _bag(m, a, b):
    ids = torch.tensor([0, 3, 1, 1, 2, 3])
    batch = a.shape[0]
    return F.embedding_bag(ids.repeat(batch), m.extra.weight, torch.arange(batch) * 6 + 0,
                           mode="sum", per_sample_weights=b.reshape(-1))


def _bag_of_rows(mode):
    def fn(m, a, b):
        rows = a.reshape(-1, 3)  # 4 rows per sample
        batch = a.shape[0]
        ids = (torch.arange(batch)[:, None] * 4 + torch.tensor([[0, 2, 3, 2, 1]])).reshape(-1)
        return F.embedding_bag(ids, rows, torch.arange(batch) * 5, mode=mode)
    return fn


def _setitem(m, a, b):
    y = a * 1.0
    y[:, torch.tensor([4, 1])] = b
    return y


def _index_put_acc(m, a, b):
    rows = torch.arange(a.shape[0])[:, None].expand(-1, 3)
    return a.index_put((rows, torch.tensor([1, 1, 3]).expand_as(rows)), b, accumulate=True)


PROMISE = {
    "slice_negative": Case((9,), None, lambda m, a, b: a[:, 1:-2], "SliceBackward0"),
    "slice_negative_start": Case((9,), None, lambda m, a, b: a[:, -5:-1], "SliceBackward0"),
    "roll_negative": Case((3, 4), None, lambda m, a, b: a.roll((-1, 2), (-1, -2)),
                          "RollBackward0"),
    "flip_negative": Case((3, 4), None, lambda m, a, b: a.flip(-1), "FlipBackward0"),
    "pad_negative": Case((3, 5), None, lambda m, a, b: F.pad(a, [-1, 2]),
                         "ConstantPadNdBackward0"),
    "reflect1d": Case((2, 5), None, lambda m, a, b: F.pad(a, [2, 1], mode="reflect"),
                      "ReflectionPad1DBackward0"),
    "reflect2d": Case((2, 3, 4), None, lambda m, a, b: F.pad(a, [1, 2, 2, 1], mode="reflect"),
                      "ReflectionPad2DBackward0"),
    "reflect3d": Case((1, 2, 3, 3), None,
                      lambda m, a, b: F.pad(a, [1, 1, 2, 1, 1, 0], mode="reflect"),
                      "ReflectionPad3DBackward0"),
    "replicate1d": Case((2, 5), None, lambda m, a, b: F.pad(a, [2, 1], mode="replicate"),
                        "ReplicationPad1DBackward0"),
    "replicate2d": Case((2, 3, 4), None,
                        lambda m, a, b: F.pad(a, [1, 2, 2, 1], mode="replicate"),
                        "ReplicationPad2DBackward0"),
    "replicate3d": Case((1, 2, 3, 3), None,
                        lambda m, a, b: F.pad(a, [1, 1, 2, 1, 1, 0], mode="replicate"),
                        "ReplicationPad3DBackward0"),
    "pixel_shuffle": Case((8, 2, 3), None, lambda m, a, b: F.pixel_shuffle(a, 2),
                          "PixelShuffleBackward0"),
    "pixel_unshuffle": Case((2, 4, 4), None, lambda m, a, b: F.pixel_unshuffle(a, 2),
                            "PixelUnshuffleBackward0"),
    "adaptive_max1d": Case((3, 7), None, lambda m, a, b: F.adaptive_max_pool1d(a, 3),
                           "AdaptiveMaxPool2DBackward0"),
    "adaptive_max2d": Case((2, 5, 4), None, lambda m, a, b: F.adaptive_max_pool2d(a, 2),
                           "AdaptiveMaxPool2DBackward0"),
    "adaptive_max3d": Case((2, 3, 4, 3), None, lambda m, a, b: F.adaptive_max_pool3d(a, 2),
                           "AdaptiveMaxPool3DBackward0"),
    "cumsum": Case((3, 5), None, lambda m, a, b: a.cumsum(-1), "CumsumBackward0"),
    "unfold": Case((2, 4, 4), None, lambda m, a, b: F.unfold(a, 2, padding=1, stride=2),
                   "Im2ColBackward0"),
    "fold": Case((8, 4), None, lambda m, a, b: F.fold(a, (4, 4), 2, stride=2),
                 "Col2ImBackward0"),
    "bilinear": Case((3,), (4,), lambda m, a, b: m.extra(a, b), "TrilinearBackward0",
                     linear=False, extra=lambda: nn.Bilinear(3, 4, 5)),
    "setitem": Case((6,), (2,), _setitem, "IndexPutBackward0"),
    "index_put_accumulate": Case((6,), (3,), _index_put_acc, "IndexPutBackward0"),
    "index_copy": Case((6,), (2,), lambda m, a, b: a.index_copy(1, torch.tensor([5, 0]), b),
                       "IndexCopyBackward0"),
    "index_fill_tensor": Case((6,), (1,), lambda m, a, b: a.index_fill(
        1, torch.tensor([2, 4]), b.sum() * 0.25), "IndexFillBackward1"),
    "scatter": Case((6,), (3,), lambda m, a, b: a.scatter(
        1, torch.tensor([[4, 0, 2]]).expand(a.shape[0], -1), b), "ScatterBackward0"),
    "index_add": Case((4,), (5,), lambda m, a, b: a.index_add(
        1, torch.tensor([0, 2, 2, 1, 3]), b, alpha=2.0), "IndexAddBackward0"),
    "scatter_add": Case((4,), (5,), lambda m, a, b: a.scatter_add(1, _dup_index(5, a), b),
                        "ScatterAddBackward0"),
    "scatter_sum": Case((4,), (5,), _scatter_reduce("sum"), None),
    "scatter_mean": Case((4,), (5,), _scatter_reduce("mean", False), None),
    "scatter_amax": Case((4,), (5,), _scatter_reduce("amax"), None),
    "scatter_amin": Case((4,), (5,), _scatter_reduce("amin", False), None),
    "scatter_prod": Case((4,), (5,), _scatter_reduce("prod"), None,
                         linear=False),
    "embedding_bag_psw": Case((1,), (6,), _bag, "EmbeddingBagBackward0",
                              extra=lambda: nn.EmbeddingBag(4, 3)),
    "embedding_bag_mean": Case((12,), None, _bag_of_rows("mean"), "EmbeddingBagBackward0"),
    "embedding_bag_max": Case((12,), None, _bag_of_rows("max"), "EmbeddingBagBackward0"),
}


class OpNet(nn.Module):
    """``head(y + y / 2)`` with ``y = op(A x, B x)``: the addition needs ``y``'s value, which
    no node saved, so a Promise replays the op's forward."""

    def __init__(self, case: Case, n_in: int = 6, n_cls: int = 3) -> None:
        super().__init__()
        self.case = case
        self.la = nn.Linear(n_in, math.prod(case.shape_a), bias=False)
        self.lb = nn.Linear(n_in, math.prod(case.shape_b), bias=False) if case.shape_b else None
        self.extra = case.extra() if case.extra else None
        with torch.no_grad():
            width = self.body(torch.zeros(2, n_in)).shape[1]
        self.head = nn.Linear(width, n_cls, bias=False)

    def body(self, x):
        a = self.la(x).reshape(x.shape[0], *self.case.shape_a)
        b = self.lb(x).reshape(x.shape[0], *self.case.shape_b) if self.lb is not None else None
        y = self.case.fn(self, a, b).reshape(x.shape[0], -1)
        return y + y / 2

    def forward(self, x):
        return self.head(self.body(x))


def _fwd_replayed(plan, graph) -> set:
    out = set()

    def walk(steps):
        for s in steps:
            for op in s.chain:
                if op.kind == "fwd":
                    out.add(graph.types[op.node])
            walk(s.body)
    walk(plan.steps)
    return out


@pytest.mark.parametrize("name", sorted(PROMISE))
def test_op_forward_replay_inside_a_model(name):
    case = PROMISE[name]
    torch.manual_seed(0)
    model = OpNet(case).to(DT).eval()
    x = torch.randn(3, 6, dtype=DT, generator=_gen(9)).requires_grad_(True)
    out = model(x)
    graph = capture([(out.grad_fn, 0)])
    got = lrpplan.attribute(out, x, rules=tiny_rules(), cache=False)
    if case.replayed is None:
        assert "ScatterReduceBackward0" in set(graph.types)
        assert "ScatterReduceBackward0" not in _fwd_replayed(got.plan, graph)
    else:
        assert case.replayed in _fwd_replayed(got.plan, graph), got.plan.format()
    assert got.ledger.leaks() == [] and got.ledger.closes()
    assert torch.isfinite(got.relevance).all()
    if case.linear:  # LRP-0 on a bias-free network of linear and routing ops
        want = rule_gradient_x_input(model, x.detach(), torch.ones_like(out))
        _close(got.relevance, want, 1e-7)
    testing.assert_replay_matches_trace(model, x.detach())
    rows = testing.assert_shape_invariance(
        model, lambda batch: torch.randn(batch, 6, dtype=DT, generator=_gen(batch)),
        [1, 2, 4], first=[1], modes=("memory",), require_replay=True)
    assert any(row.cached for row in rows)


def test_falcon_style_negative_slice_end_is_replayed_signed():
    """A forward replay of ``h[..., :-2]`` read ``_saved_end`` = 2**64 − 2 as an unsigned int."""
    x = torch.randn(2, 9, dtype=DT, requires_grad=True)
    h = x.exp()
    y = h[:, 1:-2]
    assert y.grad_fn._saved_end == (1 << 64) - 2
    out = (y + y.exp()).sum(-1)  # the add needs y, saved nowhere: the slice is replayed
    graph = capture([(out.grad_fn, 0)])
    got = lrpplan.attribute(out, x, rules=tiny_rules(), cache=False)
    assert "SliceBackward0" in _fwd_replayed(got.plan, graph)
    assert got.ledger.leaks() == [] and got.ledger.closes()
    # reference: the z-rule of the add with y = exp(x)[:, 1:-2], then identity through exp
    yd, ed, od = y.detach(), y.detach().exp(), out.detach()
    r_s = (yd + ed) * (od / stabilize(od, 1e-12))[:, None]  # through the sum
    r_y = yd * r_s / stabilize(yd + ed, 1e-12)
    r_e = ed * r_s / stabilize(yd + ed, 1e-12)
    want = torch.zeros_like(x)
    want[:, 1:-2] = r_y + r_e
    _close(got.relevance, want, 1e-10)


# ---------------------------------------------------------------------------------------------
# zoo: a graph network with scatter-based message passing, a super-resolution CNN


class MessagePassing(nn.Module):
    """Two message-passing layers (MPNN / GraphSAGE style): messages ``W [h_src, h_dst]``
    aggregated onto the destination nodes with ``index_add`` (sum) and ``scatter_add`` (mean by
    in-degree), the update ``W [h, agg]``, then a ``scatter_reduce`` amax read-out per graph.
    The aggregations start from zeros autograd does not keep (taken as 0, recorded)."""

    def __init__(self, dim: int = 6, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, hidden)
        self.msg1 = nn.Linear(2 * hidden, hidden)
        self.upd1 = nn.Linear(2 * hidden, hidden)
        self.msg2 = nn.Linear(2 * hidden, hidden)
        self.upd2 = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, classes)
        # two graphs of 5 nodes each: a ring and a star, edges in both directions
        ring = [(i, (i + 1) % 5) for i in range(5)]
        star = [(5, 5 + i) for i in range(1, 5)]
        edges = ring + star
        edges = edges + [(d, s) for s, d in edges]
        self.register_buffer("src", torch.tensor([s for s, _ in edges]))
        self.register_buffer("dst", torch.tensor([d for _, d in edges]))
        self.register_buffer("graph", torch.tensor([0] * 5 + [1] * 5))

    def forward(self, x):  # x: [B, 10, dim], B batches of the same two graphs
        b, n, _ = x.shape
        h = torch.relu(self.embed(x))
        m = torch.relu(self.msg1(torch.cat([h[:, self.src], h[:, self.dst]], -1)))
        agg = h.new_zeros(b, n, m.shape[-1]).index_add(1, self.dst, m)
        h = torch.relu(self.upd1(torch.cat([h, agg], -1)))
        deg = torch.zeros(n, dtype=h.dtype).index_add(
            0, self.dst, torch.ones(self.dst.shape, dtype=h.dtype))
        m = self.msg2(torch.cat([h[:, self.src], h[:, self.dst]], -1)) / deg[self.dst, None]
        idx = self.dst.view(1, -1, 1).expand_as(m)
        agg = torch.zeros_like(h).scatter_add(1, idx, m)
        h = torch.relu(self.upd2(torch.cat([h, agg], -1)))
        gidx = self.graph.view(1, -1, 1).expand_as(h)
        pooled = torch.zeros(b, 2, h.shape[-1], dtype=h.dtype).scatter_reduce(
            1, gidx, h, "amax", include_self=False)
        return self.out(pooled.sum(1))


class SuperResolution(nn.Module):
    """ESPCN-style: reflection-padded convolutions, a sub-pixel convolution and PixelShuffle,
    then a PixelUnshuffle + convolution classifier head on the upscaled image."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(2), nn.Conv2d(1, 8, 5), nn.Tanh(),
            nn.ReplicationPad2d(1), nn.Conv2d(8, 8, 3), nn.Tanh(),
            nn.ReflectionPad2d(1), nn.Conv2d(8, factor * factor, 3), nn.PixelShuffle(factor))
        self.head = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x):
        return self.head(self.body(x))


ZOO = {
    "message_passing": (MessagePassing, lambda batch: torch.randn(batch, 10, 6,
                                                                  generator=_gen(batch)),
                        {"IndexAddBackward0", "ScatterAddBackward0", "ScatterReduceBackward0"}),
    "super_resolution": (SuperResolution,
                         lambda batch, size=6: torch.randn(batch, 1, size, size,
                                                           generator=_gen(batch)),
                         {"PixelShuffleBackward0", "PixelUnshuffleBackward0",
                          "ReflectionPad2DBackward0", "ReplicationPad2DBackward0",
                          "AdaptiveMaxPool2DBackward0"}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model(name, dtype):
    factory, make, types = ZOO[name]
    torch.manual_seed(0)
    model = factory().to(dtype).eval()
    x = make(2).to(dtype)
    assert types <= _node_types(model(x.requires_grad_(True)))
    report = lrpplan.coverage(model, x.detach())
    assert report.covered_nodes == report.nodes and not report.error  # every node: a real rule
    attr = testing.assert_replay_matches_trace(model, x.detach())
    assert torch.isfinite(attr.relevance).all() and attr.relevance.abs().sum() > 0
    assert attr.ledger.leaks() == [] and attr.ledger.closes()
    if name == "message_passing":  # the zeros the aggregations start from: 0, and recorded
        assert sorted(a.split(":")[0].split()[-1] for a in attr.assumptions) == \
            ["IndexAddBackward0", "ScatterAddBackward0"]
    sizes: list = [1, 3]
    if name == "super_resolution":
        sizes = [(1, 6), (3, 6), (2, 9)]
    testing.assert_shape_invariance(model, lambda *s: make(*s).to(dtype), sizes, first=[0],
                                    modes=("memory",))


def test_zoo_message_passing_conserves_without_biases():
    """Bias-free, ε → 0: the input gets the relevance the output started with (the amax
    read-out and the ReLUs route, the aggregations follow the ε-rule)."""
    torch.manual_seed(1)
    model = MessagePassing().to(DT).eval()
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.bias = None
    x = torch.randn(2, 10, 6, dtype=DT, generator=_gen(0))
    attr = lrpplan.explain(model, x, rules=tiny_rules(1e-12), cache=False)
    assert attr.ledger.leaks() == []
    start = float(attr.ledger.start)
    assert abs(float(attr.relevance.sum()) - start) <= 1e-6 * abs(start)


@pytest.mark.parametrize("keepdim", [True, False])
def test_max_along_a_dim_forward_replay_equals_gradient_times_input(keepdim):
    """``h - h.max(-1).values`` feeding a softmax-free linear head: the subtraction's z-rule
    needs the max, which autograd saves nowhere; it is replayed from the saved indices.
    LRP-0 through the linear chain equals gradient × input with the max as a routing."""
    torch.manual_seed(3)
    w1 = torch.randn(4, 6, dtype=torch.float64)
    w2 = torch.randn(6, 2, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    h = x @ w1
    m = h.max(-1, keepdim=keepdim).values
    out = (h - (m if keepdim else m.unsqueeze(-1))) @ w2
    attr = lrpplan.attribute(out[:, 0], x, cache=False,
                             rules=lrpplan.RuleSet.preset("epsilon", epsilon=1e-12))
    assert any(op.kind == "fwd" for s in attr.plan.steps for op in s.chain)
    (g,) = torch.autograd.grad(out[:, 0].sum(), x)
    torch.testing.assert_close(attr.relevance, (x * g).detach(), rtol=1e-8, atol=1e-12)
    assert attr.ledger.closes() and attr.ledger.leaks() == []


def test_index_add_into_untracked_zeros_replays_with_the_accumulator_as_zero():
    """``torch.zeros(...).index_add_(...)`` (a GNN's aggregation, an MoE's per-expert loop):
    the zeros are saved nowhere; a forward replay takes them as 0 (recorded), and LRP-0 through
    the residual ``h + agg`` equals gradient × input."""
    torch.manual_seed(4)
    w = torch.randn(3, 3, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([0, 2, 2, 4, 1])
    h = x @ w
    agg = torch.zeros(5, 3, dtype=torch.float64).index_add_(0, idx, h * 2)
    out = (h + agg) @ w
    attr = lrpplan.attribute(out[:, 1], x, cache=False,
                             rules=lrpplan.RuleSet.preset("epsilon", epsilon=1e-12))
    assert any("taken as 0" in a for a in attr.assumptions)
    (g,) = torch.autograd.grad(out[:, 1].sum(), x)
    torch.testing.assert_close(attr.relevance, (x * g).detach(), rtol=1e-8, atol=1e-12)
    assert attr.ledger.closes() and attr.ledger.leaks() == []
