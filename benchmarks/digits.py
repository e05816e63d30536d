"""A small CNN on scikit-learn's 8×8 digits, trained in-process (shared by the digits example,
the faithfulness benchmark and its tests).

Data: ``sklearn.datasets.load_digits`` (1797 images, 8×8, integer intensities 0..16), scaled to
``[0, 1]`` by dividing by 16, split 75 / 25 stratified with a fixed seed: 1347 training and 450
held-out images. Training: Adam (lr 3e-3), batch 64, a fixed number of epochs, everything seeded
and single-process, so the same seed gives the same weights on the same machine and torch build.
It reaches about 97-98% test accuracy in a couple of seconds on 2 CPU cores.

Requires scikit-learn (``pip install scikit-learn``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: the input domain after scaling (the z-box bounds of the epsilon-gamma-box preset)
LOW, HIGH = 0.0, 1.0


@dataclass
class Digits:
    """Train/test split: images ``[N, 1, 8, 8]`` float32 in ``[0, 1]``, labels ``[N]`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def low(self) -> float:
        """The smallest pixel value in the data (0.0)."""
        return float(min(self.x_train.min(), self.x_test.min()))

    @property
    def high(self) -> float:
        """The largest pixel value in the data (1.0)."""
        return float(max(self.x_train.max(), self.x_test.max()))


def load_data(seed: int = 0, test_size: float = 0.25) -> Digits:
    """The digits split (450 held-out images with the default ``test_size``)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits benchmark needs scikit-learn: pip install scikit-learn") \
            from exc
    ds = load_digits()
    x = torch.tensor(ds.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(ds.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_size,
                                           random_state=seed, stratify=y.numpy())
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return Digits(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def make_model(seed: int = 0) -> nn.Module:
    """The demo CNN (``lrpplan.demo.make_model``), initialised from ``torch.manual_seed(seed)``:
    conv(1→16, 3×3) → ReLU → conv(16→32, 3×3) → ReLU → max-pool 2 → flatten →
    linear(512→64) → ReLU → linear(64→10): logits."""
    from lrpplan.demo import make_model as demo_model

    torch.manual_seed(seed)
    return demo_model()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y`` (the model is left in eval mode)."""
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def train(model: nn.Module, data: Digits, epochs: int = 12, seed: int = 0, lr: float = 3e-3,
          batch_size: int = 64) -> float:
    """Train in place with Adam and cross-entropy; returns the test accuracy (model in eval)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    n = len(data.y_train)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            opt.zero_grad()
            loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
    return accuracy(model, data.x_test, data.y_test)


def trained_model(seed: int = 0, epochs: int = 12) -> tuple[nn.Module, Digits, float]:
    """Load the data, build and train the model: ``(model in eval mode, data, test accuracy)``."""
    data = load_data(seed)
    model = make_model(seed)
    acc = train(model, data, epochs=epochs, seed=seed)
    return model.eval(), data, acc
