"""The trainer's datasets: epochs over a blend, a blend that does not depend on the run's length
(so a run can be extended), several validation files, and data that packing by document cannot
use found before the run starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megallama.config import ConfigError, preset
from megallama.config.train_config import TrainConfig
from megallama.data.checks import check_data_files
from megallama.data.dataset import BlendedDataset
from megallama.data.indexed import IndexedWriter
from megallama.data.sampler import DataSampler
from megallama.training.loop import build_datasets, steps_for_epochs

VOCAB, SEQ = 64, 8


def _write(prefix: Path, windows: int, doc_len: int = 10) -> None:
    """A token file of exactly ``windows`` concat windows of SEQ + 1 tokens."""
    tokens = np.arange(windows * SEQ + 1) % 50 + 3
    with IndexedWriter(prefix, VOCAB) as w:
        for start in range(0, len(tokens), doc_len):
            w.add_document(tokens[start:start + doc_len].tolist())


def _config(root: Path, train: list[str], valid: list[str], steps: int = 100) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model = preset("tiny", vocab_size=VOCAB)
    cfg.data.train = [str(root / p) for p in train]
    cfg.data.valid = [str(root / p) for p in valid]
    cfg.data.seq_len, cfg.parallel.global_batch_size, cfg.trainer.steps = SEQ, 4, steps
    return cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("training_data")
    for name, n in (("a", 20), ("b", 20), ("va", 5), ("vb", 7)):
        _write(root / name, n)
    with IndexedWriter(root / "singles", VOCAB) as w:  # documents of one token each
        for t in range(3, 40):
            w.add_document([t])
    return root


def test_epochs_over_a_blend_count_its_samples(root):
    cfg = _config(root, ["a", "b"], ["va"], steps=100)
    cfg.trainer.epochs = 1
    train, _ = build_datasets(cfg)
    assert len(train) == 40  # 2 prefixes x 20 windows, whatever trainer.steps says
    assert steps_for_epochs(cfg, train) == 10  # was 100: the blend was sized from steps


def test_blend_does_not_depend_on_the_run_length(root):
    short, _ = build_datasets(_config(root, ["a", "b"], ["va"], steps=100))
    long, _ = build_datasets(_config(root, ["a", "b"], ["va"], steps=200))
    assert len(short) == len(long), (len(short), len(long))  # sized from the data, not the run
    saved = DataSampler(len(short), 4, 0, 1, seed=1).state_dict()
    DataSampler(len(long), 4, 0, 1, seed=1).load_state_dict(saved)  # an extended run resumes


def test_blend_draws_go_on_across_epochs():
    """A down-weighted dataset shows other samples in the next epoch (its draws continue), and
    every sample of it is seen once before any is repeated."""
    big, small = np.arange(100), np.arange(1000, 1004)
    blend = BlendedDataset([big, small], [0.2, 0.8], 20, seed=3)
    per_epoch = [[int(blend.sample(i, e)) for i in range(20) if blend.dataset_index[i] == 0]
                 for e in range(5)]
    seen = sum(per_epoch, [])
    assert len(per_epoch[0]) == 4 and len(set(seen)) == len(seen) == 20
    assert np.array_equal(blend.sample_indices(0), blend.dataset_sample_index)


def test_several_validation_files_are_all_used(root):
    _, valid = build_datasets(_config(root, ["a"], ["va", "vb"]))
    assert len(valid) == 5 + 7
    last = valid[len(valid) - 1]
    with pytest.raises(IndexError):
        valid[len(valid)]
    assert last.tolist() == build_datasets(_config(root, ["a"], ["vb"]))[1][6].tolist()


def test_documents_packing_needs_a_document_of_two_tokens(root):
    cfg = _config(root, ["a"], ["singles"])
    cfg.data.packing = "documents"
    with pytest.raises(ConfigError, match=r"data.valid\[0\]=.*singles: every document is "
                                          r"shorter than 2 tokens.*data.packing=concat"):
        check_data_files(cfg.data, cfg.model)
    cfg.data.packing = "concat"
    check_data_files(cfg.data, cfg.model)  # concat windows span documents: fine
