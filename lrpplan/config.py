"""Rule sets: which rule (and parameters) each autograd node type gets.

A :class:`RuleSet` starts from the registry's default rule per node type and layers, in order:
per-rule parameters, per-node-type parameters (e.g. z⁺ for convolutions only) and per-node-type
rule overrides (declared fallbacks for unknown nodes). Its :meth:`RuleSet.config` is plain data
and part of the plan fingerprint.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

from .rules import OPS, RULES

_CONV = "ConvolutionBackward0"

#: preset name -> (per-rule params, per-node-type params)
PRESETS: dict[str, tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]] = {
    "epsilon": ({}, {}),
    "epsilon-plus": ({}, {_CONV: {"variant": "zplus"}}),
    "epsilon-alpha2-beta1": ({}, {_CONV: {"variant": "alphabeta", "alpha": 2.0, "beta": 1.0}}),
    "epsilon-gamma": ({}, {_CONV: {"variant": "gamma", "gamma": 0.25}}),
    "zplus": ({"linear": {"variant": "zplus"}}, {}),
}

#: user-facing parameter names (Zennit's) -> the rules that read them
_PARAM_RULES = {
    "epsilon": ("linear", "linear_map", "add", "centred_norm", "affine_norm", "sdpa"),
    "gamma": ("linear",), "alpha": ("linear",), "beta": ("linear",),
    "low": ("linear",), "high": ("linear",),
}


class RuleSet:
    """Rule choice per node type, with parameters.

    Examples
    --------
    >>> rs = RuleSet.preset("epsilon-plus", epsilon=1e-9)
    >>> rs.resolve("ConvolutionBackward0")[1]["variant"]
    'zplus'
    """

    def __init__(self, name: str = "custom",
                 rule_params: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 type_params: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 overrides: Optional[Mapping[str, str]] = None) -> None:
        self.name = name
        self.rule_params = {k: dict(v) for k, v in (rule_params or {}).items()}
        self.type_params = {k: dict(v) for k, v in (type_params or {}).items()}
        self.overrides = dict(overrides or {})
        for rule in self.overrides.values():
            if rule not in RULES:
                raise ValueError(f"unknown rule {rule!r}; known: {sorted(RULES)}")

    @classmethod
    def preset(cls, name: str, **params: Any) -> "RuleSet":
        """A named preset; keyword parameters use Zennit's names (``epsilon``, ``gamma``...)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        rule_params, type_params = copy.deepcopy(PRESETS[name])
        for key, value in params.items():
            if key not in _PARAM_RULES:
                raise TypeError(f"unknown rule parameter {key!r}; known: {sorted(_PARAM_RULES)}")
            for rule in _PARAM_RULES[key]:
                rule_params.setdefault(rule, {})[key] = value
            for tp in type_params.values():  # user parameters win over the preset's
                tp[key] = value
        return cls(name, rule_params, type_params)

    @classmethod
    def ensure(cls, rules: Any) -> "RuleSet":
        """Coerce the user-facing ``rules=`` argument (None, a preset name or a RuleSet)."""
        if rules is None:
            return cls.preset("epsilon")
        if isinstance(rules, str):
            return cls.preset(rules)
        if isinstance(rules, RuleSet):
            return rules
        raise TypeError(f"rules must be None, a preset name or a RuleSet, got {rules!r}")

    def override(self, node_type: str, rule: str) -> "RuleSet":
        """A copy that applies ``rule`` to every node of ``node_type`` (a declared fallback)."""
        overrides = dict(self.overrides)
        overrides[node_type] = rule
        return RuleSet(self.name, self.rule_params, self.type_params, overrides)

    def resolve(self, node_type: str) -> tuple[Optional[str], dict[str, Any]]:
        """(rule name, parameters) for a node type; ``(None, {})`` when there is no rule."""
        rule = self.overrides.get(node_type)
        if rule is None:
            spec = OPS.get(node_type)
            if spec is None:
                return None, {}
            rule = spec.rule
        params = dict(RULES[rule].defaults)
        params.update(self.rule_params.get(rule, {}))
        params.update(self.type_params.get(node_type, {}))
        return rule, params

    def config(self) -> dict[str, Any]:
        """Plain-data description (goes into the fingerprint and the plan header)."""
        return {"name": self.name, "rule_params": self.rule_params,
                "type_params": self.type_params, "overrides": self.overrides}

    def __repr__(self) -> str:
        return f"RuleSet({self.config()!r})"
