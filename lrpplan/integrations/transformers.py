"""Explain Hugging Face ``transformers`` text models token by token.

:func:`explain_text` tokenizes a text, runs lrpplan through the model down to the token ids
(relevance per token through the embedding) and returns a :class:`TextAttribution` with the tokens,
their relevance and renderers for HTML and the terminal::

    from lrpplan.integrations.transformers import explain_text

    res = explain_text(model, tokenizer, "The film was unbelievably good", merge_words=True)
    print(res.to_terminal())
    res.to_html("explanation.html")

Three tasks (``task=None`` detects it from the model class and the text):

* ``"classification"`` (``*ForSequenceClassification``): the logit of ``target`` (a label index,
  or a label name of ``config.label2id``; ``None`` = the predicted label);
* ``"next-token"`` (``*ForCausalLM`` / ``*LMHeadModel``): the logit of the next token after the
  text, ``target`` a token string or id (``None`` = the most likely next token);
* ``"similarity"`` (``text`` a pair of sentences, ``model`` an encoder such as ``AutoModel``):
  the cosine similarity of the mean-pooled (over the attention mask) sentence embeddings, as in
  sentence-transformers' all-MiniLM / all-mpnet models.

:func:`explain_generation` (:mod:`lrpplan.integrations.generation`) explains every token a
model generates, in one replay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from ..pairs import DEFAULT_CHUNK as PAIR_CHUNK
from .generation import GenerationAttribution, explain_generation

__all__ = ["GenerationAttribution", "TextAttribution", "explain_generation", "explain_text"]

_MISSING = ("lrpplan.integrations.transformers needs the transformers package: "
            "pip install lrpplan[zoo]")


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(_MISSING) from exc
    return transformers


@dataclass
class TextAttribution:
    """Tokens of an explained text with their relevance.

    Attributes
    ----------
    tokens : list of str, or list of lists of str
        The tokens (or merged words) in order; one list per sentence for a sentence pair.
    relevance : list of float, or list of lists of float
        One relevance value per token, in the same layout as ``tokens``.
    target :
        What was explained: the label index, the next token's id, or ``"cosine"``.
    score : float
        The explained score (the target logit, or the cosine similarity).
    attribution : lrpplan.Attribution
        The underlying attribution (relevance per token id, ledger, plan).
    task : str
        ``"classification"``, ``"next-token"`` or ``"similarity"``.
    target_token : str, optional
        The next token as a string (next-token task).
    pairs : torch.Tensor, optional
        Similarity with ``pairs=True``: ``[len(tokens[0]), len(tokens[1])]``, the relevance of
        each (token of the first sentence, token of the second) pair (BiLRP).
    """

    tokens: list
    relevance: list
    target: Any
    score: float
    attribution: Any
    task: str = ""
    target_token: Optional[str] = None
    pairs: Any = None

    def _title(self) -> str:
        if self.task == "next-token":
            return f"next token {self.target_token!r} (logit {self.score:.4g})"
        if self.task == "similarity":
            return f"cosine similarity {self.score:.4g}"
        return f"target {self.target} (logit {self.score:.4g})"

    def to_html(self, path: Any = None, title: Optional[str] = None, cmap: str = "bwr") -> str:
        """An HTML page with the tokens coloured by relevance (see :func:`lrpplan.viz.tokens_html`);
        written to ``path`` when given. Returns the HTML."""
        from lrpplan.viz import tokens_html

        return tokens_html(self.tokens, self.relevance, path=path,
                           title=title if title is not None else self._title(), cmap=cmap)

    def to_terminal(self, color: Optional[bool] = None, cmap: str = "bwr") -> str:
        """The tokens with ANSI background colours (see :func:`lrpplan.viz.tokens_terminal`)."""
        from lrpplan.viz import tokens_terminal

        return tokens_terminal(self.tokens, self.relevance, color=color, cmap=cmap)

    def pairs_png(self, path: Any = None, cmap: str = "bwr", cell: int = 22) -> Any:
        """A heatmap of :attr:`pairs`, the first sentence's tokens down the left and the second's
        along the top (see :func:`lrpplan.viz.matrix_png`). Returns the PIL image."""
        if self.pairs is None:
            raise ValueError("no pair matrix: call explain_text(..., task='similarity', "
                             "pairs=True)")
        from lrpplan.viz import matrix_png

        return matrix_png(self.pairs, self.tokens[0], self.tokens[1], path=path, cmap=cmap,
                          cell=cell)


# --------------------------------------------------------------------------- helpers


def _detect_task(model: Any, text: Any) -> str:
    if isinstance(text, (tuple, list)):
        return "similarity"
    names = [type(model).__name__] + list(getattr(getattr(model, "config", None),
                                                  "architectures", None) or [])
    for name in names:
        if name.endswith("ForSequenceClassification"):
            return "classification"
        if name.endswith("ForCausalLM") or "LMHead" in name:
            return "next-token"
    raise ValueError(f"cannot tell the task of a {type(model).__name__}; pass task="
                     "'classification', 'next-token' or 'similarity'")


class _MeanPoolCosine:
    """Callable target: cosine of two rows of pooled embeddings ``[1, 2, D]`` → ``[1]``."""

    def __call__(self, emb: Any) -> Any:
        return (emb[:, 0] * emb[:, 1]).sum(-1)

    def __repr__(self) -> str:
        return "cosine"


class _BothEmbeddings:
    """Callable target: every embedding dimension of both sentences, ``[1, 2, D]`` → ``[1, 2D]``
    (one target each: the per-dimension maps BiLRP pairs up)."""

    def __call__(self, emb: Any) -> Any:
        return emb.reshape(emb.shape[0], -1)

    def __repr__(self) -> str:
        return "embedding dimensions"


def _pair_module(encoder: Any) -> Any:
    class SentencePair(torch.nn.Module):
        """Encoder + mean pooling over the attention mask + L2 normalisation:
        ``[P, 2, T]`` ids → ``[P, 2, D]`` unit embeddings."""

        def __init__(self, enc: Any) -> None:
            super().__init__()
            self.encoder = enc

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            p, two, t = input_ids.shape
            mask = attention_mask.reshape(p * two, t)
            out = self.encoder(input_ids=input_ids.reshape(p * two, t), attention_mask=mask)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            emb = pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            return emb.reshape(p, two, -1)

    return SentencePair(encoder)


def _model_device(model: Any) -> Any:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else "cpu"


def _next_token_id(tokenizer: Any, target: Any) -> int:
    if isinstance(target, int):
        return target
    if hasattr(target, "item"):
        return int(target.item())
    if isinstance(target, str):
        tid = tokenizer.convert_tokens_to_ids(target)
        unk = getattr(tokenizer, "unk_token_id", None)
        if tid is not None and (tid != unk or target == getattr(tokenizer, "unk_token", None)):
            return int(tid)
        ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"target {target!r} is {len(ids)} tokens, not one; pass a token "
                             "string or id")
        return int(ids[0])
    raise TypeError(f"a next-token target must be a token string or id, not "
                    f"{type(target).__name__}")


_SPACE_MARKERS = ("\u0120", "\u2581")  # BPE 'Ġ', SentencePiece '▁'


def _merge_by_convention(tokens: Sequence[str], special: Sequence[bool]) -> list[list[int]]:
    """Groups of token indices forming words, from '##' continuations and 'Ġ'/'▁' word starts."""
    uses_markers = any(t.startswith(_SPACE_MARKERS) for t in tokens)
    groups: list[list[int]] = []
    prev_special = True
    for i, tok in enumerate(tokens):
        if special[i]:
            groups.append([i])
            prev_special = True
            continue
        if prev_special:
            starts = True
        elif tok.startswith("##"):
            starts = False
        elif uses_markers:
            starts = tok.startswith(_SPACE_MARKERS) or not tok[:1].isalnum()
        else:
            starts = True
        if starts or not groups:
            groups.append([i])
        else:
            groups[-1].append(i)
        prev_special = False
    return groups


def _word_text(tokens: Sequence[str], group: Sequence[int]) -> str:
    parts = []
    for k, i in enumerate(group):
        t = tokens[i]
        if k and t.startswith("##"):
            t = t[2:]
        parts.append(t)
    word = "".join(parts)
    for m in _SPACE_MARKERS:
        word = word.replace(m, "")
    return word


def _word_groups(tokens: list[str], special: list[bool], word_ids: Optional[list]
                 ) -> list[list[int]]:
    """Groups of token indices forming words: from a fast tokenizer's word ids, else by the
    sub-word conventions."""
    if word_ids is None:
        return _merge_by_convention(tokens, special)
    groups: list[list[int]] = []
    prev = object()
    for i, w in enumerate(word_ids):
        if w is None or special[i] or w != prev or not groups:
            groups.append([i])
        else:
            groups[-1].append(i)
        prev = None if (w is None or special[i]) else w
    return groups


def _merge(tokens: list[str], rel: list[float], special: list[bool],
           groups: list[list[int]], offsets: Optional[list], text: Optional[str]
           ) -> tuple[list[str], list[float]]:
    """Sub-word pieces merged into words (relevance summed)."""
    words, rels = [], []
    for g in groups:
        rels.append(float(sum(rel[i] for i in g)))
        if (offsets is not None and text is not None and not special[g[0]]
                and offsets[g[-1]][1] > offsets[g[0]][0]):
            words.append(text[offsets[g[0]][0]:offsets[g[-1]][1]].strip())
        else:
            words.append(tokens[g[0]] if len(g) == 1 and special[g[0]]
                         else _word_text(tokens, g))
    return words, rels


def _encode(tokenizer: Any, texts: list[str]) -> tuple[Any, list[Optional[list]],
                                                        list[Optional[list]]]:
    fast = bool(getattr(tokenizer, "is_fast", False))
    kwargs = dict(return_tensors="pt", padding=len(texts) > 1)
    if fast:
        kwargs["return_offsets_mapping"] = True
    enc = tokenizer(texts, **kwargs)
    word_ids: list[Optional[list]] = [None] * len(texts)
    offsets: list[Optional[list]] = [None] * len(texts)
    if fast:
        offs = enc.pop("offset_mapping")
        for k in range(len(texts)):
            try:
                word_ids[k] = enc.word_ids(k)
            except Exception:  # noqa: BLE001 - a tokenizer without word ids: conventions
                word_ids[k] = None
            offsets[k] = [tuple(int(v) for v in o) for o in offs[k].tolist()]
    return enc, word_ids, offsets


# --------------------------------------------------------------------------- main entry


def explain_text(model: Any, tokenizer: Any, text: Union[str, Sequence[str]], target: Any = None,
                 task: Optional[str] = None, merge_words: bool = False, rules: Any = None,
                 cache: Any = None, pairs: bool = False,
                 chunk: Optional[int] = PAIR_CHUNK) -> TextAttribution:
    """Explain one text (or a sentence pair) with lrpplan, token by token.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A ``*ForSequenceClassification``, a causal LM (``*ForCausalLM`` / ``*LMHeadModel``) or,
        for sentence similarity, an encoder (``AutoModel``). Used as given: put it in eval mode.
    tokenizer : transformers tokenizer
        The model's tokenizer; a fast tokenizer's word ids and offsets are used to merge words.
    text : str, or (str, str) for similarity
        The input text.
    target :
        classification: label index or a name in ``config.label2id`` (``None``: the predicted
        label); next-token: token string or id (``None``: the most likely next token);
        similarity: ignored (the cosine similarity is explained).
    task : str, optional
        ``"classification"``, ``"next-token"`` or ``"similarity"``; detected when ``None``.
    merge_words : bool
        Merge sub-word pieces into words, summing their relevance.
    rules, cache :
        As for :func:`lrpplan.explain`.
    pairs : bool
        similarity only: also the relevance of every token pair (BiLRP, see
        :func:`lrpplan.bilrp`) in :attr:`TextAttribution.pairs`, one target per embedding
        dimension of both sentences, ``chunk`` targets per replay.

    Returns
    -------
    TextAttribution
    """
    _require_transformers()
    import lrpplan

    task = task or _detect_task(model, text)
    if task not in ("classification", "next-token", "similarity"):
        raise ValueError(f"unknown task {task!r}")
    device = _model_device(model)

    if task == "similarity":
        if isinstance(text, str) or len(text) != 2:
            raise ValueError("similarity needs a pair of sentences: text=(a, b)")
        return _explain_similarity(model, tokenizer, [str(text[0]), str(text[1])], merge_words,
                                   rules, cache, pairs, chunk)
    if pairs:
        raise ValueError("pairs=True explains a similarity: pass task='similarity' and a "
                         "sentence pair")

    if not isinstance(text, str):
        raise ValueError(f"task {task!r} explains one text (a str)")
    enc, word_ids, offsets = _encode(tokenizer, [text])
    ids = enc["input_ids"].to(device)
    kwargs = {}
    if "attention_mask" in enc:
        kwargs["attention_mask"] = enc["attention_mask"].to(device)
    target_token = None
    if task == "classification":
        if isinstance(target, str):
            label2id = getattr(getattr(model, "config", None), "label2id", {}) or {}
            if target not in label2id:
                raise ValueError(f"label {target!r} not in config.label2id {label2id}")
            target = int(label2id[target])
        attr = lrpplan.explain(model, ids, target=target, rules=rules, cache=cache, **kwargs)
        explained = int(attr.target.reshape(-1)[0]) if attr.target is not None else target
    else:  # next-token
        tid = None if target is None else _next_token_id(tokenizer, target)
        attr = lrpplan.explain(model, ids, target=tid, rules=rules, cache=cache, **kwargs)
        explained = int(attr.target.reshape(-1)[0])
        target_token = tokenizer.convert_ids_to_tokens([explained])[0]
    score = float(attr.output.detach().reshape(-1)[0])
    id_list = ids[0].cpu().tolist()
    toks = tokenizer.convert_ids_to_tokens(id_list)
    rel = [float(v) for v in attr.relevance.detach().double().cpu().reshape(-1)]
    if merge_words:
        special = _special_mask(tokenizer, id_list)
        toks, rel = _merge(toks, rel, special, _word_groups(toks, special, word_ids[0]),
                           offsets[0], text)
    return TextAttribution(toks, rel, explained, score, attr, task, target_token)


def _explain_similarity(model: Any, tokenizer: Any, texts: list[str], merge_words: bool,
                        rules: Any, cache: Any, pairs: bool, chunk: Optional[int]
                        ) -> TextAttribution:
    import lrpplan
    from lrpplan.pairs import pair_matrix

    enc, word_ids, offsets = _encode(tokenizer, texts)
    device = _model_device(model)
    ids = enc["input_ids"].to(device)
    mask = enc["attention_mask"].to(device)
    t = ids.shape[1]
    pair = _pair_module(model)
    kwargs = dict(rules=rules, cache=cache, attention_mask=mask.reshape(1, 2, t))
    attr = lrpplan.explain(pair, ids.reshape(1, 2, t), target=_MeanPoolCosine(), **kwargs)
    rel_all = attr.relevance.detach().double().cpu().reshape(2, t)
    score = float(attr.output.detach().reshape(-1)[0])
    tok_rows, rel_rows, positions, groups = [], [], [], []
    for k in range(2):
        keep = mask[k].bool().cpu()
        pos = [i for i in range(t) if bool(keep[i])]  # padding is on one side
        kept_ids = ids[k].cpu()[keep].tolist()
        toks = tokenizer.convert_ids_to_tokens(kept_ids)
        rel = [float(rel_all[k, i]) for i in pos]
        group = [[i] for i in range(len(pos))]
        if merge_words:
            special = _special_mask(tokenizer, kept_ids)
            wid = [word_ids[k][i] for i in pos] if word_ids[k] is not None else None
            off = [offsets[k][i] for i in pos] if offsets[k] is not None else None
            group = _word_groups(toks, special, wid)
            toks, rel = _merge(toks, rel, special, group, off, texts[k])
        tok_rows.append(toks)
        rel_rows.append(rel)
        positions.append(pos)
        groups.append(group)
    matrix = None
    if pairs:
        dims = lrpplan.explain(pair, ids.reshape(1, 2, t), target=_BothEmbeddings(),
                               chunk=chunk, **kwargs)
        d = dims.output.shape[1] // 2
        per_dim = dims.relevance.detach().double().cpu()  # [1, 2D, 2, T]
        full = pair_matrix(per_dim[:, :d, 0], per_dim[:, d:, 1])[0]  # [T, T]
        full = full[positions[0]][:, positions[1]]
        matrix = _membership(groups[0], full.shape[0]) @ full @ \
            _membership(groups[1], full.shape[1]).T
    return TextAttribution(tok_rows, rel_rows, "cosine", score, attr, "similarity",
                           pairs=matrix)


def _membership(groups: list[list[int]], n: int) -> torch.Tensor:
    """``[len(groups), n]`` float64 0/1 matrix: token ``i`` belongs to word ``g``."""
    m = torch.zeros(len(groups), n, dtype=torch.float64)
    for g, members in enumerate(groups):
        m[g, members] = 1.0
    return m


def _special_mask(tokenizer: Any, ids: list[int]) -> list[bool]:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [i in special for i in ids]
