"""Rule sets: which rule (and parameters) each autograd node gets.

A :class:`RuleSet` starts from the registry's default rule per node type and layers, in order:

1. per-rule parameters (``rule_params``: e.g. ε for every rule that stabilises);
2. per-node-type parameters (``type_params``: e.g. z⁺ for convolutions only);
3. first-layer parameters (``first_params``: for linear/convolution nodes whose explained operand
   comes straight from an explained input, Zennit's "first layer");
4. per-module parameters (``modules``: glob patterns over module paths such as ``"features.0"``
   or ``"layer4.*"``, like Zennit's name map, applied to every operation the module runs; the
   last matching pattern wins; only :func:`lrpplan.explain` and :class:`lrpplan.Explainer`
   know the modules);
5. per-node-type rule overrides (``overrides``: declared fallbacks for unknown nodes);
6. per-class rules for custom ``torch.autograd.Function`` nodes (``functions``: qualified class
   name -> rule, from ``override(FunctionClass, rule)``).

Its :meth:`RuleSet.config` is plain data and part of the plan fingerprint.
"""
from __future__ import annotations

import copy
import fnmatch
from typing import Any, Mapping, Optional, Sequence

from .rules import OPS, RULES
from .rules.presets import PRESETS


def _rules_reading(param: str) -> tuple[str, ...]:
    """The registered rules that declare ``param`` among their defaults."""
    return tuple(sorted(name for name, rule in RULES.items() if param in rule.defaults))


#: user-facing parameter names (Zennit's) -> the rules that read them
_PARAM_RULES = {
    "epsilon": _rules_reading("epsilon"),
    "gates": _rules_reading("gates"),  # "signal" (Arras et al.'s signal-take-all) or "uniform"
    "gamma": ("linear",), "alpha": ("linear",), "beta": ("linear",),
    "low": ("linear",), "high": ("linear",),
}
_REQUIRED = {"epsilon-gamma-box": ("low", "high")}


#: parameters that take one of a few names instead of a number
_CHOICES = {"gates": ("signal", "uniform")}


def _plain_number(key: str, value: Any) -> Any:
    """A float, or (for the z-box bounds) a list of per-channel floats, or one of the names a
    choice parameter takes; anything else is an error."""
    if key in _CHOICES:
        if value not in _CHOICES[key]:
            raise TypeError(f"rule parameter {key}={value!r} must be one of {_CHOICES[key]}")
        return value
    if hasattr(value, "tolist"):  # tensors / arrays of per-channel bounds
        value = value.tolist()
    if isinstance(value, (list, tuple)) and key in ("low", "high") and value and \
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"rule parameter {key}={value!r} must be a number"
                    + (" or a list of per-channel numbers" if key in ("low", "high") else ""))


