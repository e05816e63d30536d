"""Custom ``torch.autograd.Function`` nodes, backward hooks and compiled regions."""
from __future__ import annotations
