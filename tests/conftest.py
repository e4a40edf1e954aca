"""Shared test fixtures: locations of ../shared assets and a deterministic torch setup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LLAMA_TOKENIZER = SHARED / "assets" / "llama2-tokenizer" / "tokenizer.model"

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def llama_tokenizer_path() -> Path:
    if not LLAMA_TOKENIZER.is_file():
        pytest.skip(f"real Llama 2 tokenizer not found at {LLAMA_TOKENIZER} (../shared is absent)")
    return LLAMA_TOKENIZER
