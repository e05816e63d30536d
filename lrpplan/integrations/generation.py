"""Explain every token a language model generated, in one replay (issue 16).

:func:`explain_generation` generates a continuation (or takes one), runs one forward pass over
prompt + continuation and explains each generated token with respect to every token before it:
generated token ``k`` is target ``k``, the logit of that token at the position that predicted
it, so N generated tokens are N targets of one replay (:mod:`lrpplan.many`). The result holds
the ``[N, L]`` relevance matrix (row ``k``: generated token ``k``; ``L`` the context, zero at
and after the token itself), the per-step scores and renderers (PNG heatmap, HTML with hover,
terminal).

Causal LMs (GPT-2, Llama, Qwen, ...): the context is prompt + continuation. Encoder-decoders
(T5, BART, ...): the context is the encoder input followed by the decoder prefix (the decoder
start token and the generated tokens), and row ``k`` holds the relevance of both.
"""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ..many import DEFAULT_CHUNK

__all__ = ["GenerationAttribution", "explain_generation"]


@dataclass
class GenerationAttribution:
    """A generated continuation and the relevance of every generated token.

    Attributes
    ----------
    ids : torch.Tensor
        The context token ids, ``[L]``: prompt + continuation (causal LM), or encoder input +
        decoder prefix (encoder-decoder); padding removed.
    tokens : list of str, optional
        ``ids`` as strings (where a tokenizer was given).
    matrix : torch.Tensor
        ``[N, L]``: row ``k`` the relevance of each context token for generated token ``k``;
        zero at the generated token and after it (checked).
    generated : torch.Tensor
        The N generated token ids.
    scores : torch.Tensor
        ``[N]``: the explained logit of each generated token.
    prompt_length : int
        How many context tokens precede the first generated token's own position: the prompt
        (causal LM), or encoder input + decoder start token (encoder-decoder).
    encoder_length : int
        Encoder tokens at the start of the context (0 for a causal LM).
    attribution : lrpplan.Attribution
        The underlying explanation (all N targets, their ledgers, the plan).
    """

    ids: torch.Tensor
    tokens: Optional[list[str]]
    matrix: torch.Tensor
    generated: torch.Tensor
    scores: torch.Tensor
    prompt_length: int
    encoder_length: int = 0
    attribution: Any = field(default=None, repr=False)

    def _labels(self) -> tuple[list[str], list[str]]:
        context = self.tokens if self.tokens is not None else [str(int(i)) for i in self.ids]
        rows = [context[self.prompt_length + k] for k in range(len(self.generated))]
        return context, rows

    def to_terminal(self, color: Optional[bool] = None, cmap: str = "bwr") -> str:
        """One line per generated token: the token, then its context coloured by relevance
        (see :func:`lrpplan.viz.tokens_terminal`; one scale for all rows)."""
        from lrpplan.viz import tokens_terminal

        context, rows = self._labels()
        lines = []
        text = tokens_terminal([context] * len(rows), self.matrix, color=color, cmap=cmap)
        for label, line in zip(rows, text.split("\n")):
            lines.append(f"{label!r:>14} <- {line}")
        return "\n".join(lines)

    def to_html(self, path: Any = None, title: Optional[str] = None, cmap: str = "bwr") -> str:
        """An HTML page of the generated text: hovering a generated token colours its context by
        that token's relevance. Returns the document; writes it to ``path`` when given."""
        from lrpplan.viz import _hex, _signed_rgb, _text_rgb

        context, rows = self._labels()
        m = self.matrix.detach().double().cpu().numpy()
        peak = float(np.abs(m).max()) if m.size else 0.0
        rgb = _signed_rgb(m / peak if peak > 0 else np.zeros_like(m), cmap)  # [N, L, 3]
        colours = [[_hex(c) for c in row] for row in rgb]
        text_colours = [[_hex(_text_rgb(c)) for c in row] for row in rgb]
        spans = []
        for i, tok in enumerate(context):
            k = i - self.prompt_length
            gen = f' data-row="{k}" class="tok gen"' if 0 <= k < len(rows) else ' class="tok"'
            spans.append(f'<span id="t{i}"{gen}>{html.escape(tok)}</span>')
        heading = html.escape(title or "Relevance of each generated token (hover one)")
        script = ("const C=" + json.dumps(colours) + ",F=" + json.dumps(text_colours) + ";\n"
                  "document.querySelectorAll('.gen').forEach(g=>{g.onmouseenter=()=>{"
                  "const k=+g.dataset.row;C[k].forEach((c,i)=>{const s=document.getElementById("
                  "'t'+i);s.style.background=c;s.style.color=F[k][i];});g.style.outline="
                  "'2px solid #000';};g.onmouseleave=()=>{document.querySelectorAll('.tok')"
                  ".forEach(s=>{s.style.background='';s.style.color='';s.style.outline='';});};"
                  "});")
        doc = "\n".join([
            "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
            f"<title>{heading}</title>",
            "<style>body{font-family:sans-serif;margin:2em;line-height:2.2}"
            ".tok{padding:.15em .2em;border-radius:3px;white-space:pre-wrap}"
            ".gen{text-decoration:underline;cursor:pointer}</style>",
            "</head>", "<body>", f"<h1>{heading}</h1>", f"<p>{' '.join(spans)}</p>",
            f"<p>scale: max |R| = {peak:.4g}; red supports the generated token, blue speaks "
            "against it; underlined: generated</p>", f"<script>\n{script}\n</script>",
            "</body>", "</html>", ""])
        if path is not None:
            with open(os.fspath(path), "w", encoding="utf-8") as f:
                f.write(doc)
        return doc

    def to_png(self, path: Any = None, cmap: str = "bwr", cell: int = 22) -> Any:
        """A heatmap image of the matrix with the tokens on the axes (generated tokens down the
        left, the context along the top). Returns the PIL image; saves it to ``path``."""
        from lrpplan.viz import matrix_png

        context, rows = self._labels()
        return matrix_png(self.matrix, rows, context, path=path, cmap=cmap, cell=cell)


