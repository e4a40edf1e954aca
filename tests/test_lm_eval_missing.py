"""Without lm-eval (the optional extra ``megallama[eval]``) the command and the model module say
which extra to install, in one line, and the lm-eval tests skip (or fail in CI) by the project's
asset rule. Kept apart from the harness tests, which need lm-eval."""

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


@pytest.mark.parametrize("required", [False, True], ids=["local", "ci"])
@pytest.mark.parametrize("module", ["tests.test_lm_eval_harness", "tests.test_lm_eval_cli"])
def test_lm_eval_tests_follow_the_asset_rule(module: str, required: bool, monkeypatch) -> None:
    """Without lm-eval the lm-eval test modules skip, or fail when MEGALLAMA_REQUIRE_ASSETS=1
    (CI installs megallama[test]), through the project's rule (tests/conftest.py), not through
    a pytest.importorskip of their own that would skip in CI too."""
    import tests.conftest as conftest

    monkeypatch.setattr(conftest, "REQUIRE_ASSETS", required)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    expected = pytest.fail.Exception if required else pytest.skip.Exception
    try:  # a skip must not escape: it would report this test as skipped, not failed
        importlib.import_module(module)
    except (pytest.skip.Exception, pytest.fail.Exception) as outcome:
        assert type(outcome) is expected, f"{type(outcome).__name__}: {outcome}"
        assert "lm_eval is not installed" in str(outcome), outcome
    else:
        pytest.fail(f"{module} imported without lm_eval")
