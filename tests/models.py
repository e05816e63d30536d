"""A zoo of small eval-mode models covering the autograd patterns users hit.

Every factory is ``factory(batch=2, seq=5) -> (model, inputs)``:

- ``model`` is in eval mode; its weights depend only on the factory (a private seeded generator),
  so calling a factory again with another ``batch``/``seq`` gives the *same* model and new inputs;
- ``inputs`` is a tuple of positional inputs (float features or integer token ids) drawn from the
  global RNG (seeded per test by ``tests/conftest.py``); ``seq`` is the sequence length of the
  sequence models and ignored by the others.

Registries:

``MODELS``     every pattern (float32).
``BIAS_FREE``  models whose rules are conservative when no bias/constant absorbs relevance (for the
               ≥ 0.999-at-inputs ledger checks).
``BATCH_COUPLED`` names of models whose output mixes the samples of a batch (a full ``.sum()`` or
               ``.mean()``), so the per-sample batch-consistency check does not apply.
``SEQUENCE``   names of models taking a sequence dimension (``seq`` changes their input shape).
``ENGINE_BUGS`` model name -> reason, for models explain() currently fails on (strict xfails).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

Factory = Callable[..., tuple[nn.Module, tuple]]

_SEED = 1234


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic weights from a private generator; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:  # norm weights
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# CNNs


class VGGish(nn.Module):
    """conv/relu/maxpool x2 -> flatten -> linear/relu/linear."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * 2 * 2, 16, bias=bias), nn.ReLU(),
            nn.Linear(16, 5, bias=bias),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def vgg_cnn(batch: int = 2, seq: int = 5):
    return _init(VGGish(), 1), (torch.randn(batch, 3, 8, 8),)


def vgg_cnn_bias_free(batch: int = 2, seq: int = 5):
    return _init(VGGish(bias=False), 2), (torch.randn(batch, 3, 8, 8),)


class ResBlockNet(nn.Module):
    """stem conv -> BasicBlock (``out += identity`` in place, ReLU(inplace=True)) -> pool -> fc."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        c = 6
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=bias)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 4, bias=bias)

    def forward(self, x):
        x = self.relu(self.stem(x))
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return self.fc(torch.flatten(self.pool(out), 1))


def _zero_shift_bn(model: nn.Module) -> nn.Module:
    """BatchNorms with running mean 0 and bias 0 (a pure per-channel scale, no absorption)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.bias.zero_()
    return model


def resnet_block(batch: int = 2, seq: int = 5):
    return _init(ResBlockNet(), 3), (torch.randn(batch, 3, 6, 6),)


def resnet_block_bias_free(batch: int = 2, seq: int = 5):
    return _zero_shift_bn(_init(ResBlockNet(bias=False), 4)), (torch.randn(batch, 3, 6, 6),)


# ---------------------------------------------------------------------------------------------
# MLP patterns


class MLPSum(nn.Module):
    """Ends in a full ``.sum()`` (a 0-d output; couples the batch)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8, bias=bias)
        self.fc2 = nn.Linear(8, 3, bias=bias)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))).sum()


class MLPMean(MLPSum):
    """Ends in a full ``.mean()``."""

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))).mean()


def mlp_full_sum(batch: int = 2, seq: int = 5):
    return _init(MLPSum(), 5), (torch.randn(batch, 5),)


def mlp_full_mean(batch: int = 2, seq: int = 5):
    return _init(MLPMean(), 6), (torch.randn(batch, 5),)


def mlp_full_sum_bias_free(batch: int = 2, seq: int = 5):
    return _init(MLPSum(bias=False), 7), (torch.randn(batch, 5),)


class SplitChunk(nn.Module):
    """``split_with_sizes`` and ``chunk`` of a hidden layer, branches recombined by ``cat``."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12, bias=bias)
        self.fc2 = nn.Linear(12, 4, bias=bias)

    def forward(self, x):
        h = self.fc1(x)
        a, b = torch.split(h, [4, 8], dim=-1)
        c, d = b.chunk(2, dim=-1)
        return self.fc2(torch.cat([torch.relu(a), torch.tanh(c), d], dim=-1))


