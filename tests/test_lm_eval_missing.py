"""Without lm-eval (the optional extra ``megallama[eval]``) the command and the model module say
which extra to install, in one line. Kept apart from the harness tests, which need lm-eval."""

from __future__ import annotations

import importlib
import sys

import pytest


def test_missing_lm_eval_is_one_line(monkeypatch, capsys) -> None:
    """Hide lm-eval: the command says which extra to install (one line, exit 2) and importing
    the model module raises ImportError naming it."""
    from megallama import lm_eval as entry

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert entry.main() == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'megallama[eval]'" in err, err
    monkeypatch.delitem(sys.modules, "megallama.inference.harness", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'megallama\[eval\]'"):
        importlib.import_module("megallama.inference.harness")
