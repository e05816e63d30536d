"""Rule presets: which parameters each op family gets, by node type (used by
:class:`lrpplan.config.RuleSet`). The presets name Zennit's composites where they follow them:
EpsilonPlus, EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat."""
from __future__ import annotations

from typing import Any

CONV = "ConvolutionBackward0"
DENSE = ("AddmmBackward0", "MmBackward0", "BmmBackward0", "MvBackward0", "BaddbmmBackward0")
LINEAR = (CONV,) + DENSE


def _first(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t: dict(params) for t in LINEAR}


#: preset -> (rule_params, type_params, first_params)
PRESETS: dict[str, tuple[dict, dict, dict]] = {
    "epsilon": ({}, {}, {}),
    "epsilon-plus": ({}, {CONV: {"variant": "zplus"}}, {}),
    "epsilon-alpha2-beta1": ({}, {CONV: {"variant": "alphabeta", "alpha": 2.0, "beta": 1.0}}, {}),
    "epsilon-gamma": ({}, {CONV: {"variant": "gamma", "gamma": 0.25}}, {}),
    "epsilon-gamma-box": ({}, {CONV: {"variant": "gamma", "gamma": 0.25}},
                          _first({"variant": "zbox"})),
    "epsilon-plus-flat": ({}, {CONV: {"variant": "zplus"}}, _first({"variant": "flat"})),
    "zplus": ({"linear": {"variant": "zplus"}}, {}, {}),
    # AttnLRP (Achtibat et al. 2024): ε on linear layers, uniform rule on bilinear products,
    # softmax rule, identity through normalisers: lrpplan's defaults, named explicitly
    "attnlrp": ({"linear": {"attention": "attnlrp"}, "sdpa": {"attention": "attnlrp"}}, {}, {}),
    # CP-LRP (Ali et al. 2022): attention weights treated as constants; relevance flows
    # through the value path only
    "cp-lrp": ({"linear": {"attention": "cp"}, "sdpa": {"attention": "cp"}}, {}, {}),
}
