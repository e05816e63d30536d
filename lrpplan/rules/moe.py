"""Mixture-of-experts: grouped matrix products and the routing around them."""
from __future__ import annotations
