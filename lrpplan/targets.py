"""What :func:`lrpplan.explain` explains: one score per sample, picked from the model's output.

Nothing here is guessed when it is ambiguous:

- a target callable receives the model's own output (tensor, ``ModelOutput``, dict or tuple),
  as Zennit's ``attr_output`` callable and Captum's ``forward_func`` do, and returns ``[B]``
  (one score per sample) or ``[B, K]`` (K scores per sample, each explained alone);
- otherwise the output must be (or hold under ``logits``) one of
  ``[]`` (the model reduces the batch to one number: that number is explained),
  ``[B]`` (one score per sample: that score is explained),
  ``[B, C]`` (class logits: the target class, argmax by default) or
  ``[B, T, C]`` (sequence logits: the target class at the explained position of each sample,
  the last real token where an attention mask says which tokens are real);
- anything else raises :class:`~lrpplan.errors.InvalidInputError` saying what to pass.

Several targets per sample (issue 16): a ``[B, K]`` integer target picks K classes per sample
(at the explained position for sequence logits), a ``[B, K, 2]`` one K (position, token) pairs
of ``[B, T, C]`` sequence logits; the scores are then ``[B, K]`` and each column is explained
alone, all in one replay.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .errors import InvalidInputError

Target = Union[None, int, Sequence[int], torch.Tensor, Callable[[Any], torch.Tensor]]

_CALLABLE_HINT = ("pass target=callable receiving the model's output and returning one score "
                  "per sample, e.g. target=lambda out: out[:, 0].sum((1, 2))")


def is_callable_target(target: Any) -> bool:
    """A target callable (tensors and arrays are not callables here)."""
    return callable(target) and not isinstance(target, torch.Tensor)


def output_tensor(raw: Any) -> torch.Tensor:
    """The tensor to pick scores from: the output itself, or its ``logits``.

    A dict, ``ModelOutput`` or tuple is never reduced to some tensor it holds: only a
    ``logits`` entry or a one-element sequence is taken; otherwise the error lists what it holds.
    """
    if isinstance(raw, torch.Tensor):
        return raw
    if isinstance(raw, dict) or (hasattr(raw, "keys") and hasattr(raw, "__getitem__")):
        keys = list(raw.keys())
        if "logits" in keys and isinstance(raw["logits"], torch.Tensor):
            return raw["logits"]
        raise InvalidInputError(
            f"the model returned a {type(raw).__name__} with keys {keys} and no 'logits': "
            f"lrpplan does not guess which entry to explain; {_CALLABLE_HINT} "
            f"(e.g. target=lambda out: out[{keys[0]!r}].sum(-1))" if keys else
            f"the model returned an empty {type(raw).__name__}")
    if isinstance(raw, (tuple, list)):
        if len(raw) == 1 and isinstance(raw[0], torch.Tensor):
            return raw[0]
        kinds = [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                 for v in raw]
        raise InvalidInputError(
            f"the model returned a {type(raw).__name__} of {len(raw)} items {kinds}: lrpplan "
            f"does not guess which one to explain; {_CALLABLE_HINT} "
            "(e.g. target=lambda out: out[0].max(-1).values)")
    raise InvalidInputError(f"cannot explain a model output of type {type(raw).__name__}; "
                            f"{_CALLABLE_HINT}")


def class_indices(target: Any, batch: int, n_classes: int,
                  device: torch.device) -> torch.Tensor:
    """``[B]`` class indices from an int (Python, numpy, 0-d tensor) or per-sample integers;
    ``[B, K]`` from K per sample.

    Floats, bools and float tensors are refused (``1.9`` never silently means class 1).
    """
    if isinstance(target, bool) or (isinstance(target, torch.Tensor)
                                    and target.dtype == torch.bool):
        raise InvalidInputError(f"target {target!r} is a bool; pass a class index (an int)")
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        idx = _checked_int(int(target), n_classes)
        return torch.full((batch,), idx, dtype=torch.long, device=device)
    if isinstance(target, numbers.Number):
        raise InvalidInputError(f"target {target!r} is a {type(target).__name__}; pass a class "
                                "index (an int) or one per sample")
    if isinstance(target, torch.Tensor):
        t = target
    else:
        try:
            import numpy as np

            arr = np.asarray(target)
        except Exception as exc:  # noqa: BLE001 - anything numpy cannot read is a bad target
            raise InvalidInputError(f"cannot read target {target!r}: {exc}") from None
        if arr.dtype == object and all(isinstance(v, numbers.Integral) and not isinstance(
                v, bool) for v in arr.reshape(-1).tolist()):
            raise InvalidInputError(f"target {target!r} out of range for {n_classes} outputs")
        if arr.dtype == object or arr.dtype.kind not in "iu":
            raise InvalidInputError(
                f"targets must be integers (class indices), got {arr.dtype} values {target!r}")
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) >= 2 ** 63:
            raise InvalidInputError(f"target out of range for {n_classes} outputs")
        t = torch.as_tensor(arr.astype("int64"))
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InvalidInputError(f"targets must be an integer tensor, got {t.dtype}")
    t = t.to(device=device, dtype=torch.long)
    if t.dim() == 0:
        idx = _checked_int(int(t), n_classes)
        return torch.full((batch,), idx, dtype=torch.long, device=device)
    if t.dim() == 2 and t.shape[0] == batch and t.shape[1] > 0:  # K targets per sample
        pass
    elif t.dim() != 1 or t.numel() != batch:
        raise InvalidInputError(f"{tuple(t.shape)} targets for a batch of {batch}: pass one "
                                "class index, one per sample (shape [B]) or K per sample "
                                "(shape [B, K])")
    if ((t < -n_classes) | (t >= n_classes)).any():
        raise InvalidInputError(f"target {t.tolist()} out of range for {n_classes} outputs")
    return t % n_classes


def _checked_int(v: int, n_classes: int) -> int:
    if not -n_classes <= v < n_classes:
        raise InvalidInputError(f"target {v} out of range for {n_classes} outputs")
    return v % n_classes


def last_real_positions(mask: torch.Tensor) -> torch.Tensor:
    """Per sample, the index of the last position an attention mask marks as real (``[B]``)."""
    real = mask != 0
    if not bool(real.any(-1).all()):
        raise InvalidInputError("a sample's attention mask marks no token as real")
    t = real.shape[-1]
    return (t - 1) - real.flip(-1).to(torch.int8).argmax(-1)


def select_scores(raw: Any, target: Target, batch: int,
                  positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Any]:
    """The explained scores and the target that selected them: ``[B]`` (one score per sample:
    the model's own, or a target callable's) or ``[B, K]`` (classes or (position, token) pairs
    picked from logits, ``K = 1`` for one per sample: the target then has shape ``[B]``).

    Parameters
    ----------
    raw:
        the model's output, as the model returned it.
    target:
        ``None`` (argmax), an integer, per-sample integers, or a callable on ``raw``.
    batch:
        the leading size of the first explained input (the batch, unless the model is
        time-major): a ``[N]`` output is taken as one score per sample only when ``N`` is this;
        ``[B, C]`` and ``[B, T, C]`` outputs carry their own batch size.
    positions:
        for ``[B, T, C]`` outputs: the explained position per sample (default: the last).
    """
    if is_callable_target(target):
        score = target(raw)
        sizes = {batch} | ({raw.shape[0]} if isinstance(raw, torch.Tensor) and raw.dim() else set())
        if not isinstance(score, torch.Tensor) or score.dim() not in (1, 2) \
                or score.shape[0] not in sizes or (score.dim() == 2 and score.shape[1] == 0):
            shape = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            b = " or ".join(map(str, sorted(sizes)))
            raise InvalidInputError(f"a target callable must return one score per sample "
                                    f"(shape [{b}]) or K per sample (shape [{b}, K]), "
                                    f"got {shape}")
        return score, target
    out = output_tensor(raw)
    if not out.is_floating_point():
        raise InvalidInputError(f"the model output is {out.dtype}, not a floating-point score")
    if out.dim() == 0:  # the model itself reduces the batch to one number: that is explained
        if target is not None:
            raise InvalidInputError("the model returns a single number, so there is no class "
                                    "to pick: leave target=None")
        return out.reshape(1), None
    if out.dim() == 1 and out.shape[0] != batch:
        raise InvalidInputError(
            f"the model output has shape {tuple(out.shape)}, which is not one score per sample "
            f"of a batch of {batch}; {_CALLABLE_HINT}")
    batch = out.shape[0]
    if out.dim() == 1:  # one score per sample (regression): each sample's own score
        if target is not None:
            raise InvalidInputError(
                f"the model returns one score per sample (shape {tuple(out.shape)}), so there "
                "is no class to pick: leave target=None")
        return out, None
    if out.dim() == 3 and _is_pairs(target):
        return _pair_scores(out, target, batch)
    if out.dim() == 2:
        logits = out
    elif out.dim() == 3:  # sequence logits [B, T, C]
        if positions is None:
            logits = out[:, -1]
        elif positions.shape[0] != batch:
            raise InvalidInputError(f"the attention mask has {positions.shape[0]} rows for an "
                                    f"output of batch {batch}")
        elif int(positions.max()) >= out.shape[1]:
            raise InvalidInputError(
                f"the attention mask ({int(positions.max()) + 1}+ positions) is longer than the "
                f"output sequence ({out.shape[1]} positions)")
        else:
            logits = out[torch.arange(batch, device=out.device), positions.to(out.device)]
    else:
        raise InvalidInputError(
            f"the model output has shape {tuple(out.shape)}: lrpplan picks a score by itself only "
            "from [B] scores, [B, C] logits or [B, T, C] sequence logits; for other outputs "
            f"(segmentation maps, ...) {_CALLABLE_HINT}")
    n_classes = logits.shape[-1]
    if target is None:
        idx = logits.detach().argmax(-1)
    else:
        idx = class_indices(target, batch, n_classes, logits.device)
    # [B, K] scores; one target per sample is K = 1 (the graph, and so the plan, is the same
    # for every K: K is no structure), squeezed by the caller
    return logits.gather(-1, idx if idx.dim() == 2 else idx.unsqueeze(-1)), idx


def _is_pairs(target: Any) -> bool:
    """``target`` has the shape ``[B, K, 2]``: (position, token) pairs."""
    if target is None or is_callable_target(target) or isinstance(target, numbers.Number):
        return False
    try:
        shape = tuple(torch.as_tensor(target).shape) if not isinstance(target, torch.Tensor) \
            else tuple(target.shape)
    except (TypeError, ValueError, RuntimeError):
        return False
    return len(shape) == 3 and shape[-1] == 2


def _pair_scores(out: torch.Tensor, target: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, K]`` scores ``out[b, position, token]`` from ``[B, K, 2]`` (position, token)
    pairs of ``[B, T, C]`` sequence logits (positions may differ per target)."""
    t = torch.as_tensor(target)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InvalidInputError(f"(position, token) targets must be integers, got {t.dtype}")
    t = t.to(device=out.device, dtype=torch.long)
    b, steps, vocab = out.shape
    if t.shape[0] != b:
        raise InvalidInputError(f"{tuple(t.shape)} (position, token) targets for an output of "
                                f"batch {b}: pass [B, K, 2]")
    pos, tok = t[..., 0], t[..., 1]
    if ((pos < -steps) | (pos >= steps)).any():
        raise InvalidInputError(f"target positions {pos.tolist()} out of range for {steps} "
                                "positions")
    if ((tok < -vocab) | (tok >= vocab)).any():
        raise InvalidInputError(f"target tokens {tok.tolist()} out of range for {vocab} "
                                "classes")
    pos, tok = pos % steps, tok % vocab
    rows = torch.arange(b, device=out.device).unsqueeze(-1).expand_as(pos)
    return out[rows, pos, tok], torch.stack([pos, tok], -1)
