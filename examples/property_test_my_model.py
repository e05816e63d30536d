"""Property-test conservation of *your* model and *your* rule choice with hypothesis.

LRP redistributes the explained score; it should not create or lose relevance except where a rule
absorbs it on purpose (biases, the ε stabiliser), and lrpplan's ledger books those shares.
``lrpplan.testing`` turns that into properties hypothesis checks on many random inputs:

- ``assert_conserves``: relevance is finite and the ledger closes
  (start = at inputs + absorbed); optionally a minimum share must reach the inputs;
- ``assert_replay_matches_trace``: the compiled plan replayed on another batch gives the
  relevance of a fresh trace.

Run it as a script (about ten seconds; it calls the property tests directly)::

    python examples/property_test_my_model.py

or let pytest collect it::

    python -m pytest examples/property_test_my_model.py

``HYPOTHESIS_PROFILE=long`` runs 500 examples per property instead of 40.
"""
from __future__ import annotations

import torch
from hypothesis import given
from torch import nn

import lrpplan
from lrpplan import testing


# ---------------------------------------------------------------------------------------------
# 1. your model


class TinyResNet(nn.Module):
    """A small CNN: conv stem, one residual block with BatchNorm, average pooling, classifier."""

    def __init__(self, bias: bool = True, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(8, affine=bias)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=bias)
        self.fc = nn.Linear(8, classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.conv2(torch.relu(self.bn(self.conv1(h)))))
        h = torch.nn.functional.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.fc(h)


def make_model(bias: bool = True) -> TinyResNet:
    """Deterministic weights; BatchNorm statistics that shift the activations (if ``bias``)."""
    torch.manual_seed(0)
    model = TinyResNet(bias=bias)
    with torch.no_grad():
        if bias:
            model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


MODEL = make_model()
SHAPES = [(3, 6, 6)]  # per-sample input shape(s), without the batch dimension
CLASSES = 5

# 2. your rule choice: z+ on the convolutions, ε elsewhere
RULES = lrpplan.RuleSet.preset("epsilon-plus", epsilon=1e-6)


# ---------------------------------------------------------------------------------------------
# 3. the properties


@testing.profile()
@given(inputs=testing.inputs_for(MODEL, shapes=SHAPES, max_batch=3),
       target=testing.targets_for(MODEL, classes=CLASSES))
def test_ledger_closes(inputs, target):
    """Whatever the input and the explained class: finite relevance, and the books close."""
    testing.assert_conserves(MODEL, *inputs, rules=RULES, target=target)


@testing.profile()
@given(inputs=testing.inputs_for(MODEL, shapes=SHAPES, min_batch=2, max_batch=2))
def test_replay_matches_trace(inputs):
    """The cached plan, replayed on a batch of another size, equals a fresh trace."""
    testing.assert_replay_matches_trace(MODEL, *inputs, rules=RULES)


BIAS_FREE = make_model(bias=False).double()


@testing.profile()
@given(inputs=testing.inputs_for(BIAS_FREE, shapes=SHAPES, batch=1))
def test_bias_free_variant_puts_everything_on_the_input(inputs):
    """Without biases (and with a negligible ε) these rules are conservative: ≥ 99.9 % of the
    explained score must reach the input pixels."""
    rules = lrpplan.RuleSet.preset("epsilon-plus", epsilon=1e-12)
    with torch.no_grad():
        score = BIAS_FREE(*inputs).max(-1).values
    if float(score.abs().min()) < 1e-6:  # a (near) zero score has no meaningful share
        return
    testing.assert_conserves(BIAS_FREE, *inputs, rules=rules, tolerance=1e-8,
                             min_input_share=0.999)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    torch.set_num_threads(1)  # models this small run faster on one thread (no OpenMP hand-offs)
    for test in (test_ledger_closes, test_replay_matches_trace,
                 test_bias_free_variant_puts_everything_on_the_input):
        test()  # hypothesis runs the property on every generated example; raises on a failure
        print(f"ok  {test.__name__}")

    # Where did relevance go? One input, per node: in, out, absorbed (biases, BatchNorm shift, ε).
    x = torch.randn(1, *SHAPES[0], generator=torch.Generator().manual_seed(1))
    print()
    print(testing.conservation_report(MODEL, x, rules=RULES).summary(top=6))


if __name__ == "__main__":
    main()
