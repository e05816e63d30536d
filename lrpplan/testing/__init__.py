"""Property-based testing of LRP conservation with `hypothesis <https://hypothesis.works>`_.

LRP promises conservation: the relevance that enters at the explained output is redistributed to
the inputs, not created or lost, except where a rule absorbs it on purpose (a bias, a stabiliser,
a constant operand) — and lrpplan's ledger books every absorbed share. This module makes that
promise testable, for lrpplan's own rules and for any user model:

- a small description language for architectures (:class:`Architecture`, one frozen dataclass
  per :class:`Block` kind) whose ``repr`` is valid Python, so a failing example shrinks to a small
  model that prints, and pastes, as code; :func:`build` turns it into an ``nn.Module``;
- hypothesis strategies: :func:`architectures` (random but valid-by-construction models),
  :func:`inputs_for` and :func:`targets_for` (inputs and targets of a given model);
- checks usable with or without hypothesis: :func:`assert_conserves`,
  :func:`assert_replay_matches_trace`, :func:`assert_shape_invariance` (a plan compiled at
  some sizes and replayed at others, in memory and from disk, equals a fresh trace),
  :func:`conservation_report`;
- settings profiles: :func:`register_profiles` (``"ci"``: derandomised, a few dozen examples;
  ``"long"``: hundreds) and :func:`profile` (the one named by ``HYPOTHESIS_PROFILE``);
- :func:`rule_inputs`: what a plan step gives a rule on one live node, to call a rule by hand.

``import lrpplan`` does not import this module (nor hypothesis); import it explicitly.

Examples
--------
>>> import torch
>>> from hypothesis import given
>>> from lrpplan import testing
>>> model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
>>> @testing.profile("ci")
... @given(inputs=testing.inputs_for(model.eval(), shapes=[(6,)]))
... def test_conserves(inputs):
...     testing.assert_conserves(model, *inputs)
>>> test_conserves()
"""
from __future__ import annotations

from .architecture import (
    Architecture, GeneratedModel, build, example_inputs, resized,
)
from .blocks import (
    ACTIVATIONS, Act, Attention, AvgPool, BatchNorm, Block, Conv2d, Embed, Excite, Expand,
    FAMILIES, GatedMLP, Gather, GroupNorm, Index, IndexSelect, InputSpec, LayerNorm, Linear,
    MaxPool,
    Permute, Pool, RMSNorm, Repeat, Reshape, Residual, Shared, Slice, SplitCat, Stack,
    Transpose, ZERO_PRESERVING,
)
from .checks import (
    ConservationReport, ReportRow, assert_conserves, assert_replay_matches_trace,
    conservation_report,
)
from .invariance import (
    ShapeReplay, assert_shape_invariance,
)
from .profiles import (
    profile, register_profiles,
)
from .rules import rule_inputs
from .strategies import (
    architectures, dtypes, inputs_for, targets_for,
)

__all__ = [
    # architecture description
    "Architecture", "InputSpec", "Block", "Linear", "Conv2d", "Act", "LayerNorm", "RMSNorm",
    "BatchNorm", "GroupNorm", "GatedMLP", "Attention", "Residual", "Shared", "Embed",
    "Reshape", "Transpose", "Permute", "SplitCat", "Stack", "Slice", "IndexSelect", "Index",
    "Gather", "Expand", "Repeat", "MaxPool", "AvgPool", "Pool", "Excite", "GeneratedModel",
    "build", "example_inputs", "resized",
    # strategies
    "FAMILIES", "ACTIVATIONS", "ZERO_PRESERVING", "architectures", "dtypes", "inputs_for",
    "targets_for",
    # checks
    "ReportRow", "ConservationReport", "assert_conserves", "assert_replay_matches_trace",
    "conservation_report", "ShapeReplay", "assert_shape_invariance",
    # settings
    "register_profiles", "profile",
    # one rule on one node
    "rule_inputs",
]
