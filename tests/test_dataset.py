"""Indexed token files, packed and blended datasets, the DP sampler and collate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megallama.data.dataset import (
    BlendedDataset,
    DatasetError,
    PackedDataset,
    build_train_valid,
    collate,
    rank_batches,
)
from megallama.data.indexed import (
    HEADER_BYTES,
    IndexedFormatError,
    IndexedTokens,
    IndexedWriter,
    token_dtype,
)
from megallama.data.sampler import DataSampler


def _write(prefix: Path, docs: list[list[int]], vocab_size: int = 1000) -> IndexedTokens:
    with IndexedWriter(prefix, vocab_size) as writer:
        for doc in docs:
            writer.add_document(doc)
    return IndexedTokens(prefix)


def _stream(prefix: Path, num_tokens: int, doc_len: int = 10, vocab_size: int = 1000):
    """A token file whose token at position p is p % vocab_size, in documents of doc_len."""
    tokens = np.arange(num_tokens) % vocab_size
    docs = [tokens[i : i + doc_len].tolist() for i in range(0, num_tokens, doc_len)]
    return _write(prefix, docs, vocab_size)


# --- indexed token files ----------------------------------------------------------------------


def test_indexed_round_trip(tmp_path: Path) -> None:
    docs = [[1, 5, 7, 2], [1, 2], [], [1, 999, 998, 3, 2]]
    indexed = _write(tmp_path / "t", docs)
    assert indexed.num_docs == 4 and len(indexed) == 4
    assert indexed.num_tokens == 11 and indexed.vocab_size == 1000
    assert indexed.doc_offsets.tolist() == [0, 4, 6, 6, 11]
    assert [indexed.document(i).tolist() for i in range(4)] == docs
    assert indexed.document(-1).tolist() == docs[-1]
    assert isinstance(indexed.tokens, np.memmap) and indexed.tokens.dtype == np.uint16
    # the documented layout, read without this module
    raw = np.fromfile(tmp_path / "t.bin", dtype="<u2")
    assert raw.tolist() == sum(docs, [])
    offsets = np.fromfile(tmp_path / "t.idx", dtype="<i8", offset=HEADER_BYTES)
    assert offsets.tolist() == [0, 4, 6, 6, 11]
    with pytest.raises(IndexError):
        indexed.document(4)


@pytest.mark.parametrize(
    ("vocab_size", "dtype"),
    [(32000, np.uint16), (65535, np.uint16), (65536, np.uint16), (65537, np.int32),
     (128256, np.int32)],
)  # fmt: skip
def test_token_dtype_choice(tmp_path: Path, vocab_size: int, dtype: type) -> None:
    assert token_dtype(vocab_size) == np.dtype(dtype)
    top = vocab_size - 1
    indexed = _write(tmp_path / "d", [[0, top], [top]], vocab_size)
    assert indexed.tokens.dtype == np.dtype(dtype)
    assert indexed.tokens.tolist() == [0, top, top]
    assert (tmp_path / "d.bin").stat().st_size == 3 * np.dtype(dtype).itemsize


def test_writer_rejects_out_of_range_ids_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="token id 1000 outside"):
        _write(tmp_path / "out" / "r", [[1, 2], [1000]], vocab_size=1000)
    with pytest.raises(ValueError, match="token id -1 outside"):
        _write(tmp_path / "out" / "r", [[-1]], vocab_size=1000)
    assert list((tmp_path / "out").iterdir()) == []


def test_writer_abort_keeps_previous_files(tmp_path: Path) -> None:
    _write(tmp_path / "k", [[1, 2, 3]])
    before = (tmp_path / "k.bin").read_bytes(), (tmp_path / "k.idx").read_bytes()
    with pytest.raises(RuntimeError, match="boom"), IndexedWriter(tmp_path / "k", 1000) as w:
        w.add_document([4, 5, 6, 7])
        raise RuntimeError("boom")
    assert ((tmp_path / "k.bin").read_bytes(), (tmp_path / "k.idx").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.bin", "k.idx"]


def test_missing_and_truncated_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(IndexedFormatError, match="token index not found"):
        IndexedTokens(tmp_path / "none")
    _write(tmp_path / "t", [[1, 2, 3, 4], [5, 6]])
    data = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[:-2])
    with pytest.raises(IndexedFormatError, match=r"t\.bin is truncated: 10 bytes.*6 tokens"):
        IndexedTokens(tmp_path / "t")
    (tmp_path / "t.bin").write_bytes(data + b"\0\0")
    with pytest.raises(IndexedFormatError, match="longer than its index"):
        IndexedTokens(tmp_path / "t")
    (tmp_path / "t.bin").unlink()
    with pytest.raises(IndexedFormatError, match="token file not found"):
        IndexedTokens(tmp_path / "t")
    idx = (tmp_path / "t.idx").read_bytes()
    (tmp_path / "t.idx").write_bytes(idx[:-8])
    with pytest.raises(IndexedFormatError, match="truncated or corrupt"):
        IndexedTokens(tmp_path / "t")
    (tmp_path / "t.idx").write_bytes(b"GARBAGE!" + idx[8:])
    with pytest.raises(IndexedFormatError, match="bad header"):
        IndexedTokens(tmp_path / "t")


def test_empty_token_file_reads(tmp_path: Path) -> None:
    indexed = _write(tmp_path / "e", [])
    assert indexed.num_tokens == 0 and indexed.num_docs == 0 and len(indexed.tokens) == 0


# --- packed dataset ---------------------------------------------------------------------------


def test_packed_windows_share_one_boundary_token(tmp_path: Path) -> None:
    indexed = _stream(tmp_path / "s", 103)
    ds = PackedDataset(tmp_path / "s", seq_len=10)
    assert len(ds) == (103 - 1) // 10 == 10
    for i in range(len(ds)):
        sample = ds[i]
        assert sample.dtype == np.int64 and sample.shape == (11,)
        assert sample.tolist() == indexed.tokens[i * 10 : i * 10 + 11].tolist()
    assert ds[1][0] == ds[0][-1]  # consecutive windows overlap in exactly one token
    assert ds[-1].tolist() == ds[9].tolist()
    with pytest.raises(IndexError):
        ds[10]
    exact = _stream(tmp_path / "x", 101)  # (101 - 1) // 10: the last token is used
    assert len(PackedDataset(exact, 10)) == 10 and PackedDataset(exact, 10)[9][-1] == 100


def test_packed_too_small_is_a_clear_error(tmp_path: Path) -> None:
    _stream(tmp_path / "s", 10)
    with pytest.raises(DatasetError, match=r"10 tokens.*seq_len 10 needs at least 11"):
        PackedDataset(tmp_path / "s", seq_len=10)
    assert len(PackedDataset(tmp_path / "s", seq_len=9)) == 1


def test_collate_shifts_labels(tmp_path: Path) -> None:
    ds = PackedDataset(_stream(tmp_path / "s", 200), seq_len=16)
    tokens, labels = collate([ds[3], ds[0]])
    assert tokens.dtype == labels.dtype == torch.int64
    assert tokens.shape == labels.shape == (2, 16)
    assert torch.equal(tokens[0], torch.arange(48, 64))
    assert torch.equal(labels[0], torch.arange(49, 65))
    assert torch.equal(tokens[:, 1:], labels[:, :-1])
    with pytest.raises(ValueError, match="one length"):
        collate([ds[0], ds[0][:5]])


def test_build_train_valid(tmp_path: Path) -> None:
    _stream(tmp_path / "train", 10_000, doc_len=100)
    train, valid = build_train_valid(tmp_path / "train", seq_len=32, valid_fraction=0.05)
    assert valid is not None
    assert train.token_range[1] == valid.token_range[0]  # no token in both
    cut = train.token_range[1]
    assert cut % 100 == 0 and abs((10_000 - cut) - 500) <= 50  # a document boundary
    assert len(valid) == (10_000 - cut - 1) // 32 and len(train) == (cut - 1) // 32
    assert valid[0][0] == cut % 1000
    _stream(tmp_path / "valid", 500)
    train2, valid2 = build_train_valid(tmp_path / "train", 32, valid_prefix=tmp_path / "valid")
    assert len(train2) == (10_000 - 1) // 32 and valid2 is not None and len(valid2) == 15
    assert build_train_valid(tmp_path / "train", 32, valid_fraction=0)[1] is None
    _stream(tmp_path / "other", 500, vocab_size=70_000)
    with pytest.raises(DatasetError, match="different tokenizers"):
        build_train_valid(tmp_path / "train", 32, valid_prefix=tmp_path / "other")
    one_doc = _write(tmp_path / "one", [list(range(1000))])  # no boundary: cut inside
    train3, valid3 = build_train_valid(one_doc.prefix, 8, valid_fraction=0.1)
    assert train3.token_range == (0, 900) and valid3 is not None


# --- blending -----------------------------------------------------------------------------------


class _Range:
    def __init__(self, n: int, tag: int) -> None:
        self.n, self.tag = n, tag

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        assert 0 <= i < self.n
        return np.array([self.tag, i])


def test_blend_proportions_are_exact_at_every_prefix() -> None:
    weights = [5.0, 3.0, 2.0]
    blend = BlendedDataset([_Range(50, 0), _Range(7, 1), _Range(1000, 2)], weights, 997, seed=1)
    w = np.array(weights) / 10
    counts = np.zeros(3)
    for n, d in enumerate(blend.dataset_index, 1):
        counts[d] += 1
        assert np.all(np.abs(counts - n * w) <= 1.0), (n, counts)
    assert blend.counts.tolist() == [499, 299, 199] or np.all(np.abs(blend.counts - 997 * w) < 1)
    assert [blend[i][0] for i in range(5)] == blend.dataset_index[:5].tolist()


def test_blend_is_seeded_and_cycles_each_dataset() -> None:
    sets = [_Range(10, 0), _Range(3, 1)]
    a = BlendedDataset(sets, [0.5, 0.5], 40, seed=7)
    b = BlendedDataset(sets, [0.5, 0.5], 40, seed=7)
    c = BlendedDataset(sets, [0.5, 0.5], 40, seed=8)
    assert np.array_equal(a.dataset_sample_index, b.dataset_sample_index)
    assert not np.array_equal(a.dataset_sample_index, c.dataset_sample_index)
    for d, size in enumerate([10, 3]):
        drawn = a.dataset_sample_index[a.dataset_index == d]
        assert len(drawn) == 20
        for start in range(0, 20 - size + 1, size):  # every full pass is a permutation
            assert sorted(drawn[start : start + size].tolist()) == list(range(size))
    assert all(a[i].tolist() == [a.dataset_index[i], a.dataset_sample_index[i]] for i in range(40))


def test_blend_zero_weight_and_bad_arguments() -> None:
    blend = BlendedDataset([_Range(5, 0), _Range(5, 1)], [1.0, 0.0], 12, seed=0)
    assert blend.counts.tolist() == [12, 0]
    with pytest.raises(ValueError, match="one weight per dataset"):
        BlendedDataset([_Range(5, 0)], [1.0, 2.0], 10)
    with pytest.raises(ValueError, match="not all 0"):
        BlendedDataset([_Range(5, 0)], [0.0], 10)
    with pytest.raises(ValueError, match="not all 0"):
        BlendedDataset([_Range(5, 0), _Range(5, 0)], [1.0, -1.0], 10)
    with pytest.raises(DatasetError, match="no samples"):
        BlendedDataset([_Range(0, 0)], [1.0], 10)


# --- the data-parallel sampler ------------------------------------------------------------------


def _take(sampler: DataSampler, steps: int) -> list[list[int]]:
    return [sampler.next_batch() for _ in range(steps)]


def _global_steps(num_samples: int, gbs: int, dp: int, steps: int, seed: int = 0, **kw):
    """Per step, the concatenation of every rank's slice in rank order."""
    ranks = [DataSampler(num_samples, gbs, r, dp, seed, **kw) for r in range(dp)]
    return [sum((s.next_batch() for s in ranks), []) for _ in range(steps)]