def split_chunk(batch: int = 2, seq: int = 5):
    return _init(SplitChunk(), 8), (torch.randn(batch, 6),)


def split_chunk_bias_free(batch: int = 2, seq: int = 5):
    return _init(SplitChunk(bias=False), 9), (torch.randn(batch, 6),)


class InplaceView(nn.Module):
    """In-place writes into views of a hidden activation (``CopySlices`` nodes)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8, bias=bias)
        self.fc2 = nn.Linear(8, 3, bias=bias)

    def forward(self, x):
        h = self.fc1(x)
        h[:, 0] = 0.0
        view = h[:, 2:5]
        view.masked_fill_(view < -0.5, 0.0)
        return self.fc2(torch.relu(h))


def inplace_view(batch: int = 2, seq: int = 5):
    return _init(InplaceView(), 10), (torch.randn(batch, 6),)


def inplace_view_bias_free(batch: int = 2, seq: int = 5):
    return _init(InplaceView(bias=False), 11), (torch.randn(batch, 6),)


class ConstScale(nn.Module):
    """``const * h`` and ``h / const``."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7, bias=bias)
        self.fc2 = nn.Linear(7, 3, bias=bias)

    def forward(self, x):
        h = 2.5 * self.fc1(x)
        h = torch.relu(h) / 3.0
        return self.fc2(h)


def const_scale(batch: int = 2, seq: int = 5):
    return _init(ConstScale(), 12), (torch.randn(batch, 5),)


def const_scale_bias_free(batch: int = 2, seq: int = 5):
    return _init(ConstScale(bias=False), 13), (torch.randn(batch, 5),)


class SharedWeights(nn.Module):
    """One Linear applied twice (weight sharing)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6, bias=bias)
        self.head = nn.Linear(6, 3, bias=bias)

    def forward(self, x):
        h = torch.relu(self.shared(x))
        h = torch.relu(self.shared(h))
        return self.head(h)


def weight_sharing(batch: int = 2, seq: int = 5):
    return _init(SharedWeights(), 14), (torch.randn(batch, 6),)


def weight_sharing_bias_free(batch: int = 2, seq: int = 5):
    return _init(SharedWeights(bias=False), 15), (torch.randn(batch, 6),)


class DeepChain(nn.Module):
    """``depth`` x (Linear(4, 4) + tanh): far deeper than Python's recursion limit allows."""

    def __init__(self, depth: int = 2000, bias: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4, bias=bias) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def deep_chain(batch: int = 2, seq: int = 5, depth: int = 2000):
    """A 2,000-layer chain whose activations stay positive and O(1) all the way down.

    Weights ``1.1·I + U[0, 0.02]``, zero biases and positive inputs keep every pre-activation
    positive, so the ε-rule never divides by a near-zero sum of mixed signs and relevance is
    conserved layer after layer (up to ε).
    """
    model = DeepChain(depth)
    gen = torch.Generator().manual_seed(16)
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.copy_(1.1 * torch.eye(4) + 0.02 * torch.rand(4, 4, generator=gen))
            layer.bias.zero_()
    return model.eval(), (torch.rand(batch, 4) + 0.5,)


class SwiGLU(nn.Module):
    """Gated MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.gate = nn.Linear(6, 10, bias=bias)
        self.up = nn.Linear(6, 10, bias=bias)
        self.down = nn.Linear(10, 4, bias=bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def swiglu_mlp(batch: int = 2, seq: int = 5):
    return _init(SwiGLU(), 17), (torch.randn(batch, 6),)


def swiglu_mlp_bias_free(batch: int = 2, seq: int = 5):
    return _init(SwiGLU(bias=False), 18), (torch.randn(batch, 6),)


class TwoInputs(nn.Module):
    """Two float inputs of different shapes, merged by ``cat``."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fa = nn.Linear(4, 6, bias=bias)
        self.fb = nn.Linear(7, 6, bias=bias)
        self.head = nn.Linear(12, 3, bias=bias)

    def forward(self, a, b):
        return self.head(torch.relu(torch.cat([self.fa(a), self.fb(b)], dim=-1)))


