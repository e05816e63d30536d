"""Recurrent layers (LSTM, GRU, RNN): decomposed cells and fused kernels."""
from __future__ import annotations
