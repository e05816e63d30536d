"""Padded batches equal one-by-one explanations (issue 13, point 3).

With an ``attention_mask`` a causal LM's explained position is each sample's last real token,
for left and right padding; pad tokens get exactly zero relevance; each sample of a padded batch
gets the relevance it gets alone (≤ 1e-4 relative, fp32). The lone sample is the reference: it
has no padding, so nothing about masks can be wrong there.
"""
from __future__ import annotations

import pytest
import torch

import lrpplan

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.zoo

VOCAB = 64
PROMPTS = [[5, 9, 13, 22, 7, 31], [11, 4, 40]]  # lengths 6 and 3


def _llama(attn):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32,
                                   pad_token_id=0)
    cfg._attn_implementation = attn
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2(attn):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                  n_positions=32, pad_token_id=0)
    cfg._attn_implementation = attn
    return transformers.GPT2LMHeadModel(cfg).eval()


def _batch(side):
    t = max(len(p) for p in PROMPTS)
    ids = torch.zeros(len(PROMPTS), t, dtype=torch.long)
    mask = torch.zeros(len(PROMPTS), t, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        sl = slice(t - len(p), t) if side == "left" else slice(0, len(p))
        ids[i, sl] = torch.tensor(p)
        mask[i, sl] = 1
    # positions count real tokens (what generate() passes); pads get position 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def _max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("factory", [_llama, _gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_lm_padded_batch_equals_one_by_one(factory, attn, side):
    torch.manual_seed(0)
    model = factory(attn)
    ids, mask, pos = _batch(side)
    batch = lrpplan.explain(model, ids, attention_mask=mask, position_ids=pos, cache=False)
    assert torch.isfinite(batch.relevance).all()
    for i, p in enumerate(PROMPTS):
        alone_ids = torch.tensor([p])
        alone = lrpplan.explain(model, alone_ids, cache=False)
        real = mask[i].bool()
        # the explained token is the one explained alone (the last real token's argmax)
        assert int(batch.target[i]) == int(alone.target[0])
        torch.testing.assert_close(batch.output[i], alone.output[0], rtol=1e-4, atol=1e-5)
        assert _max_rel(batch.relevance[i, real], alone.relevance[0]) <= 1e-4
        assert torch.count_nonzero(batch.relevance[i, ~real]) == 0  # exactly zero at pads


def test_right_padding_explains_the_last_real_token_not_a_pad():
    torch.manual_seed(1)
    model = _llama("sdpa")
    ids, mask, pos = _batch("right")
    attr = lrpplan.explain(model, ids, attention_mask=mask, position_ids=pos, cache=False)
    logits = model(ids, attention_mask=mask, position_ids=pos).logits
    last = mask.sum(-1) - 1
    expected = logits[torch.arange(2), last].max(-1).values
    torch.testing.assert_close(attr.output, expected.detach(), rtol=1e-5, atol=1e-6)


def _bart():
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1,
                                  decoder_layers=1, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=32,
                                  pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                  decoder_start_token_id=2, dropout=0.0)
    return transformers.BartForConditionalGeneration(cfg).eval()


def _t5():
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                num_decoder_layers=1, num_heads=4, dropout_rate=0.0,
                                pad_token_id=0, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("factory", [_bart, _t5], ids=["bart", "t5"])
def test_seq2seq_padded_encoder_batch_equals_one_by_one(factory):
    torch.manual_seed(2)
    model = factory()
    pad = model.config.pad_token_id
    t = max(len(p) for p in PROMPTS)
    ids = torch.full((2, t), pad, dtype=torch.long)
    mask = torch.zeros(2, t, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        ids[i, :len(p)] = torch.tensor(p)
        mask[i, :len(p)] = 1
    dec = torch.tensor([[2, 17, 23], [2, 17, 23]])
    batch = lrpplan.explain(model, ids, attention_mask=mask, decoder_input_ids=dec, cache=False)
    assert torch.isfinite(batch.relevance).all()
    for i, p in enumerate(PROMPTS):
        alone = lrpplan.explain(model, torch.tensor([p]), decoder_input_ids=dec[:1],
                                cache=False)
        real = mask[i].bool()
        assert int(batch.target[i]) == int(alone.target[0])
        assert _max_rel(batch.relevance[i, real], alone.relevance[0]) <= 1e-4
        assert torch.count_nonzero(batch.relevance[i, ~real]) == 0


def test_decoder_attention_mask_picks_the_decoder_position():
    torch.manual_seed(3)
    model = _bart()
    ids = torch.tensor([PROMPTS[0]])
    dec = torch.tensor([[2, 17, 23, 1]])
    dmask = torch.tensor([[1, 1, 1, 0]])
    attr = lrpplan.explain(model, ids, decoder_input_ids=dec, decoder_attention_mask=dmask,
                           cache=False)
    logits = model(ids, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
    torch.testing.assert_close(attr.output, logits[:, 2].max(-1).values.detach(), rtol=1e-5,
                               atol=1e-6)