def test_one_epoch_over_all_ranks_covers_every_sample_once() -> None:
    steps = _global_steps(96, 12, 4, 8, seed=3)
    flat = [i for step in steps for i in step]
    assert sorted(flat) == list(range(96))
    assert flat != list(range(96))  # shuffled
    rank1 = DataSampler(96, 12, 1, 4, seed=3).next_batch()
    assert rank1 == steps[0][3:6]  # rank r: contiguous slice r of the global batch


def test_batches_straddle_epochs_without_gaps() -> None:
    steps = _global_steps(100, 12, 2, 17, seed=5)  # 204 samples: epochs 0, 1, and 4 of 2
    flat = [i for step in steps for i in step]
    assert sorted(flat[:100]) == list(range(100)) and sorted(flat[100:200]) == list(range(100))
    assert flat[:100] != flat[100:200]  # a new permutation per epoch
    reference = DataSampler(100, 12, 0, 2, seed=5)
    assert flat == reference.stream(0, 204).tolist()


def test_sampler_is_deterministic_from_seed() -> None:
    assert _global_steps(50, 10, 2, 6, seed=11) == _global_steps(50, 10, 2, 6, seed=11)
    assert _global_steps(50, 10, 2, 6, seed=11) != _global_steps(50, 10, 2, 6, seed=12)
    ordered = _global_steps(50, 10, 2, 6, seed=11, shuffle=False)
    assert [i for s in ordered for i in s] == list(range(50)) + list(range(10))


