"""lrpplan: operation-level LRP on PyTorch's autograd graph, compiled into cached plans.

>>> import torch, lrpplan
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> attr = lrpplan.explain(model, torch.randn(2, 4), cache=False)
>>> attr.relevance.shape
torch.Size([2, 4])
"""
from __future__ import annotations

from .api import Attribution, Explainer, attribute, explain
from .pairs import PairAttribution, bilrp
from .cache import PlanCache
from .config import RuleSet
from .coverage import coverage, rule_table
from .dataset import explain_dataset
from .errors import (CacheWarning, GraphFreedError, InvalidInputError, LRPError, LRPWarning,
                     NonFiniteError, PlanError, PlanMismatchError, RuleError,
                     UnrecoverableValueError, UnsupportedOperation)
from .ledger import Ledger
from .plan import Plan
from .rules.custom import register_function

__version__ = "0.1.0"

__all__ = [
    "Attribution", "CacheWarning", "Explainer", "GraphFreedError", "InvalidInputError",
    "LRPError", "LRPWarning", "Ledger", "NonFiniteError", "PairAttribution", "Plan", "PlanCache",
    "PlanError",
    "PlanMismatchError", "RuleError", "RuleSet", "UnrecoverableValueError", "UnsupportedOperation",
    "attribute", "bilrp", "coverage", "explain", "explain_dataset", "register_function", "rule_table",
    "__version__",
]
