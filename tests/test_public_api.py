"""The public surface of ``lrpplan`` is pinned: adding or removing a name is a deliberate act."""
from __future__ import annotations

import lrpplan

PUBLIC = {
    "Attribution", "CacheWarning", "Explainer", "GraphFreedError", "InvalidInputError",
    "LRPError", "LRPWarning", "Ledger", "NonFiniteError", "PairAttribution", "Plan", "PlanCache", "PlanError",
    "PlanMismatchError", "RuleError", "RuleSet", "UnrecoverableValueError", "UnsupportedOperation",
    "attribute", "bilrp", "coverage", "explain", "explain_dataset", "register_function", "rule_table",
    "__version__",
}


def test_all_is_pinned():
    assert set(lrpplan.__all__) == PUBLIC


def test_every_public_name_exists_and_errors_share_a_base():
    for name in PUBLIC:
        assert hasattr(lrpplan, name), name
    for name in ("GraphFreedError", "InvalidInputError", "NonFiniteError", "PlanError",
                 "PlanMismatchError", "RuleError", "UnrecoverableValueError",
                 "UnsupportedOperation"):
        assert issubclass(getattr(lrpplan, name), lrpplan.LRPError), name


def test_importing_lrpplan_does_not_import_hypothesis():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import sys, lrpplan; "
                          "print('hypothesis' in sys.modules)"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
