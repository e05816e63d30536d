"""Every op's pure gradient (``OpSpec.vjp``) equals autograd's own backward of the live node.

A plan step never calls the live autograd node: routing rules and the ε-rule of linear maps send
relevance through the op's gradient written as a function of the step's data (static
attributes, attributes read by value ops, shapes). The reference here is independent of that
code: the autograd node itself, called with the same random relevance, in float64. The catalogue
below builds at least one node of every node type whose spec has a pure gradient (the test at the
end checks that it does).
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from lrpplan.graph import capture
from lrpplan.rules import OPS
from lrpplan.testing import rule_inputs

DT = torch.float64


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size=shape, dtype=DT, generator=g).requires_grad_(True)


def _idx(*values) -> torch.Tensor:
    return torch.tensor(values)


#: name -> a function building an output whose graph holds the node types it is named after
CATALOGUE: dict[str, Callable[[], torch.Tensor]] = {
    "view": lambda: _x(2, 3, 4).view(6, 4),
    "reshape_unsafe": lambda: (_x(2, 3, 4) @ _x(4, 5)).reshape(6, 5),
    "squeeze": lambda: (_x(2, 1, 4) * 1).squeeze(1),
    "squeeze_all": lambda: (_x(2, 1, 4) * 1).squeeze(),
    "squeeze_dims": lambda: (_x(2, 1, 1, 4) * 1).squeeze((1, 2)),
    "unsqueeze": lambda: _x(2, 3).unsqueeze(-1),
    "alias_clone": lambda: torch.ops.aten.alias(_x(3, 2)).clone(),
    "dropout_eval": lambda: torch.ops.aten.native_dropout(_x(3, 4), 0.5, True)[0],
    "to_copy": lambda: _x(3, 2).float(),
    "t": lambda: _x(3, 2).t(),
    "transpose": lambda: _x(2, 3, 4).transpose(0, -1),
    "transpose_": lambda: (_x(2, 3, 4) * 1).transpose_(0, 2),
    "permute": lambda: _x(2, 3, 4).permute(2, 0, 1),
    "expand": lambda: _x(2, 1, 4).expand(2, 3, 4),
    "select": lambda: _x(2, 3, 4).select(1, -1),
    "slice": lambda: _x(2, 7, 4)[:, 1:-2:2],
    "diagonal": lambda: _x(2, 4, 4).diagonal(1, -2, -1),
    "unfold": lambda: _x(2, 9).unfold(1, 3, 2),
    "cat": lambda: torch.cat([_x(2, 3), torch.ones(2, 2, dtype=DT), _x(2, 1, seed=1)], 1),
    "stack": lambda: torch.stack([_x(2, 3), _x(2, 3, seed=1)], -1),
    "split": lambda: sum(t.sum() for t in _x(2, 7).split(3, 1)[:2]),
    "split_sizes": lambda: sum(t.sum() for t in _x(2, 7).split([2, 5], 1)),
    "unbind": lambda: _x(3, 2).unbind(0)[1],
    "unsafe_split": lambda: torch.unsafe_split(_x(2, 7) * 1, 3, 1)[0],
    "unsafe_split_sizes": lambda: torch.unsafe_split_with_sizes(_x(2, 7) * 1, [2, 5], 1)[1],
    "repeat": lambda: _x(2, 3).repeat(2, 1, 3),
    "flip": lambda: _x(2, 3, 4).flip(0, 2),
    "roll": lambda: _x(2, 5).roll((2, -1), (1, 0)),
    "as_strided": lambda: (_x(4, 3) * 1).as_strided((3, 3), (2, 1), 1),
    "as_strided_": lambda: (_x(4, 3) * 1).as_strided_((3, 3), (2, 1), 1),
    "pad": lambda: F.pad(_x(2, 3, 4), (1, 2, 0, 1)),
    "index": lambda: _x(5, 3)[_idx(4, 0, 4)],
    "index_2d": lambda: _x(4, 5, 3)[:, _idx(1, 1, 3)],
    "index_select": lambda: _x(4, 5).index_select(1, _idx(0, 4, 4)),
    "gather": lambda: _x(3, 4).gather(1, _idx(0, 3, 3, 1, 0, 2).view(3, 2)),
    "where": lambda: torch.where(_x(3, 4, seed=2) > 0, _x(3, 4), _x(1, 4, seed=1)),
    "masked_fill": lambda: _x(3, 4).masked_fill(_x(3, 4, seed=2) > 0, -2.0),
    "max_pool1d": lambda: F.max_pool1d(_x(2, 3, 9), 3, 2, 1, return_indices=True)[0],
    "max_pool2d": lambda: F.max_pool2d(_x(2, 3, 7, 6), 3, 2, 1),
    "max_pool3d": lambda: F.max_pool3d(_x(1, 2, 5, 5, 4), 2),
    "max_dim": lambda: _x(3, 5).max(1)[0],
    "min_dim_keep": lambda: _x(3, 5).min(0, keepdim=True)[0],
    "kthvalue": lambda: _x(3, 5).kthvalue(2, 1)[0],
    "median": lambda: _x(3, 5).median(1, keepdim=True)[0],
    "topk": lambda: _x(3, 5).topk(2, 1)[0],
    "sort": lambda: _x(3, 5).sort(0)[0],
    "max_all": lambda: torch.tensor([[1.0, 3.0], [3.0, 0.0]], dtype=DT, requires_grad=True).max(),
    "min_all": lambda: _x(3, 5).min(),
    "amax": lambda: torch.tensor([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]], dtype=DT,
                                 requires_grad=True).amax(1),
    "amin": lambda: _x(3, 5).amin((0, 1), keepdim=True),
    "nearest1d": lambda: F.interpolate(_x(2, 3, 4), scale_factor=2),
    "nearest2d": lambda: F.interpolate(_x(2, 3, 4, 5), size=(7, 9)),
    "nearest3d": lambda: F.interpolate(_x(1, 2, 2, 3, 2), scale_factor=2),
    "nearest_scaled": lambda: F.interpolate(_x(2, 3, 4, 5), scale_factor=1.7),
    "nearest_exact1d": lambda: F.interpolate(_x(2, 3, 4), scale_factor=1.5, mode="nearest-exact"),
    "nearest_exact3d": lambda: F.interpolate(_x(1, 2, 2, 3, 2), scale_factor=1.5,
                                             mode="nearest-exact"),
    "nearest_exact": lambda: F.interpolate(_x(2, 3, 4, 5), size=(7, 9), mode="nearest-exact"),
    "weight_norm": lambda: torch._weight_norm(_x(4, 3), _x(4, 1, seed=1), 0),
    "embedding": lambda: F.embedding(_idx(0, 3, 3, 1), _x(5, 3)),
    "embedding_pad": lambda: F.embedding(_idx(0, 3, 3, 1), _x(5, 3), padding_idx=3),
    "sum": lambda: _x(2, 3).sum(),
    "sum_dim": lambda: _x(2, 3, 4).sum((0, 2)),
    "mean": lambda: _x(2, 3).mean(),
    "mean_dim": lambda: _x(2, 3, 4).mean(-1, keepdim=True),
    "adaptive_avg1d": lambda: F.adaptive_avg_pool1d(_x(2, 3, 7), 3),
    "adaptive_avg2d": lambda: F.adaptive_avg_pool2d(_x(2, 3, 7, 5), (3, 2)),
    "adaptive_avg3d": lambda: F.adaptive_avg_pool3d(_x(1, 2, 5, 4, 3), 2),
    "avg_pool2d": lambda: F.avg_pool2d(_x(2, 3, 7, 6), 3, 2, 1, count_include_pad=False),
    "avg_pool3d": lambda: F.avg_pool3d(_x(1, 2, 5, 4, 4), 2, ceil_mode=True),
    "bilinear": lambda: F.interpolate(_x(2, 3, 4, 5), scale_factor=1.5, mode="bilinear"),
    "linear1d": lambda: F.interpolate(_x(2, 3, 4), size=7, mode="linear", align_corners=True),
    "trilinear": lambda: F.interpolate(_x(1, 2, 2, 3, 2), scale_factor=2, mode="trilinear"),
    "bicubic": lambda: F.interpolate(_x(1, 2, 4, 5), size=(6, 7), mode="bicubic"),
    "bilinear_aa": lambda: F.interpolate(_x(1, 2, 8, 6), size=(3, 4), mode="bilinear",
                                         antialias=True),
    "bicubic_aa": lambda: F.interpolate(_x(1, 2, 8, 6), size=(3, 4), mode="bicubic",
                                        antialias=True),
    "reflection_pads": lambda: (F.pad(_x(2, 5), (2, 1), mode="reflect").sum()
                                + F.pad(_x(1, 2, 4, 5), (1, 2, 2, 1), mode="reflect").sum()
                                + F.pad(_x(1, 1, 3, 4, 4), (1,) * 6, mode="reflect").sum()),
    "replication_pads": lambda: (F.pad(_x(2, 5), (2, 1), mode="replicate").sum()
                                 + F.pad(_x(1, 2, 4, 5), (1, 2, 2, 1), mode="replicate").sum()
                                 + F.pad(_x(1, 1, 3, 4, 4), (1,) * 6, mode="replicate").sum()),
    "pixel_shuffle": lambda: F.pixel_shuffle(_x(1, 8, 2, 3), 2),
    "pixel_unshuffle": lambda: F.pixel_unshuffle(_x(1, 2, 4, 6), 2),
    "adaptive_max2d": lambda: F.adaptive_max_pool2d(_x(2, 3, 7, 5), (3, 2)),
    "adaptive_max3d": lambda: F.adaptive_max_pool3d(_x(1, 2, 5, 4, 3), 2),
    "cumsum": lambda: _x(3, 4).cumsum(-1),
    "im2col": lambda: F.unfold(_x(2, 3, 5, 6), 3, padding=1, stride=2),
    "col2im": lambda: F.fold(_x(2, 12, 6), (4, 5), 2, stride=(2, 2), padding=(0, 1)),
    "trilinear_op": lambda: F.bilinear(_x(3, 4), _x(3, 5, seed=1), _x(2, 4, 5, seed=2)),
    "index_put": lambda: torch.index_put(_x(5, 3), (_idx(0, 4),), _x(2, 3, seed=1)),
    "index_put_acc": lambda: torch.index_put(_x(5, 3), (_idx(0, 0, 4),), _x(3, seed=1),
                                             accumulate=True),
    "index_copy": lambda: _x(5, 3).index_copy(0, _idx(4, 1), _x(2, 3, seed=1)),
    "index_fill": lambda: _x(5, 3).index_fill(1, _idx(0, 2), -1.0),
    "index_fill_tensor": lambda: _x(5, 3).index_fill(1, _idx(0, 2), _x(seed=1).reshape(())),
    "scatter": lambda: _x(3, 4).scatter(1, _idx(0, 3, 1, 1, 2, 0).view(3, 2),
                                        _x(3, 2, seed=1)),
    "scatter_value": lambda: _x(3, 4).scatter(1, _idx(0, 3, 1, 1, 2, 0).view(3, 2), 5.0),
    "index_add": lambda: _x(4, 3).index_add(0, _idx(1, 1, 3), _x(3, 3, seed=1), alpha=2.0),
    "scatter_add": lambda: _x(3, 4).scatter_add(1, _idx(0, 3, 3, 1, 2, 2).view(3, 2),
                                                _x(3, 2, seed=1)),
    "scatter_reduce_amax": lambda: _x(3, 4).scatter_reduce(
        1, _idx(0, 3, 3, 1, 2, 2).view(3, 2), _x(3, 2, seed=1), "amax"),
    "scatter_reduce_mean": lambda: _x(3, 4).scatter_reduce(
        1, _idx(0, 3, 3, 1, 2, 2).view(3, 2), _x(3, 2, seed=1), "mean", include_self=False),
    "embedding_bag_sum": lambda: F.embedding_bag(_idx(0, 3, 3, 1, 4), _x(5, 3), _idx(0, 2),
                                                 mode="sum", per_sample_weights=_x(5, seed=1)),
    "embedding_bag_max": lambda: F.embedding_bag(_idx(0, 3, 3, 1, 4), _x(5, 3), _idx(0, 2),
                                                 mode="max"),
    "embedding_bag_mean": lambda: F.embedding_bag(_idx(0, 3, 2, 1, 4, 4).view(2, 3), _x(5, 3),
                                                  mode="mean", padding_idx=4),
    "pack_padded": lambda: torch.nn.utils.rnn.pack_padded_sequence(
        _x(3, 6, 2), _idx(5, 3, 2), batch_first=True).data,
    "pack_padded_time_major": lambda: torch.nn.utils.rnn.pack_padded_sequence(
        _x(6, 3, 2), _idx(4, 4, 1)).data,
}


def _nodes(build: Callable[[], torch.Tensor]) -> list:
    with torch.enable_grad():
        out = build()
    graph = capture([(out.grad_fn, 0)])
    return [n for n, t in zip(graph.nodes, graph.types) if t in OPS and OPS[t].vjp is not None]


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_pure_gradient_equals_the_nodes_own(name):
    nodes = _nodes(CATALOGUE[name])
    assert nodes, f"{name} builds no node with a pure gradient"
    gen = torch.Generator().manual_seed(1)
    for node in nodes:
        spec = OPS[type(node).__name__]
        rel = [torch.randn(size=tuple(m.shape), dtype=DT, generator=gen)
               if m.dtype.is_floating_point else None for m in node._input_metadata]
        want = node(*rel)
        want = want if isinstance(want, tuple) else (want,)
        x, _ = rule_inputs(node, spec.rule)
        got = list(spec.vjp(rel, x))
        for pos, w in enumerate(want):
            if w is None:  # an input autograd does not track: nothing to compare
                continue
            g = got[pos]
            assert g is not None, f"{type(node).__name__}: no gradient for input {pos}"
            torch.testing.assert_close(g.to(DT), w.to(DT), rtol=1e-12, atol=1e-12,
                                       msg=f"{type(node).__name__} input {pos}")


def test_the_catalogue_covers_every_pure_gradient():
    seen = {type(n).__name__ for build in CATALOGUE.values() for n in _nodes(build)}
    pure = {name for name, spec in OPS.items() if spec.vjp is not None}
    # node types the CPU build never creates from Python, each with a reason
    not_built = {
        "MaxPool1DWithIndicesBackward0": "max_pool1d runs as the 2-D kernel on CPU",
        "AdaptiveAvgPool1DBackward0": "adaptive_avg_pool1d runs as the 2-D op",
        "_ReshapeAliasBackward0": "reshape of a non-contiguous view: a copy on CPU",
        "ReshapeAliasBackward0": "reshape of a non-contiguous view: a copy on CPU",
        "SqueezeBackward0": "squeeze() of a batched tensor is SqueezeBackward2 on this torch",
        "LiftFreshBackward0": "lift_fresh is a tracing artefact; eager graphs hold none",
    }
    missing = pure - seen - set(not_built)
    assert not missing, f"no catalogue entry builds {sorted(missing)}"