class _Seq2Seq(torch.nn.Module):
    """An encoder-decoder as ``(input_ids, decoder_input_ids) -> logits``: both explained."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, decoder_input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, decoder_input_ids=decoder_input_ids,
                          attention_mask=attention_mask).logits


def _prompt_ids(tokenizer: Any, prompt: Union[str, Sequence[str], torch.Tensor],
                left_pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, P]`` ids and attention mask from a string, strings (padded) or ids."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt if prompt.dim() == 2 else prompt.unsqueeze(0)
        if ids.is_floating_point():
            raise TypeError("prompt ids must be an integer tensor")
        return ids.long(), torch.ones_like(ids, dtype=torch.long)
    if tokenizer is None:
        raise ValueError("a text prompt needs a tokenizer (or pass token ids)")
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    side = getattr(tokenizer, "padding_side", "right")
    if len(texts) > 1:
        if getattr(tokenizer, "pad_token", None) is None:
            raise ValueError("batched prompts need a tokenizer with a pad token")
        tokenizer.padding_side = "left" if left_pad else "right"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=len(texts) > 1)
    finally:
        tokenizer.padding_side = side
    mask = enc.get("attention_mask")
    ids = enc["input_ids"]
    return ids, (mask if mask is not None else torch.ones_like(ids))


def explain_generation(model: Any, tokenizer: Any, prompt: Union[str, Sequence[str], torch.Tensor],
                       max_new_tokens: Optional[int] = None,
                       continuation: Optional[torch.Tensor] = None, rules: Any = None,
                       cache: Any = None, chunk: Optional[int] = DEFAULT_CHUNK,
                       **generate_kwargs: Any
                       ) -> Union[GenerationAttribution, list[GenerationAttribution]]:
    """Generate (or take) a continuation and explain every generated token in one replay.

    Parameters
    ----------
    model : transformers model
        A causal LM (``*ForCausalLM`` / ``*LMHeadModel``) or an encoder-decoder
        (``*ForConditionalGeneration``), in eval mode.
    tokenizer :
        Its tokenizer; may be ``None`` when ``prompt`` is a tensor of token ids.
    prompt : str, list of str, or integer tensor ``[P]`` / ``[B, P]``
        The prompt(s). Several prompts are padded (left for a causal LM); each result covers one.
    max_new_tokens : int
        Tokens to generate (greedy unless ``generate_kwargs`` say otherwise); not needed with
        ``continuation``.
    continuation : integer tensor ``[N]`` or ``[B, N]``, optional
        Explain this continuation instead of generating one.
    rules, cache, chunk :
        As for :func:`lrpplan.explain` (``chunk``: generated tokens per replay).
    **generate_kwargs :
        Passed to ``model.generate``.

    Returns
    -------
    GenerationAttribution, or a list of them for several prompts.
    """
    import lrpplan

    config = getattr(model, "config", None)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    ids, mask = _prompt_ids(tokenizer, prompt, left_pad=not seq2seq)
    device = next(iter(model.parameters())).device
    ids, mask = ids.to(device), mask.to(device)
    batch = ids.shape[0]
    if continuation is None:
        if max_new_tokens is None:
            raise ValueError("pass max_new_tokens (or a continuation to explain)")
        kwargs = {"do_sample": False, **generate_kwargs}
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
            kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask,
                                 max_new_tokens=max_new_tokens, **kwargs)
        new = out[:, 1:] if seq2seq else out[:, ids.shape[1]:]
    else:
        new = continuation.to(device).long()
        new = new if new.dim() == 2 else new.unsqueeze(0).expand(batch, -1)
    n = new.shape[1]
    if n == 0:
        raise ValueError("nothing was generated to explain")
    if seq2seq:
        start = getattr(config, "decoder_start_token_id", None)
        if start is None:
            raise ValueError("the encoder-decoder's config has no decoder_start_token_id")
        dec = torch.cat([torch.full((batch, 1), int(start), device=device), new], 1)
        dec_in = dec[:, :n]  # position k predicts generated token k
        pairs = torch.stack([torch.arange(n, device=device).expand(batch, n), new], -1)
        attr = lrpplan.explain(_Seq2Seq(model), ids, dec_in, target=pairs, rules=rules,
                               cache=cache, chunk=chunk, attention_mask=mask)
        enc_rel, dec_rel = attr.relevance  # [B, N, S], [B, N, N]
        results = []
        for b in range(batch):
            keep = mask[b].bool()
            ctx = torch.cat([ids[b][keep], dec[b]])
            matrix = torch.cat([enc_rel[b][:, keep],
                                torch.cat([dec_rel[b], torch.zeros_like(dec_rel[b][:, :1])],
                                          1)], 1)
            s = int(keep.sum())
            results.append(_result(tokenizer, ctx, matrix, new[b], attr, b, s + 1, s))
        return results[0] if isinstance(prompt, str) or batch == 1 else results
    full = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    length = ids.shape[1]
    # generated token k sits at length + k and was predicted at length + k - 1
    pos = torch.arange(length - 1, length - 1 + n, device=device).expand(batch, n)
    pairs = torch.stack([pos, new], -1)
    kwargs = {"attention_mask": full_mask}
    if bool((mask == 0).any()):  # left padding: positions count real tokens only
        kwargs["position_ids"] = (full_mask.cumsum(-1) - 1).clamp(min=0)
    attr = lrpplan.explain(model, full, target=pairs, rules=rules, cache=cache, chunk=chunk,
                           **kwargs)
    results = []
    for b in range(batch):
        keep = full_mask[b].bool()
        matrix = attr.relevance[b][:, keep]
        results.append(_result(tokenizer, full[b][keep], matrix, new[b], attr, b,
                               int(mask[b].sum()), 0))
    return results[0] if isinstance(prompt, str) or batch == 1 else results


def _result(tokenizer: Any, ctx: torch.Tensor, matrix: torch.Tensor, new: torch.Tensor,
            attr: Any, b: int, prompt_length: int, encoder_length: int
            ) -> GenerationAttribution:
    """One sample's result; the causal structure of its matrix checked."""
    n = new.shape[0]
    # generated token k sees nothing at or after its own position, prompt_length + k
    rows = torch.arange(n, device=matrix.device).unsqueeze(1)
    cols = torch.arange(matrix.shape[1], device=matrix.device)
    late = ((matrix != 0) & (cols >= prompt_length + rows)).any(1)
    if bool(late.any()):
        k = int(late.nonzero()[0])
        raise AssertionError(
            f"generated token {k} got relevance at or after its own position: the model "
            "is not causal over its context (a bidirectional decoder?)")
    tokens = None if tokenizer is None else tokenizer.convert_ids_to_tokens(ctx.tolist())
    return GenerationAttribution(ctx.detach().cpu(), tokens, matrix.detach().cpu(),
                                 new.detach().cpu(), attr.output[b].detach().cpu(),
                                 prompt_length, encoder_length, attr)
