"""A drop-in for ``captum.attr.LRP`` backed by an :class:`lrpplan.Explainer`.

A Captum user switches by changing one import::

    # from captum.attr import LRP
    from lrpplan.integrations.captum import LRP

    lrp = LRP(model)
    attributions, delta = lrp.attribute(inputs, target=3, return_convergence_delta=True)

What stays the same: the constructor's first argument, every argument of ``attribute``
(``inputs`` as a tensor or a tuple of tensors, ``target`` as an int, a tuple, a per-sample list
or tensor, or ``None`` for a model with one score per sample, ``additional_forward_args``
passed positionally after the inputs and not attributed, ``return_convergence_delta``), the
structure of the result, ``has_convergence_delta()`` and ``compute_convergence_delta``
(``output − Σ attributions`` per sample, Captum's sign). The attributions are relevance in the
units of the output score, like Captum's.

What changes:

* rules: Captum reads a ``rule`` attribute on each module (``EpsilonRule`` with ε = 1e-9 by
  default); here the rules come from an lrpplan preset, ``LRP(model, rules="epsilon-plus")`` or
  ``rules=RuleSet.preset("epsilon", epsilon=1e-9)`` (the default is lrpplan's ``"epsilon"``
  preset, ε = 1e-6). ``module.rule`` attributes are ignored.
* coverage: Captum's LRP accepts only a fixed list of module types (Conv2d, Linear, pooling,
  BatchNorm2d, ReLU, Tanh, Dropout) each used once, and raises ``TypeError`` on anything else
  (``nn.Flatten``, ``nn.Softmax``, ``nn.LayerNorm``, ``nn.GELU``, ...); functional operations
  in ``forward`` (``x + f(x)``, ``torch.softmax``, ``q @ k.T``) are invisible to it. lrpplan
  works on the autograd graph, so residual networks, attention and transformers are explained
  with a rule per operation, and the ledger (``lrp.last.ledger``) accounts for every unit of
  relevance.
* ``verbose=True`` prints the compiled plan instead of the per-layer rules.

An extension Captum does not have: several targets per sample in one call. ``target`` as a
``[B, K]`` integer tensor, or a list of B lists of K entries (each an int, or a tuple indexing
a sample's output as Captum's per-sample tuples do), explains the K selected scores of each
sample separately, all in one replay: the attributions then have shape ``[B, K, *input]`` (one
map per target) and the convergence delta ``[B, K]``. Captum itself rejects these forms, so
no Captum call changes meaning::

    attributions = lrp.attribute(x, target=torch.tensor([[0, 3], [1, 2]]))  # [2, 2, *x.shape[1:]]

Importing this module does not need Captum.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ..api import Attribution, CacheArg, Explainer
from ..config import RuleSet
from ..errors import InvalidInputError

__all__ = ["LRP", "CaptumTargetError"]

TensorOrTuple = Union[torch.Tensor, tuple]

_MODEL = "model"  # the name of the wrapped model inside the forward wrapper


class CaptumTargetError(InvalidInputError, AssertionError):
    """A ``target`` Captum would reject; an ``AssertionError`` like Captum's, and an
    :class:`lrpplan.InvalidInputError`."""


def _select_targets(output: torch.Tensor, target: Any) -> torch.Tensor:
    """Captum's ``_select_targets`` (same selection, same rejections)."""
    if target is None:
        return output
    n = output.shape[0]
    if isinstance(target, (int, tuple)):
        return _select_column(output, target)
    if isinstance(target, torch.Tensor):
        if target.numel() == 1 and isinstance(target.item(), int):
            return _select_column(output, int(target.item()))
        if target.dim() == 1 and target.numel() == n:
            if output.dim() != 2:
                raise CaptumTargetError("Output must be 2D to select tensor of targets.")
            return output.gather(1, target.to(output.device).reshape(n, 1)).squeeze(-1)
        raise CaptumTargetError(f"Tensor target dimension {tuple(target.shape)} is not valid. "
                                f"{tuple(output.shape)}")
    if isinstance(target, list):
        if len(target) != n:
            raise CaptumTargetError("Target list length does not match output!")
        if isinstance(target[0], int):
            if output.dim() != 2:
                raise CaptumTargetError("Output must be 2D to select tensor of targets.")
            idx = torch.tensor(target, device=output.device).reshape(n, 1)
            return output.gather(1, idx).squeeze(-1)
        if isinstance(target[0], tuple):
            return torch.stack([output[(i,) + t] for i, t in enumerate(target)])
        raise CaptumTargetError(f"Target element type {type(target[0])} in list is not valid.")
    raise CaptumTargetError(f"Target type {type(target)} is not valid.")