def test_resume_from_state_gives_the_next_batch() -> None:
    for rank in range(3):
        running = DataSampler(37, 6, rank, 3, seed=2)
        _take(running, 9)
        state = running.state_dict()
        assert state["consumed_samples"] == 54 and state["seed"] == 2
        resumed = DataSampler(37, 6, rank, 3, seed=2)
        resumed.load_state_dict(state)
        assert _take(resumed, 5) == _take(running, 5)


def test_resume_with_different_dp_size_neither_repeats_nor_skips() -> None:
    num, gbs = 40, 8
    before = _global_steps(num, gbs, 4, 3, seed=9)  # 24 samples with dp=4
    state = DataSampler(num, gbs, 0, 4, seed=9)
    _take(state, 3)
    after = []
    ranks = [DataSampler(num, gbs, r, 2, seed=9) for r in range(2)]  # continue with dp=2
    for s in ranks:
        s.load_state_dict(state.state_dict())
    for _ in range(4):
        after.append(sum((s.next_batch() for s in ranks), []))
    flat = [i for step in before + after for i in step]
    assert flat == DataSampler(num, gbs, 0, 1, seed=9).stream(0, 56).tolist()
    assert sorted(flat[:40]) == list(range(40))  # epoch 0 exactly once across the switch
    bigger = DataSampler(num, 16, 0, 1, seed=9)  # a new global batch size resumes too
    bigger.load_state_dict(state.state_dict())
    assert bigger.next_batch() == flat[24:40]


