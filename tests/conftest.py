"""Shared test fixtures: locations of ../shared assets and a deterministic torch setup."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LLAMA_TOKENIZER = SHARED / "assets" / "llama2-tokenizer" / "tokenizer.model"
LLAMA3_TOKENIZER = SHARED / "assets" / "llama3-tokenizer" / "tokenizer.model"

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU, Triton kernels run on CPU tensors under Triton's interpreter, which must be on
# before triton is first imported (tests/test_optim_kernels.py); spawned ranks inherit it
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# CI (.ci/run) sets this: there the shared assets are always present and their absence is a fault
REQUIRE_ASSETS = os.environ.get("MEGALLAMA_REQUIRE_ASSETS") == "1"


def require_llama_tokenizer() -> Path:
    """The real Llama 2 tokenizer; skips (with the reason) when ../shared is absent, or fails
    when MEGALLAMA_REQUIRE_ASSETS=1 says it must be there."""
    if not LLAMA_TOKENIZER.is_file():
        message = f"real Llama 2 tokenizer not found at {LLAMA_TOKENIZER} (../shared is absent)"
        if REQUIRE_ASSETS:
            pytest.fail(message + " and MEGALLAMA_REQUIRE_ASSETS=1")
        pytest.skip(message)
    return LLAMA_TOKENIZER


def require_llama3_tokenizer() -> Path:
    """Meta's Llama 3 tiktoken tokenizer, under the same asset rule as the Llama 2 one."""
    if not LLAMA3_TOKENIZER.is_file():
        message = f"Llama 3 tokenizer not found at {LLAMA3_TOKENIZER} (../shared is absent)"
        if REQUIRE_ASSETS:
            pytest.fail(message + " and MEGALLAMA_REQUIRE_ASSETS=1")
        pytest.skip(message)
    return LLAMA3_TOKENIZER


def require_module(name: str) -> ModuleType:
    """An optional package of the test extras (e.g. lm_eval); skips (with the reason) when it is
    not installed, or fails when MEGALLAMA_REQUIRE_ASSETS=1, where megallama[test] is installed
    and a missing package is a fault. Usable at module level, like pytest.importorskip."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        message = f"{name} is not installed ({e}); pip install 'megallama[test]'"
        if REQUIRE_ASSETS:
            pytest.fail(message + " (MEGALLAMA_REQUIRE_ASSETS=1)", pytrace=False)
        pytest.skip(message, allow_module_level=True)


@pytest.fixture
def llama_tokenizer_path() -> Path:
    return require_llama_tokenizer()


@pytest.fixture(scope="session")
def llama3_tokenizer():  # -> megallama.data.tokenizer.Tokenizer (its 128k ranks load in ~1 s)
    """The Llama 3 tokenizer, loaded once per session."""
    from megallama.data.tokenizer import Tokenizer

    return Tokenizer(require_llama3_tokenizer())
