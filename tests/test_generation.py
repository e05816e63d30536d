"""``explain_generation``: every generated token explained in one replay (issue 16).

Models are built from configs (random weights: the pretrained MiniLM cannot generate) with a
word-level tokenizer built offline with ``tokenizers``. The reference for each row of the
relevance matrix is an explanation of that one generated token alone: the logit of the token at
the position that predicted it, through a target callable (another graph root, the single-target
path). Also: the matrix is zero at and after each generated token, padded prompts give each
sample its own explanation (pads removed, the same numbers as alone), encoder-decoders explain
encoder input and decoder prefix, and the renderers write what they say.
"""
from __future__ import annotations

import pytest
import torch

import lrpplan

tf = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytestmark = pytest.mark.zoo

from lrpplan.integrations.transformers import GenerationAttribution, explain_generation  # noqa

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "and", "then",
         "slept", "big", "small", "red"]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                      bos_token="<s>", eos_token="</s>")


V = 4 + len(WORDS)


def causal_lm(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=V, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2,
                                                 n_positions=64, **common))
    elif kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **common))
    else:
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **common))
    model.config._attn_implementation = "sdpa"
    return model.eval()


def seq2seq(kind: str):
    torch.manual_seed(0)
    if kind == "t5":
        cfg = tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                          num_decoder_layers=2, num_heads=4, pad_token_id=0, eos_token_id=3,
                          decoder_start_token_id=0)
        return tf.T5ForConditionalGeneration(cfg).eval()
    cfg = tf.BartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        pad_token_id=0, bos_token_id=2, eos_token_id=3,
                        decoder_start_token_id=2, forced_eos_token_id=None)
    return tf.BartForConditionalGeneration(cfg).eval()


def _one_by_one_causal(model, g: GenerationAttribution) -> None:
    ids = g.ids.unsqueeze(0)
    for k in range(len(g.generated)):
        pos, tok = g.prompt_length + k - 1, int(g.generated[k])
        one = lrpplan.explain(model, ids, target=lambda out: out.logits[:, pos, tok],
                              cache=False)
        torch.testing.assert_close(g.matrix[k], one.relevance[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g.scores[k], one.output[0])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_causal_lm_rows_equal_one_by_one(kind):
    model = causal_lm(kind)
    g = explain_generation(model, tokenizer(), "the cat sat on the", max_new_tokens=4,
                           min_new_tokens=4, cache=False)  # generate_kwargs pass through
    n, length = g.matrix.shape
    assert n == 4 and length == g.prompt_length + 4 and g.prompt_length == 5
    assert g.tokens[:5] == ["the", "cat", "sat", "on", "the"]
    for k in range(n):  # causal by construction (and checked by explain_generation)
        assert torch.equal(g.matrix[k, g.prompt_length + k:],
                           torch.zeros_like(g.matrix[k, g.prompt_length + k:]))
    assert all(led.closes() for led in g.attribution.ledgers)
    _one_by_one_causal(model, g)


def test_a_given_continuation_and_prompt_ids_without_tokenizer():
    model = causal_lm("gpt2")
    prompt = torch.tensor([4, 5, 6])
    cont = torch.tensor([7, 8, 9, 10])
    g = explain_generation(model, None, prompt, continuation=cont, cache=False)
    assert g.tokens is None and torch.equal(g.generated, cont)
    assert torch.equal(g.ids, torch.cat([prompt, cont]))
    _one_by_one_causal(model, g)


def test_padded_prompts_equal_each_prompt_alone():
    model = causal_lm("gpt2")
    tok = tokenizer()
    prompts = ["the cat sat on the", "a dog ran"]
    both = explain_generation(model, tok, prompts, max_new_tokens=3, min_new_tokens=3,
                              cache=False)
    assert isinstance(both, list) and len(both) == 2
    for g, prompt in zip(both, prompts):
        alone = explain_generation(model, tok, prompt, continuation=g.generated, cache=False)
        assert alone.tokens == g.tokens
        torch.testing.assert_close(g.matrix, alone.matrix, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g.scores, alone.scores, rtol=1e-4, atol=1e-5)
    # the pad positions (left padding) of the padded batch got exactly nothing
    rel = both[0].attribution.relevance  # [2, N, L]
    pads = len(prompts[0].split()) - len(prompts[1].split())
    assert pads == 2 and rel.shape[0] == 2
    assert torch.equal(rel[1, :, :pads], torch.zeros_like(rel[1, :, :pads]))
    assert rel[1, :, pads:].abs().sum() > 0


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_encoder_decoder_rows_equal_one_by_one(kind):
    model = seq2seq(kind)
    g = explain_generation(model, tokenizer(), "the big red dog", max_new_tokens=3,
                           min_new_tokens=3, cache=False)
    s = g.encoder_length
    assert s == 4 and g.prompt_length == s + 1 and g.matrix.shape == (3, s + 4)
    enc = g.ids[:s].unsqueeze(0)
    start = torch.tensor([[model.config.decoder_start_token_id]])
    dec = torch.cat([start, g.generated.unsqueeze(0)], 1)[:, :3]
    from lrpplan.integrations.generation import _Seq2Seq
    wrapped = _Seq2Seq(model)
    for k in range(3):
        tok = int(g.generated[k])
        one = lrpplan.explain(wrapped, enc, dec, target=lambda out: out[:, k, tok],
                              attention_mask=torch.ones_like(enc), cache=False)
        r_enc, r_dec = one.relevance
        torch.testing.assert_close(g.matrix[k, :s], r_enc[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g.matrix[k, s:s + 3], r_dec[0], rtol=1e-5, atol=1e-7)
        assert torch.equal(g.matrix[k, s + 1 + k:], torch.zeros_like(g.matrix[k, s + 1 + k:]))
        assert r_enc.abs().sum() > 0  # the encoder input gets relevance


def test_renderers(tmp_path):
    model = causal_lm("gpt2")
    g = explain_generation(model, tokenizer(), "the cat sat", max_new_tokens=2,
                           min_new_tokens=2, cache=False)
    png = tmp_path / "gen.png"
    img = g.to_png(png)
    assert png.exists() and img.size[0] > g.matrix.shape[1] * 22
    page = g.to_html(tmp_path / "gen.html")
    assert page.count('class="tok gen"') == 2 and "onmouseenter" in page
    assert (tmp_path / "gen.html").read_text() == page
    text = g.to_terminal(color=False).splitlines()
    assert len(text) == 2 and text[0].startswith(repr(g.tokens[3]).rjust(14))


@pytest.mark.parametrize("late", [(0, 3), (1, 4), (2, 5), (0, 5)])
def test_relevance_at_or_after_a_generated_token_is_refused(late):
    """The causal check: 3 generated tokens after a 3-token prompt (context 6); token k's row
    may be non-zero only before position 3 + k."""
    from lrpplan.integrations.generation import _result

    class _Attr:
        output = torch.ones(1, 3)

    matrix = torch.tril(torch.ones(3, 6), diagonal=2)  # row k: positions 0 .. 2 + k
    new = torch.tensor([4, 5, 6])
    ok = _result(None, torch.arange(6), matrix, new, _Attr(), 0, 3, 0)
    torch.testing.assert_close(ok.matrix, matrix)
    bad = matrix.clone()
    bad[late] = 0.5
    with pytest.raises(AssertionError, match=f"generated token {late[0]} "):
        _result(None, torch.arange(6), bad, new, _Attr(), 0, 3, 0)
