"""Fixtures of the multi-process tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megallama.data.indexed import IndexedWriter
from tests.distributed.cli import VOCAB


@pytest.fixture(scope="session")
def token_files(tmp_path_factory) -> Path:
    """Learnable synthetic documents: arithmetic progressions mod 250 (BOS=1, EOS=2)."""
    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    for split, docs in (("train", 400), ("val", 60)):
        with IndexedWriter(root / split, VOCAB) as w:
            for _ in range(docs):
                a, d, n = rng.integers(0, 250), rng.integers(1, 6), rng.integers(40, 120)
                w.add_document([1, *((a + d * np.arange(n)) % 250 + 3), 2])
    return root


