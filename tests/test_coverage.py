"""coverage() and the rule table."""
from __future__ import annotations

import re
from pathlib import Path

import torch

import lrpplan
from lrpplan.cli import main


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def _cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(36, 3)).eval()


def test_coverage_counts_every_node_of_the_graph():
    model = _cnn()
    x = torch.randn(1, 3, 8, 8)
    report = lrpplan.coverage(model, x)
    # independent count: walk the graph of a fresh forward ourselves
    out = model(x.requires_grad_(True))
    seen, stack = set(), [out.grad_fn]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        stack.extend(c for c, _ in n.next_functions)
    assert report.nodes == len(seen)
    assert report.covered_nodes == report.nodes and report.ratio == 1.0
    assert {r.node_type for r in report.rows} == {type(n).__name__ for n in seen}


class _WithCustom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(_Scale.apply(x))


def test_coverage_reports_an_uncovered_custom_function():
    report = lrpplan.coverage(_WithCustom(), torch.randn(2, 3))
    row = next(r for r in report.rows if r.node_type == "_ScaleBackward")
    assert not row.covered and report.covered_nodes == report.nodes - 1
    assert "_ScaleBackward" in report.error


def test_rules_cli_lists_every_registered_op(capsys):
    assert main(["rules"]) == 0
    text = capsys.readouterr().out
    names = set(re.findall(r"^\| (\w+) \|", text, re.M)) - {"node"}
    assert names == {name for name, spec in lrpplan.rules.OPS.items() if not spec.leaf}


def test_docs_rule_table_is_current():
    doc = (Path(__file__).parent.parent / "docs" / "rules.md").read_text()
    assert lrpplan.rule_table() in doc, "regenerate docs/rules.md with `lrpplan rules`"
