"""Errors in the user's factory, module or forward pass are one-line CLI errors (exit 1), not
tracebacks (issue 13, point 8)."""
from __future__ import annotations

import textwrap

import pytest

from lrpplan.cli import main

MODELS = textwrap.dedent('''
    import torch

    def broken_factory():
        raise RuntimeError("factory exploded")

    class BadForward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x.reshape(7, -1))

    def bad_forward():
        return BadForward().eval()
''')


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(MODELS)
    (tmp_path / "broken_module.py").write_text("import torch\nundefined_name + 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LRPPLAN_TRACEBACK", raising=False)
    return tmp_path


@pytest.mark.parametrize("spec, words", [
    ("user_models:broken_factory", ["factory", "RuntimeError", "factory exploded"]),
    ("user_models:bad_forward", ["forward pass", "RuntimeError", "[7, -1]"]),
    ("broken_module:anything", ["importing broken_module", "NameError"]),
    ("broken_module.py:anything", ["importing broken_module.py", "NameError"]),
])
@pytest.mark.parametrize("command", ["compile", "coverage"])
def test_user_code_errors_are_reported_in_one_line(user_dir, capsys, spec, words, command):
    extra = ["--cache", str(user_dir / "cache")] if command == "compile" else []
    rc = main([command, spec, "--example", "2x4", *extra])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("lrpplan: error: ")
    assert "Traceback" not in err
    for w in words:
        assert w in err


def test_traceback_on_request(user_dir, capsys, monkeypatch):
    monkeypatch.setenv("LRPPLAN_TRACEBACK", "1")
    rc = main(["compile", "user_models:broken_factory", "--example", "2x4"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" in err and "lrpplan: error: " in err
