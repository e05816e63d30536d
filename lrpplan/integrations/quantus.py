"""An ``explain_func`` for Quantus (https://github.com/understandable-machine-intelligence-lab/Quantus).

Quantus calls ``explain_func(model=model, inputs=x_batch, targets=y_batch, **explain_func_kwargs)``
with numpy arrays and expects a numpy array of attributions back. Pass this function to any
Quantus metric::

    import quantus
    from lrpplan.integrations.quantus import explain_func

    metric = quantus.PixelFlipping(features_in_step=1, perturb_baseline="black")
    scores = metric(model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=explain_func,
                    explain_func_kwargs={"rules": "epsilon-gamma-box", "rule_params":
                                         {"low": 0.0, "high": 1.0}}, device="cpu")

Explainers are kept in a module-level cache keyed by the model (``id`` checked through a weak
reference, so a new model that reuses a freed id is not confused with the old one) and the rules,
so the repeated calls a metric makes replay the compiled plan instead of tracing again.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import numpy as np

__all__ = ["explain_func", "clear_cache"]

# key -> (weak reference to the model, Explainer)
_EXPLAINERS: dict[tuple, tuple[Any, Any]] = {}


def clear_cache() -> None:
    """Forget every cached :class:`lrpplan.Explainer`."""
    _EXPLAINERS.clear()


def _rules_key(rules: Any, rule_params: Optional[dict]) -> tuple:
    params = tuple(sorted((rule_params or {}).items()))
    if rules is None or isinstance(rules, str):
        return ("name", rules, params)
    return ("object", id(rules), params)


def _explainer(model: Any, rules: Any, rule_params: Optional[dict], cache: Any) -> Any:
    import lrpplan

    key = (id(model), _rules_key(rules, rule_params), id(cache) if cache not in (None, False)
           else cache)
    hit = _EXPLAINERS.get(key)
    if hit is not None:
        ref, explainer = hit
        if ref() is model and (rules is None or isinstance(rules, str)
                               or explainer._rules_obj is rules):
            return explainer
    if isinstance(rules, str):
        ruleset = lrpplan.RuleSet.preset(rules, **(rule_params or {}))
    else:
        if rule_params:
            raise TypeError("rule_params only applies to a preset name given as rules=")
        ruleset = rules
    explainer = lrpplan.Explainer(model, rules=ruleset, cache=cache)
    explainer._rules_obj = rules  # the object the key's id refers to, kept alive with it
    try:
        ref = weakref.ref(model)
    except TypeError:  # pragma: no cover - nn.Modules are weak-referenceable
        ref = (lambda m: (lambda: m))(model)
    _EXPLAINERS[key] = (ref, explainer)
    return explainer


def explain_func(model: Any, inputs: Any, targets: Any = None, *, rules: Any = None,
                 rule_params: Optional[dict] = None, device: Any = None, cache: Any = None,
                 **kwargs: Any) -> np.ndarray:
    """lrpplan attributions in Quantus' ``explain_func`` convention.

    Parameters
    ----------
    model : torch.nn.Module
        The model Quantus evaluates (left in the mode Quantus put it in).
    inputs : numpy.ndarray or torch.Tensor
        The input batch ``[N, ...]``.
    targets : numpy.ndarray, int or None
        One class index per sample (or one for all); ``None`` explains the predicted class.
    rules : str, lrpplan.RuleSet or None
        A preset name (see :meth:`lrpplan.RuleSet.preset`) or a rule set; ``None`` for the
        defaults.
    rule_params : dict, optional
        Parameters of the preset named by ``rules`` (e.g. ``{"low": 0.0, "high": 1.0}``).
    device : str or torch.device, optional
        Where to compute; by default the device of the model's first parameter.
    cache :
        lrpplan's plan cache argument (``None`` = the user cache, ``False`` = none).
    **kwargs :
        Other keyword arguments Quantus passes along (ignored).

    Returns
    -------
    numpy.ndarray
        Float32 relevance of the same shape as ``inputs``.
    """
    import torch

    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else "cpu"
    x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs)
    if not x.is_floating_point():
        x = x.float()
    x = x.to(device)
    target: Any = None
    if targets is not None:
        t = np.asarray(targets.detach().cpu() if isinstance(targets, torch.Tensor) else targets)
        target = int(t) if t.ndim == 0 else torch.as_tensor(t.astype(np.int64)).to(device)
        if not isinstance(target, int) and target.numel() == 1 and len(x) != 1:
            target = int(target.item())
    explainer = _explainer(model, rules, rule_params, cache)
    attr = explainer(x, target=target)
    rel = attr.relevance
    return rel.detach().to("cpu", torch.float32).numpy().reshape(np.shape(inputs))
