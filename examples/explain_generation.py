"""Explain every token a language model generates, in one replay.

A small GPT-2 (built from a config, no download) learns in-process to copy a sequence of letters
after "=" (``c a f b e = c a f b e``; about half a minute on two CPU cores), with a word-level
tokenizer built offline. Then it completes a new prompt, and ``explain_generation`` explains all
generated letters at once: row k of the relevance matrix says which context tokens made the
model write letter k. A model that copies should put its relevance on the letter it copies.

Writes ``generation.png`` (the matrix, tokens on the axes) and ``generation.html`` (hover a
generated letter to colour its context), prints the matrix in the terminal and, per generated
letter, the share of its positive relevance on the letter it copied.

Run:  python examples/explain_generation.py          (needs: pip install -e ".[zoo,viz]")
"""
from __future__ import annotations

import sys
import time

import torch

LETTERS = list("abcdefghij")
LENGTH = 5


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "="] + LETTERS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def train(steps: int = 700, seed: int = 0):
    """A 2-layer GPT-2 that copies LENGTH letters after "=" (loss on the copied half)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=3 + len(LETTERS), n_positions=2 * LENGTH + 1, n_embd=64,
                     n_layer=2, n_head=4, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x = torch.randint(3, 3 + len(LETTERS), (64, LENGTH))
        seq = torch.cat([x, torch.full((64, 1), 2), x], 1)
        logits = model(seq).logits[:, LENGTH:-1]  # the positions that predict the copy
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 seq[:, LENGTH + 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), float(loss.detach())


def main() -> None:
    from lrpplan.integrations.transformers import explain_generation

    start = time.perf_counter()
    model, loss = train()
    print(f"trained a 2-layer GPT-2 to copy {LENGTH} letters in "
          f"{time.perf_counter() - start:.0f} s (loss {loss:.3f})")
    tok = tokenizer()
    prompt = "c a f b e ="
    g = explain_generation(model, tok, prompt, max_new_tokens=LENGTH, min_new_tokens=LENGTH,
                           rules="epsilon", cache=None)
    print(f"prompt {prompt!r} -> {' '.join(g.tokens[g.prompt_length:])!r}")
    print(g.to_terminal(color=None if sys.stdout.isatty() else False))
    copied = prompt.split()[:LENGTH]
    for k in range(len(g.generated)):
        row = g.matrix[k].clamp(min=0)
        share = float(row[k] / row.sum()) if row.sum() > 0 else 0.0
        print(f"generated {g.tokens[g.prompt_length + k]!r}: {100 * share:.0f}% of its positive "
              f"relevance on the letter it copies ({copied[k]!r}, position {k})")
    g.to_png("generation.png")
    g.to_html("generation.html")
    print("wrote generation.png and generation.html")


if __name__ == "__main__":
    main()