def test_load_state_refuses_another_order() -> None:
    state = DataSampler(40, 8, 0, 1, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        DataSampler(40, 8, 0, 1, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        DataSampler(41, 8, 0, 1, seed=1).load_state_dict(state)


def test_finite_stream_and_drop_last() -> None:
    dropping = DataSampler(23, 8, 0, 2, seed=0, num_epochs=1)
    assert len(dropping) == 2  # 23 // 8: the short last batch is dropped
    assert [len(b) for b in dropping] == [4, 4]
    assert dropping.consumed_samples == 16 and len(dropping) == 0
    samplers = [DataSampler(23, 6, r, 3, seed=0, drop_last=False, num_epochs=1) for r in range(3)]
    assert len(samplers[0]) == 4
    per_rank = [list(s) for s in samplers]
    assert [len(b) for b in per_rank[0]] == [2, 2, 2, 2]  # last batch: 5 samples -> 2, 2, 1
    assert [len(b) for b in per_rank[2]] == [2, 2, 2, 1]
    flat = [i for step in zip(*per_rank, strict=True) for b in step for i in b]
    assert sorted(flat) == list(range(23))
    with pytest.raises(StopIteration):
        samplers[0].next_batch()
    with pytest.raises(TypeError):
        len(DataSampler(23, 6, 0, 3))


def test_sampler_argument_checks() -> None:
    with pytest.raises(ValueError, match="multiple of dp_size"):
        DataSampler(100, 10, 0, 4)
    with pytest.raises(ValueError, match="dp_rank 4"):
        DataSampler(100, 8, 4, 4)
    with pytest.raises(ValueError, match="num_samples"):
        DataSampler(0, 8, 0, 4)


def test_rank_batches_feed_collated_tensors(tmp_path: Path) -> None:
    ds = PackedDataset(_stream(tmp_path / "s", 20 * 8 + 1), seq_len=8)  # 20 samples
    sampler = DataSampler(len(ds), 6, 1, 2, seed=4, drop_last=False, num_epochs=1)
    reference = DataSampler(len(ds), 6, 1, 2, seed=4, drop_last=False, num_epochs=1)
    batches = list(rank_batches(ds, sampler))
    assert len(batches) == 4
    for (tokens, labels), indices in zip(batches, reference, strict=True):
        assert tokens.shape == (len(indices), 8)
        expected = torch.from_numpy(np.stack([ds[i] for i in indices]))
        assert torch.equal(tokens, expected[:, :-1]) and torch.equal(labels, expected[:, 1:])
    lonely = DataSampler(len(ds), 4, 3, 4, seed=0, drop_last=False, num_epochs=1)
    shapes = [tuple(t.shape) for t, _ in rank_batches(ds, lonely)]
    assert shapes == [(1, 8)] * 5  # 20 = 5 full batches of 4, one per rank
    tail = DataSampler(len(ds), 8, 3, 4, seed=0, drop_last=False, num_epochs=1)
    assert [tuple(t.shape) for t, _ in rank_batches(ds, tail)][-1] == (1, 8)
    ds19 = PackedDataset(_stream(tmp_path / "t", 19 * 8 + 1), seq_len=8)
    last = DataSampler(len(ds19), 16, 3, 4, seed=0, drop_last=False, num_epochs=1)
    assert [tuple(t.shape) for t, _ in rank_batches(ds19, last)] == [(4, 8), (0, 8)]
    with pytest.raises(DatasetError, match="sampler built for"):
        next(rank_batches(ds, DataSampler(19, 4, 0, 1)))