def two_inputs(batch: int = 2, seq: int = 5):
    return _init(TwoInputs(), 19), (torch.randn(batch, 4), torch.randn(batch, 7))


def two_inputs_bias_free(batch: int = 2, seq: int = 5):
    return _init(TwoInputs(bias=False), 20), (torch.randn(batch, 4), torch.randn(batch, 7))


# ---------------------------------------------------------------------------------------------
# sequence models: [B, T, D] -> [B, T, C] (explain() explains the last position)

D = 8


class RMSNorm(nn.Module):
    """Hand-written RMSNorm: pow, mean, add eps, rsqrt, mul, mul weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.weight


class RMSNormBlock(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc_in = nn.Linear(D, D, bias=bias)
        self.norm = RMSNorm(D)
        self.fc_out = nn.Linear(D, 4, bias=bias)

    def forward(self, x):
        h = self.fc_in(x)
        return self.fc_out(torch.relu(self.norm(h)))


def rmsnorm_block(batch: int = 2, seq: int = 5):
    return _init(RMSNormBlock(), 21), (torch.randn(batch, seq, D),)


def rmsnorm_block_bias_free(batch: int = 2, seq: int = 5):
    return _init(RMSNormBlock(bias=False), 22), (torch.randn(batch, seq, D),)


class LayerNormBlock(nn.Module):
    """Pre-norm residual MLP block with LayerNorm."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D, bias=bias)
        self.fc1 = nn.Linear(D, 2 * D, bias=bias)
        self.fc2 = nn.Linear(2 * D, D, bias=bias)
        self.head = nn.Linear(D, 4, bias=bias)

    def forward(self, x):
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(x)


def layernorm_block(batch: int = 2, seq: int = 5):
    return _init(LayerNormBlock(), 23), (torch.randn(batch, seq, D),)


def layernorm_block_bias_free(batch: int = 2, seq: int = 5):
    return _init(LayerNormBlock(bias=False), 24), (torch.randn(batch, seq, D),)


class Attention(nn.Module):
    """Single-head-per-slice multi-head self-attention.

    ``kind``: ``"sdpa"`` (F.scaled_dot_product_attention) or ``"explicit"``
    (q kᵀ / sqrt(d) [+ mask] -> softmax -> @ v).
    ``mask``: ``None`` (bidirectional), ``"causal"`` (SDPA: ``is_causal=True``; explicit:
    ``masked_fill`` with -inf), ``"bool"`` (SDPA: a boolean ``attn_mask`` hiding the first key
    from all queries but the first), ``"additive"`` (a float mask added to the scores).
    """

    def __init__(self, kind: str, mask: str | None, heads: int = 2, bias: bool = True) -> None:
        super().__init__()
        self.kind, self.mask, self.heads = kind, mask, heads
        self.qkv = nn.Linear(D, 3 * D, bias=bias)
        self.proj = nn.Linear(D, D, bias=bias)
        self.head = nn.Linear(D, 4, bias=bias)

    def _float_mask(self, t: int, device) -> torch.Tensor:
        m = torch.zeros(t, t, device=device)
        m[1:, 0] = -1e4  # every query but the first ignores the first key
        return m

    def forward(self, x):
        b, t, _ = x.shape
        hd = D // self.heads
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (z.view(b, t, self.heads, hd).transpose(1, 2) for z in (q, k, v))
        if self.kind == "sdpa":
            if self.mask == "causal":
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif self.mask == "bool":
                keep = torch.ones(t, t, dtype=torch.bool, device=x.device)
                keep[1:, 0] = False
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            elif self.mask == "additive":
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=self._float_mask(t, x.device))
            else:
                o = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
            if self.mask == "causal":
                future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            elif self.mask == "additive":
                scores = scores + self._float_mask(t, x.device)
            o = torch.softmax(scores, dim=-1) @ v
        o = o.transpose(1, 2).reshape(b, t, D)
        return self.head(x + self.proj(o))


def _attention(name: str, kind: str, mask: str | None, seed: int) -> Factory:
    def factory(batch: int = 2, seq: int = 5):
        return _init(Attention(kind, mask), seed), (torch.randn(batch, seq, D),)
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{kind} attention, mask={mask!r}"
    return factory