class RuleSet:
    """Rule choice per node, with parameters.

    Examples
    --------
    >>> rs = RuleSet.preset("epsilon-plus", epsilon=1e-9)
    >>> rs.resolve("ConvolutionBackward0")[1]["variant"]
    'zplus'
    """

    def __init__(self, name: str = "custom",
                 rule_params: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 type_params: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 overrides: Optional[Mapping[str, str]] = None,
                 first_params: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 modules: Optional[Sequence[tuple[str, Mapping[str, Any]]]] = None,
                 functions: Optional[Mapping[str, str]] = None) -> None:
        self.name = name
        #: qualified ``torch.autograd.Function`` class name -> rule (per-class overrides)
        self.functions = dict(functions or {})
        self.modules = [(str(p), dict(v)) for p, v in (modules or [])]
        self.rule_params = {k: dict(v) for k, v in (rule_params or {}).items()}
        self.type_params = {k: dict(v) for k, v in (type_params or {}).items()}
        self.first_params = {k: dict(v) for k, v in (first_params or {}).items()}
        self.overrides = dict(overrides or {})
        for rule in list(self.overrides.values()) + list(self.functions.values()):
            if rule not in RULES:
                raise ValueError(f"unknown rule {rule!r}; known: {sorted(RULES)}")

    @classmethod
    def preset(cls, name: str, **params: Any) -> "RuleSet":
        """A named preset; keyword parameters use Zennit's names (``epsilon``, ``gamma``,
        ``alpha``, ``beta``, ``low``, ``high``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        missing = [p for p in _REQUIRED.get(name, ()) if p not in params]
        if missing:
            raise TypeError(f"preset {name!r} needs {', '.join(missing)} (the input domain bounds "
                            "of the z-box rule, e.g. low=-3.0, high=3.0 for standardised images)")
        rule_params, type_params, first_params = copy.deepcopy(PRESETS[name])
        for key, value in params.items():
            if key not in _PARAM_RULES:
                raise TypeError(f"unknown rule parameter {key!r}; known: {sorted(_PARAM_RULES)}")
            value = _plain_number(key, value)
            for rule in _PARAM_RULES[key]:
                rule_params.setdefault(rule, {})[key] = value
            for tp in list(type_params.values()) + list(first_params.values()):
                tp[key] = value  # user parameters win over the preset's
        return cls(name, rule_params, type_params, first_params=first_params)

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

    def override(self, node_type: Any, rule: str) -> "RuleSet":
        """A copy that applies ``rule`` to every node of ``node_type`` (a declared fallback).

        ``node_type`` is an autograd node type name (``"MyOpBackward"``), or a
        ``torch.autograd.Function`` subclass: then ``rule`` applies to the nodes of that class
        only (a class is known by its qualified name ``module.QualName``, so two Functions with
        the same ``__name__`` do not share it, and the rule configuration stays plain data).
        A per-class override wins over one by node type name.
        """
        if isinstance(node_type, str):
            overrides = dict(self.overrides)
            overrides[node_type] = rule
            return RuleSet(self.name, self.rule_params, self.type_params, overrides,
                           self.first_params, self.modules, self.functions)
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; known: {sorted(RULES)}")
        from .rules.custom import key_function
        functions = dict(self.functions)
        functions[key_function(node_type, rule)] = rule
        return RuleSet(self.name, self.rule_params, self.type_params, self.overrides,
                       self.first_params, self.modules, functions)

    def module(self, pattern: str, **params: Any) -> "RuleSet":
        """A copy whose operations inside modules matching ``pattern`` use ``params``.

        ``pattern`` is a glob over module paths (``model.named_modules()`` names); parameters
        use Zennit's names plus ``variant`` (``"epsilon"``, ``"zplus"``, ``"gamma"``,
        ``"alphabeta"``, ``"flat"``, ``"wsquare"``, ``"zbox"``) for linear and convolution ops.
        """
        clean = {}
        for key, value in params.items():
            if key == "variant":
                from .rules.linear import VARIANTS
                if value not in VARIANTS:
                    raise ValueError(f"unknown variant {value!r}; known: {sorted(VARIANTS)}")
                clean[key] = value
            elif key in _PARAM_RULES:
                clean[key] = _plain_number(key, value)
            else:
                raise TypeError(f"unknown rule parameter {key!r}")
        return RuleSet(self.name, self.rule_params, self.type_params, self.overrides,
                       self.first_params, self.modules + [(pattern, clean)], self.functions)

    def module_params(self, path: Optional[str]) -> Optional[dict[str, Any]]:
        """Merged parameters of the patterns matching a module path (None: no pattern matches)."""
        if path is None or not self.modules:
            return None
        out: Optional[dict[str, Any]] = None
        for pattern, params in self.modules:
            if fnmatch.fnmatchcase(path, pattern):
                out = {**(out or {}), **params}
        return out

    def resolve(self, node_type: str, first_layer: bool = False, module: Optional[str] = None,
                function: Optional[str] = None) -> tuple[Optional[str], dict[str, Any]]:
        """(rule name, parameters) for a node; ``(None, {})`` when there is no rule.

        ``function``: the qualified class name of a custom ``torch.autograd.Function`` node
        (:func:`lrpplan.rules.custom.function_key`). Its rule is, in order, this rule set's
        override for the class, its override for the node type name, the class's registered
        rule (:func:`lrpplan.register_function`); never the rule of another class whose nodes
        share the type name.
        """
        if function is not None:
            rule = self.functions.get(function) or self.overrides.get(node_type)
            if rule is None:
                from .rules.custom import FUNCTIONS
                entry = FUNCTIONS.get(function)
                if entry is None:
                    return None, {}
                rule = entry.spec.rule
        else:
            rule = self.overrides.get(node_type)
        if rule is None:
            spec = OPS.get(node_type)
            if spec is None:
                return None, {}
            rule = spec.rule
        params = dict(RULES[rule].defaults)
        params.update(self.rule_params.get(rule, {}))
        params.update(self.type_params.get(node_type, {}))
        if first_layer:
            params.update(self.first_params.get(node_type, {}))
        mod = self.module_params(module)
        if mod:
            params.update({k: v for k, v in mod.items() if k in params})
        return rule, params

    def config(self) -> dict[str, Any]:
        """Plain-data description (goes into the fingerprint and the plan header)."""
        return {"name": self.name, "rule_params": self.rule_params,
                "type_params": self.type_params, "first_params": self.first_params,
                "modules": [[p, v] for p, v in self.modules], "overrides": self.overrides,
                **({"functions": self.functions} if self.functions else {})}

    def __repr__(self) -> str:
        return f"RuleSet({self.config()!r})"