def _select_column(output: torch.Tensor, target: Any) -> torch.Tensor:
    target = (target,) if isinstance(target, int) else target
    if len(target) > output.dim() - 1:
        raise CaptumTargetError(f"Cannot choose target column with output shape "
                                f"{tuple(output.shape)}.")
    return output[(slice(None), *target)]


def _is_multi_target(target: Any) -> bool:
    """``target`` names K scores per sample: a 2-D tensor or a list of lists (the extension)."""
    if isinstance(target, torch.Tensor):
        return target.dim() == 2
    return isinstance(target, list) and len(target) > 0 and isinstance(target[0], list)


def _multi_scores(output: torch.Tensor, target: Any) -> torch.Tensor:
    """``[B, K]`` scores: for each sample the K entries ``target`` names."""
    n = output.shape[0]
    if isinstance(target, torch.Tensor):
        if target.shape[0] != n or target.shape[1] == 0:
            raise CaptumTargetError(f"a [B, K] target needs B = {n} rows and K > 0, "
                                    f"got {tuple(target.shape)}")
        if target.is_floating_point() or target.dtype == torch.bool:
            raise CaptumTargetError(f"targets must be integer class indices, got {target.dtype}")
        if output.dim() != 2:
            raise CaptumTargetError("Output must be 2D to select a [B, K] tensor of targets; "
                                    "pass a list of lists of index tuples")
        return output.gather(1, target.to(output.device, torch.long))
    if len(target) != n:
        raise CaptumTargetError("Target list length does not match output!")
    widths = {len(row) for row in target}
    if len(widths) != 1 or 0 in widths:
        raise CaptumTargetError(f"every sample needs the same number K > 0 of targets, "
                                f"got row lengths {sorted(widths)}")
    rows = []
    for i, row in enumerate(target):
        scores = []
        for t in row:
            index = (t,) if isinstance(t, int) and not isinstance(t, bool) else t
            if not isinstance(index, tuple) or not all(isinstance(j, int) for j in index):
                raise CaptumTargetError(f"Target element {t!r} in list is not valid: pass ints "
                                        "or tuples of ints")
            if len(index) != output.dim() - 1:
                raise CaptumTargetError(f"target {t!r} does not pick one value of an output of "
                                        f"shape {tuple(output.shape)}")
            scores.append(output[(i,) + index])
        rows.append(torch.stack(scores))
    return torch.stack(rows)


def _scores(output: torch.Tensor, target: Any) -> torch.Tensor:
    """One score per sample, as Captum differentiates it (the selection must leave one value
    per sample; Captum then back-propagates from every sample's value), or ``[B, K]`` scores
    for the multi-target extension."""
    if not isinstance(output, torch.Tensor) or output.dim() == 0:
        raise CaptumTargetError("the model must return a tensor with a batch dimension")
    if _is_multi_target(target):
        return _multi_scores(output, target)
    selected = _select_targets(output, target)
    if selected.dim() == 0 or selected[0].numel() != 1:
        raise CaptumTargetError("Target not provided when necessary, cannot take gradient with "
                                "respect to multiple outputs.")
    return selected.reshape(selected.shape[0])


class _Forward(torch.nn.Module):
    """``model(*inputs, *additional_forward_args)`` with the extra arguments kept out of the
    attributed positional inputs (passed as a keyword, so they get no relevance and do not
    change how rules split relevance between operands)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.add_module(_MODEL, model)

    def forward(self, *inputs: Any, _captum_extra: tuple = ()) -> Any:
        return getattr(self, _MODEL)(*inputs, *_captum_extra)


def _prefixed(rules: RuleSet) -> RuleSet:
    """The rule set with its module patterns moved under the wrapper's submodule name."""
    if not rules.modules:
        return rules
    return RuleSet(rules.name, rules.rule_params, rules.type_params, rules.overrides,
                   rules.first_params, [(f"{_MODEL}.{p}", v) for p, v in rules.modules],
                   functions=rules.functions)