sdpa_attention_bidirectional = _attention("sdpa_attention_bidirectional", "sdpa", None, 25)
sdpa_attention_causal = _attention("sdpa_attention_causal", "sdpa", "causal", 26)
sdpa_attention_bool_mask = _attention("sdpa_attention_bool_mask", "sdpa", "bool", 27)
sdpa_attention_additive_mask = _attention("sdpa_attention_additive_mask", "sdpa", "additive", 28)
explicit_attention_bidirectional = _attention("explicit_attention_bidirectional", "explicit",
                                              None, 29)
explicit_attention_causal = _attention("explicit_attention_causal", "explicit", "causal", 30)
explicit_attention_additive_mask = _attention("explicit_attention_additive_mask", "explicit",
                                              "additive", 31)

VOCAB = 20


class TokenModel(nn.Module):
    """Embedding of integer token ids -> LayerNorm -> MLP -> per-position logits."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.norm = nn.LayerNorm(D, bias=bias)
        self.fc = nn.Linear(D, D, bias=bias)
        self.head = nn.Linear(D, 5, bias=bias)

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.norm(self.embed(ids)))))


class TokenPositional(TokenModel):
    """GPT-2 style input: token embedding + learned position embedding, then a residual block.

    The z-rule of ``tok(ids) + pos(arange(T))`` needs both embedding outputs, which autograd
    saved nowhere: a Promise re-runs the embedding lookups. The position branch leads to no
    explained input, so it absorbs its share like a bias.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(32, D)

    def forward(self, ids):
        t = ids.shape[1]
        h = self.embed(ids) + self.pos(torch.arange(t, device=ids.device))
        h = h + torch.relu(self.fc(self.norm(h)))
        return self.head(h)


def embedding_tokens(batch: int = 2, seq: int = 5):
    return _init(TokenModel(), 32), (torch.randint(0, VOCAB, (batch, seq)),)


def embedding_tokens_bias_free(batch: int = 2, seq: int = 5):
    return _init(TokenModel(bias=False), 33), (torch.randint(0, VOCAB, (batch, seq)),)


def embedding_positional(batch: int = 2, seq: int = 5):
    return _init(TokenPositional(), 34), (torch.randint(0, VOCAB, (batch, seq)),)


# ---------------------------------------------------------------------------------------------
# registries


def _registry(*factories: Factory) -> dict[str, Factory]:
    return {f.__name__: f for f in factories}


MODELS: dict[str, Factory] = _registry(
    vgg_cnn, vgg_cnn_bias_free, resnet_block, mlp_full_sum, mlp_full_mean, split_chunk,
    inplace_view, const_scale, weight_sharing, swiglu_mlp, two_inputs, rmsnorm_block,
    layernorm_block, sdpa_attention_bidirectional, sdpa_attention_causal,
    sdpa_attention_bool_mask, sdpa_attention_additive_mask, explicit_attention_bidirectional,
    explicit_attention_causal, explicit_attention_additive_mask, embedding_tokens,
    embedding_positional,
)

BIAS_FREE: dict[str, Factory] = _registry(
    vgg_cnn_bias_free, resnet_block_bias_free, mlp_full_sum_bias_free, split_chunk_bias_free,
    inplace_view_bias_free, const_scale_bias_free, weight_sharing_bias_free,
    swiglu_mlp_bias_free, two_inputs_bias_free, rmsnorm_block_bias_free,
    layernorm_block_bias_free, embedding_tokens_bias_free,
)

BATCH_COUPLED = frozenset({"mlp_full_sum", "mlp_full_mean", "mlp_full_sum_bias_free"})

SEQUENCE = frozenset(
    name for name, f in {**MODELS, **BIAS_FREE}.items()
    if "attention" in name or name.startswith(("rmsnorm", "layernorm", "embedding"))
)

#: model name -> why explain() fails on it today (engine bugs; remove an entry once fixed —
#: the tests mark these params ``xfail(strict=True)``, so a fix shows up as XPASS)
ENGINE_BUGS: dict[str, str] = {}


class Cube(torch.autograd.Function):
    """A custom autograd.Function lrpplan cannot know."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g
