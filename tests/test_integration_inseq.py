"""lrpplan as an Inseq method (``inseq.load_model(model, "lrpplan", ...)``) on a tiny GPT-2 and a
tiny T5 built from configs with a word-level tokenizer built offline.

The reference for Inseq's per-step attributions is ``explain_generation``'s relevance matrix
(one replay over the whole sequence, no Inseq involved): Inseq explains step k with the prefix
alone, so on a causal model the two must agree token for token.
"""
from __future__ import annotations

import re
import subprocess
import sys
import warnings

import pytest
import torch

inseq = pytest.importorskip("inseq")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import lrpplan  # noqa: E402
import lrpplan.integrations.inseq  # noqa: E402,F401 - registers the method
from lrpplan.integrations.transformers import explain_generation  # noqa: E402

from test_generation import causal_lm, seq2seq, tokenizer  # noqa: E402

pytestmark = [pytest.mark.zoo, pytest.mark.inseq]

PROMPT = "the cat sat on"


def _ids(tokens) -> torch.Tensor:
    return torch.tensor([t.id for t in tokens])


def _quiet_attribute(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lrpplan.LRPWarning)
        return model.attribute(*args, show_progress=False, **kwargs)


@pytest.mark.parametrize("rules", ["attnlrp", "cp-lrp"])
def test_gpt2_steps_equal_explain_generation_rows(rules):
    model = causal_lm("gpt2")
    kwargs = {} if rules == "attnlrp" else {"rules": rules}
    im = inseq.load_model(model, "lrpplan", tokenizer=tokenizer(), **kwargs)
    out = _quiet_attribute(im, PROMPT, generation_args={"max_new_tokens": 4, "do_sample": False})
    seq = out.sequence_attributions[0]
    ids = _ids(seq.target)
    n_prompt = len(PROMPT.split())
    assert len(ids) == n_prompt + 4 and out.info["attribution_method"] == "lrpplan"
    assert out.info["lrpplan_rules"] == rules
    assert out.info["attributed_fn"] == "logit_fn"  # this method's default: the logit
    ref = explain_generation(model, None, ids[:n_prompt], continuation=ids[n_prompt:],
                             rules=rules, cache=False)
    steps = seq.target_attributions  # [tokens, steps], NaN where a token is not yet there
    assert steps.shape == (len(ids), 4)
    for k in range(4):
        seen = n_prompt + k
        assert torch.isnan(steps[seen:, k]).all()
        torch.testing.assert_close(steps[:seen, k], ref.matrix[k, :seen].float(),
                                   rtol=1e-5, atol=1e-7)
    # the rules reach the method: the two presets give different numbers
    other = explain_generation(model, None, ids[:n_prompt], continuation=ids[n_prompt:],
                               rules="cp-lrp" if rules == "attnlrp" else "attnlrp", cache=False)
    assert (other.matrix - ref.matrix).abs().max() > 1e-4


def test_t5_source_and_target_prefix_equal_explain_generation_rows():
    model = seq2seq("t5")
    im = inseq.load_model(model, "lrpplan", tokenizer=tokenizer())
    with pytest.warns(lrpplan.LRPWarning, match="lrpplan \\(Inseq method\\)"):
        out = im.attribute(PROMPT, "the mat on the", attribute_target=True, show_progress=False)
    seq = out.sequence_attributions[0]
    src, tgt = _ids(seq.source), _ids(seq.target)  # tgt starts with the decoder start token
    n = len(tgt) - 1
    ref = explain_generation(model, None, src, continuation=tgt[1:], rules="attnlrp",
                             cache=False)
    s = len(src)
    assert ref.encoder_length == s
    torch.testing.assert_close(seq.source_attributions.T, ref.matrix[:, :s].float(),
                               rtol=1e-5, atol=1e-7)
    for k in range(n):
        torch.testing.assert_close(seq.target_attributions[:k + 1, k],
                                   ref.matrix[k, s:s + k + 1].float(), rtol=1e-5, atol=1e-7)
        assert torch.isnan(seq.target_attributions[k + 1:, k]).all()
    # the plan's assumptions reach the Inseq user: in info (and as the warning above); they are
    # those of the same model explained directly (node ids differ: Inseq feeds embeddings)
    def unnumbered(texts):
        return sorted(re.sub(r"#\d+", "#", t) for t in texts)

    assert out.info["lrpplan_assumptions"]
    assert unnumbered(out.info["lrpplan_assumptions"]) == unnumbered(ref.attribution.assumptions)


def test_convergence_delta_as_step_score():
    model = causal_lm("gpt2")
    im = inseq.load_model(model, "lrpplan", tokenizer=tokenizer(), rules="epsilon")
    out = _quiet_attribute(im, PROMPT, "the cat sat on the mat",
                           attribution_args={"return_convergence_delta": True})
    seq = out.sequence_attributions[0]
    ids = _ids(seq.target)
    ref = explain_generation(model, None, ids[:4], continuation=ids[4:], rules="epsilon",
                             cache=False)
    expected = ref.scores - ref.matrix.sum(1)  # score − Σ relevance, per generated token
    torch.testing.assert_close(seq.step_scores["deltas"], expected.float(), rtol=1e-4, atol=1e-6)
    assert expected.abs().max() > 1e-4  # biases absorb relevance: the delta is not zero


def test_registration_needs_only_the_import():
    code = ("import inseq, lrpplan.integrations.inseq as m; "
            "assert 'lrpplan' in inseq.list_feature_attribution_methods(); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr
