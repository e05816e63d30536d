"""lrpplan as an Inseq attribution method: ``inseq.load_model(model, "lrpplan", ...)``.

Importing this module registers the method with Inseq (Inseq finds its methods by subclass, so
one import is all it takes; nothing of Inseq is patched)::

    import inseq
    import lrpplan.integrations.inseq  # registers "lrpplan"

    model = inseq.load_model(hf_model, "lrpplan", tokenizer=tokenizer, rules="attnlrp")
    out = model.attribute("The cat sat on", generation_args={"max_new_tokens": 5})
    out.show()

What it does at each generation step: Inseq's forward (model → the step's attributed function)
is explained by :class:`lrpplan.integrations.captum.LRP` from the input embeddings, and the
relevance is summed over the embedding dimension: one signed value per token, in the units of
the attributed score (so the step's values sum to its score, less what biases and stabilisers
absorb). Inseq receives them as coarse (per-token) attributions and does not re-aggregate them.

* ``rules`` (a preset name or :class:`lrpplan.RuleSet`) and ``cache`` are passed through
  ``inseq.load_model``; the default is the ``"attnlrp"`` preset.
* The attributed function defaults to ``"logit"`` for this method (LRP explains the logit, as
  LxT and AttnLRP do), not Inseq's ``"probability"``; pass ``attributed_fn=`` to choose another.
* Assumptions recorded in the plan (e.g. a module treated as constant) are listed in the
  output's ``info["lrpplan_assumptions"]`` and raised once as an :class:`lrpplan.LRPWarning`.
* ``return_convergence_delta=True`` (an ``attribution_args`` entry) adds the step score
  ``deltas`` (score − Σ relevance).

Every step traces or replays a plan: Inseq explains one step at a time, each with a longer
prefix. For one replay over all steps use
:func:`lrpplan.integrations.transformers.explain_generation`, which gives the same numbers.

Importing this module needs ``inseq`` (``pip install lrpplan[inseq]``).
"""
from __future__ import annotations

import warnings
from typing import Any

from ..errors import LRPWarning
from .captum import LRP

try:
    from inseq.attr.feat.gradient_attribution import GradientAttributionRegistry
    from inseq.data import CoarseFeatureAttributionStepOutput
except ImportError as exc:  # pragma: no cover - exercised only without inseq
    raise ImportError("lrpplan.integrations.inseq needs the inseq package: "
                      "pip install lrpplan[inseq]") from exc

__all__ = ["LRPPlanAttribution", "METHOD_NAME"]

METHOD_NAME = "lrpplan"
DEFAULT_RULES = "attnlrp"
DEFAULT_ATTRIBUTED_FN = "logit"
_INSEQ_DEFAULT_ATTRIBUTED_FN = "probability"


class LRPPlanAttribution(GradientAttributionRegistry):
    """Inseq attribution method ``"lrpplan"``: operation-level LRP through compiled plans.

    Keyword arguments of ``inseq.load_model``: ``rules`` (preset name or RuleSet, default
    ``"attnlrp"``) and ``cache`` (as for :func:`lrpplan.explain`).
    """

    method_name = METHOD_NAME

    def __init__(self, attribution_model: Any, rules: Any = DEFAULT_RULES, cache: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(attribution_model)
        self.method = LRP(self.attribution_model, rules=rules, cache=cache)
        self.rules = self.method.rules
        self._assumptions: dict[str, None] = {}
        # LRP explains logits; Inseq's own default would be the softmax probability. The model's
        # private default is the only per-instance knob Inseq offers (its property has no setter).
        if getattr(attribution_model, "_default_attributed_fn_id", None) == \
                _INSEQ_DEFAULT_ATTRIBUTED_FN:
            attribution_model._default_attributed_fn_id = DEFAULT_ATTRIBUTED_FN

    def attribute_step(self, attribute_fn_main_args: dict[str, Any],
                       attribution_args: dict[str, Any] = {}) -> Any:  # noqa: B006 - Inseq's
        """One generation step: relevance per token of the source and/or the target prefix."""
        result = self.method.attribute(**attribute_fn_main_args, **attribution_args)
        deltas = None
        if attribution_args.get("return_convergence_delta", False):
            result, deltas = result
        for text in self.method.last.assumptions:
            if text not in self._assumptions:
                self._assumptions[text] = None
                warnings.warn(f"lrpplan (Inseq method): {text}", LRPWarning, stacklevel=2)
        per_token = tuple(r.sum(-1) if r.dim() > 2 else r
                          for r in (result if isinstance(result, tuple) else (result,)))
        if self.attribution_model.is_encoder_decoder:
            source, target = per_token[0], (per_token[1] if len(per_token) > 1 else None)
        else:
            source, target = None, per_token[0]
        return CoarseFeatureAttributionStepOutput(
            source_attributions=source, target_attributions=target,
            step_scores={"deltas": deltas} if deltas is not None else {})

    def attribute(self, *args: Any, **kwargs: Any) -> Any:
        """Inseq's attribution loop, with the rules and the plan's assumptions in ``info``."""
        out = super().attribute(*args, **kwargs)
        out.info["lrpplan_rules"] = self.rules.name
        out.info["lrpplan_assumptions"] = list(self._assumptions)
        return out

