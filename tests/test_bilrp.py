"""BiLRP (lrpplan.bilrp): relevance of input pairs for a similarity, against a float64
brute-force reference built from Jacobians (on bias-free ReLU networks LRP-0 is gradient × input,
so the relevance of input i for embedding dimension d is J[d, i] · x_i, and the pair matrix is
Σ_d (J_a[d] · a) ⊗ (J_b[d] · b)), and against conservation (the pairs sum to the similarity)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpplan
from lrpplan.pairs import pair_matrix, patches

EPS = 1e-12
RULES = lrpplan.RuleSet.preset("epsilon", epsilon=EPS)


def brute_force_pairs(model, a, b, reduce=lambda r: r):
    """Pairs from the Jacobian of each embedding, one sample at a time, float64."""
    out = []
    for i in range(a.shape[0]):
        ja = torch.autograd.functional.jacobian(lambda x: model(x[None])[0], a[i])
        jb = torch.autograd.functional.jacobian(lambda x: model(x[None])[0], b[i])
        ra = reduce((ja * a[i]).reshape(1, ja.shape[0], *a.shape[1:]))[0]  # [D, *units]
        rb = reduce((jb * b[i]).reshape(1, jb.shape[0], *b.shape[1:]))[0]
        d = ra.shape[0]
        out.append(torch.einsum("di,dj->ij", ra.reshape(d, -1), rb.reshape(d, -1))
                   .reshape(*ra.shape[1:], *rb.shape[1:]))
    return torch.stack(out)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 16, bias=False), nn.ReLU(), nn.Linear(16, 12, bias=False),
                         nn.ReLU(), nn.Linear(12, 5, bias=False)).double().eval()


class EmbeddingCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2))
        self.proj = nn.Linear(8 * 2 * 2, 6, bias=False)

    def forward(self, x):
        return self.proj(self.features(x).flatten(1))


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_pairs_match_brute_force_on_a_bias_free_mlp():
    model = mlp()
    a = torch.randn(3, 7, dtype=torch.float64)
    b = torch.randn(3, 7, dtype=torch.float64)
    res = lrpplan.bilrp(model, a, b, rules=RULES, cache=False)
    assert res.pairs.shape == (3, 7, 7)
    ref = brute_force_pairs(model, a, b)
    assert rel_err(res.pairs, ref) <= 1e-9
    sim = (model(a) * model(b)).sum(1).detach()
    assert torch.allclose(res.similarity, sim, rtol=1e-12, atol=0)
    # conservation: the pair matrix sums to the similarity (bias-free, ε ≈ 0)
    assert torch.allclose(res.pairs.sum((1, 2)), sim, rtol=1e-9, atol=1e-12)
    assert res.left.relevance.shape == (3, 5, 7)  # one map per embedding dimension


def test_image_pairs_by_patches_match_brute_force():
    torch.manual_seed(1)
    model = EmbeddingCNN().double().eval()
    a = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    b = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    res = lrpplan.bilrp(model, a, b, units=patches(2), rules=RULES, cache=False, chunk=4)
    assert res.pairs.shape == (2, 4, 4, 4, 4)  # patch × patch
    ref = brute_force_pairs(model, a, b, reduce=patches(2))
    assert rel_err(res.pairs, ref) <= 1e-9
    sim = (model(a) * model(b)).sum(1).detach()
    assert torch.allclose(res.pairs.sum((1, 2, 3, 4)), sim, rtol=1e-9, atol=1e-12)


def test_chunking_does_not_change_the_pairs():
    model = mlp()
    a, b = torch.randn(2, 7, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64)
    whole = lrpplan.bilrp(model, a, b, rules="epsilon", cache=False, chunk=None)
    for chunk in (1, 2, 3):
        part = lrpplan.bilrp(model, a, b, rules="epsilon", cache=False, chunk=chunk)
        assert torch.allclose(part.pairs, whole.pairs, rtol=0, atol=1e-12)


def test_cosine_of_normalised_embeddings_is_conserved():
    """Normalising inside the model: the pairs explain the cosine similarity."""
    base = mlp()

    class Unit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = base

        def forward(self, x):
            e = self.net(x)
            return e / e.norm(dim=-1, keepdim=True)

    model = Unit().eval()
    a, b = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    res = lrpplan.bilrp(model, a, b, rules=RULES, cache=False)
    cos = torch.nn.functional.cosine_similarity(base(a), base(b), dim=1).detach()
    assert torch.allclose(res.similarity, cos, rtol=1e-12, atol=1e-15)
    assert torch.allclose(res.pairs.sum((1, 2)), cos, rtol=1e-8, atol=1e-12)


def test_embedding_callable_and_bad_inputs():
    model = mlp()
    a, b = torch.randn(1, 7, dtype=torch.float64), torch.randn(1, 7, dtype=torch.float64)

    class Dict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x):
            return {"emb": self.net(x), "other": x}

    res = lrpplan.bilrp(Dict(), a, b, embedding=lambda out: out["emb"], rules=RULES, cache=False)
    assert rel_err(res.pairs, brute_force_pairs(model, a, b)) <= 1e-9
    with pytest.raises(lrpplan.InvalidInputError, match="embedding"):
        lrpplan.bilrp(nn.Sequential(model, nn.Flatten(0)), a, b, cache=False)
    with pytest.raises(lrpplan.InvalidInputError, match="share"):
        pair_matrix(torch.zeros(1, 5, 7), torch.zeros(1, 4, 7))
    with pytest.raises(lrpplan.InvalidInputError, match="patches"):
        patches(2)(torch.zeros(1, 5, 3, 7, 7))