class LRP:
    """Layer-wise relevance propagation with Captum's calling conventions.

    Parameters
    ----------
    model:
        the model (an ``nn.Module`` or any callable taking the inputs, then the additional
        forward arguments, positionally).
    rules:
        ``None`` (lrpplan's ``"epsilon"`` preset), a preset name or a :class:`lrpplan.RuleSet`.
        Captum's per-module ``rule`` attributes are not read.
    cache:
        plan cache (:class:`lrpplan.PlanCache`, a path, ``None`` for the default cache or
        ``False``); the plan is compiled on the first call and replayed on later calls with the
        same graph structure either way.

    After each call, :attr:`last` holds the full :class:`lrpplan.Attribution` (ledger, plan,
    whether the plan was replayed).
    """

    def __init__(self, model: Any, rules: Any = None, cache: CacheArg = None) -> None:
        self.model = model
        self.forward_func = model  # Captum's attribute name
        self.rules = RuleSet.ensure(rules)
        forward = _Forward(model) if isinstance(model, torch.nn.Module) else \
            (lambda *inputs, _captum_extra=(): model(*inputs, *_captum_extra))
        self._explainer = Explainer(forward, rules=_prefixed(self.rules), cache=cache)
        self.last: Optional[Attribution] = None

    @property
    def multiplies_by_inputs(self) -> bool:
        return True

    def has_convergence_delta(self) -> bool:
        return True

    def attribute(self, inputs: TensorOrTuple, target: Any = None,
                  additional_forward_args: Any = None, return_convergence_delta: bool = False,
                  verbose: bool = False) -> Any:
        """Relevance of each input for the target score, in the structure of ``inputs``.

        Arguments as in ``captum.attr.LRP.attribute``. Returns the attributions, or
        ``(attributions, delta)`` with ``delta = output − Σ attributions`` per sample when
        ``return_convergence_delta`` is set.
        """
        is_tuple = isinstance(inputs, tuple)
        ins = inputs if is_tuple else (inputs,)
        for x in ins:
            if not isinstance(x, torch.Tensor):
                raise InvalidInputError("`inputs` must be a torch.Tensor or a tuple[torch.Tensor] "
                                        f"but found: {type(x)}")
            if not x.is_floating_point():
                raise InvalidInputError("LRP attributes floating-point inputs; pass integer "
                                        "arguments (token ids) through additional_forward_args "
                                        "or use lrpplan.explain")
        if additional_forward_args is None:
            extra: tuple = ()
        elif isinstance(additional_forward_args, tuple):
            extra = additional_forward_args
        else:
            extra = (additional_forward_args,)
        result = self._explainer(*ins, target=lambda out: _scores(out, target),
                                 _captum_extra=extra)
        self.last = result
        if verbose:
            print(result.plan.format())
        rel = result.relevance if isinstance(result.relevance, tuple) else (result.relevance,)
        per_target = tuple(result.output.shape[1:]) if _is_multi_target(target) else ()
        rel = tuple(x.new_zeros(x.shape[:1] + per_target + x.shape[1:]) if r is None
                    else r.to(x.dtype) for r, x in zip(rel, ins))
        attributions = rel if is_tuple else rel[0]
        if return_convergence_delta:
            return attributions, self.compute_convergence_delta(rel, result.output.to(ins[0].dtype))
        return attributions

    def compute_convergence_delta(self, attributions: TensorOrTuple,
                                  output: torch.Tensor) -> torch.Tensor:
        """``output − Σ attributions`` per sample (Captum's convention for LRP)."""
        attrs = attributions if isinstance(attributions, tuple) else (attributions,)
        if output.dim() == 2:  # K targets per sample: attributions [B, K, *input]
            summed = sum(a.reshape(*a.shape[:2], -1).sum(2) for a in attrs)
            return output - summed
        summed = sum(a.reshape(a.shape[0], -1).sum(1) for a in attrs)
        return output.flatten() - summed.flatten()

    def attribute_future(self) -> None:
        raise NotImplementedError("attribute_future is not implemented for LRP")
