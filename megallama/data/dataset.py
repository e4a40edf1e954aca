"""Training samples from indexed token files: packing, blending, train/valid split, collate.

``PackedDataset`` treats a token file as one stream (documents already carry BOS/EOS from
preprocessing, so samples cross document boundaries without losing them) and cuts it into
non-overlapping windows of ``seq_len + 1`` tokens that share one boundary token: sample i is
``tokens[i * seq_len : i * seq_len + seq_len + 1]``, the model reads its first ``seq_len``
tokens and predicts its last ``seq_len`` (``collate``). No token is wasted except the
``(num_tokens - 1) % seq_len`` at the end.

``BlendedDataset`` mixes datasets by weight with a deterministic schedule; ``DataSampler``
(re-exported from ``sampler``) picks the indices each data-parallel rank trains on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from megallama.data.indexed import IndexedTokens
from megallama.data.sampler import DataSampler

__all__ = [
    "BlendedDataset",
    "DataSampler",
    "DatasetError",
    "PackedDataset",
    "build_train_valid",
    "collate",
    "rank_batches",
]


class DatasetError(ValueError):
    """A dataset that cannot provide the samples asked for (e.g. too few tokens)."""


class SampleSource(Protocol):
    """Anything with a length and integer indexing to token windows."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


class PackedDataset:
    """Fixed-length training windows over the token stream of one indexed token file.

    ``token_range=(start, stop)`` restricts the stream to ``tokens[start:stop]`` (used for a
    held-out validation tail). Items are ``np.int64`` arrays of ``seq_len + 1`` tokens.
    """

    def __init__(
        self,
        source: str | Path | IndexedTokens,
        seq_len: int,
        token_range: tuple[int, int] | None = None,
    ) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.indexed = source if isinstance(source, IndexedTokens) else IndexedTokens(source)
        start, stop = token_range if token_range is not None else (0, self.indexed.num_tokens)
        if not 0 <= start <= stop <= self.indexed.num_tokens:
            raise ValueError(f"token_range {token_range} outside [0, {self.indexed.num_tokens}]")
        self.seq_len = int(seq_len)
        self.token_range = (int(start), int(stop))
        self.tokens = self.indexed.tokens[start:stop]
        self._len = (len(self.tokens) - 1) // self.seq_len if len(self.tokens) else 0
        if self._len < 1:
            raise DatasetError(
                f"{self.indexed.prefix} has {len(self.tokens)} tokens in range {self.token_range}"
                f": seq_len {seq_len} needs at least {seq_len + 1} for one sample"
            )

    @property
    def vocab_size(self) -> int:
        """Vocabulary size recorded in the token file."""
        return self.indexed.vocab_size

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not -self._len <= index < self._len:
            raise IndexError(f"sample {index} out of range for {self._len} samples")
        start = (index % self._len) * self.seq_len
        return np.array(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"PackedDataset({str(self.indexed.prefix)!r}, seq_len={self.seq_len}, "
            f"samples={self._len}, token_range={self.token_range})"
        )


def _webster_schedule(weights: np.ndarray, num_samples: int) -> np.ndarray:
    """Which dataset each of ``num_samples`` steps draws from, proportional to ``weights``.

    Dataset d's k-th draw is placed at "time" ``(k + 0.5) / w_d`` and all draws are merged
    in time order (ties to the lower dataset index): Webster/Sainte-Lague apportionment.
    Every prefix of n steps then holds about ``n * w_d`` draws of dataset d (within one
    draw per dataset), and the schedule is a pure function of weights and length.
    """
    n_sets = weights.shape[0]
    keys, owners = [], []
    for d, weight in enumerate(weights):
        if weight <= 0:
            continue
        count = int(np.ceil(num_samples * weight)) + n_sets + 1
        keys.append((np.arange(count, dtype=np.float64) + 0.5) / weight)
        owners.append(np.full(count, d, dtype=np.int32))
    key, owner = np.concatenate(keys), np.concatenate(owners)
    order = np.lexsort((owner, key))[:num_samples]
    return owner[order]


class BlendedDataset:
    """One epoch of ``num_samples`` samples drawn from ``datasets`` in proportion to ``weights``.

    Which dataset sample i comes from follows ``_webster_schedule`` (exact proportions at
    every prefix, like Megatron's greedy error-minimising blend). Dataset d's draws are numbered
    on across epochs: in epoch e its k-th draw is draw ``g = e * count_d + k``, which takes index
    ``perm[g % len]`` of a permutation seeded by ``(seed, d, g // len)``: a small dataset is
    cycled through, reshuffled on every pass, and a down-weighted one shows new samples in every
    epoch. The size does not depend on the run's length, so a run resumes with another
    ``trainer.steps`` (the sampler refuses a changed size).
    """

    def __init__(
        self,
        datasets: Sequence[SampleSource],
        weights: Sequence[float],
        num_samples: int,
        seed: int = 0,
    ) -> None:
        if not datasets or len(datasets) != len(weights):
            raise ValueError(f"need one weight per dataset: {len(datasets)} vs {len(weights)}")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0: {list(weights)}")
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        for d, (dataset, weight) in enumerate(zip(datasets, w, strict=True)):
            if weight > 0 and len(dataset) == 0:
                raise DatasetError(f"dataset {d} has weight {weight} but no samples")
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.dataset_index = _webster_schedule(self.weights, self.num_samples)
        self.counts = np.bincount(self.dataset_index, minlength=len(datasets))
        # k: the how-manieth draw of its dataset each sample is within an epoch
        self.draw = np.empty(self.num_samples, dtype=np.int64)
        for d in range(len(self.datasets)):
            at = self.dataset_index == d
            self.draw[at] = np.arange(int(at.sum()))
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, d: int, pass_: int) -> np.ndarray:
        key = (d, pass_)
        if key not in self._perms:
            if len(self._perms) >= 2 * len(self.datasets):  # a batch touches few passes
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = np.random.default_rng([self.seed, d, pass_]).permutation(
                len(self.datasets[d]))
        return self._perms[key]

    def __len__(self) -> int:
        return self.num_samples

    def sample_indices(self, epoch: int) -> np.ndarray:
        """Every sample's index within its dataset, in epoch ``epoch``."""
        out = np.empty(self.num_samples, dtype=np.int64)
        for d, dataset in enumerate(self.datasets):
            at = self.dataset_index == d
            g = int(epoch) * int(self.counts[d]) + self.draw[at]
            size = len(dataset)
            passes = np.unique(g // size) if size else []
            picked = np.empty(len(g), dtype=np.int64)
            for p in passes:
                sel = g // size == p
                picked[sel] = self._perm(d, int(p))[g[sel] % size]
            out[at] = picked
        return out

    @property
    def dataset_sample_index(self) -> np.ndarray:
        """Epoch 0's :meth:`sample_indices`."""
        return self.sample_indices(0)

    def sample(self, index: int, epoch: int) -> np.ndarray:
        """Sample ``index`` of epoch ``epoch``."""
        index = int(index)
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} samples")
        d = int(self.dataset_index[index])
        size = len(self.datasets[d])
        g = int(epoch) * int(self.counts[d]) + int(self.draw[index])
        return self.datasets[d][int(self._perm(d, g // size)[g % size])]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.sample(index, 0)


class ConcatWindows:
    """Several datasets read one after the other (e.g. several validation files)."""

    def __init__(self, datasets: Sequence[SampleSource]) -> None:
        self.datasets = list(datasets)
        self.ends = np.cumsum([len(d) for d in self.datasets])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: int):  # noqa: ANN204 -- the datasets' own item type
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        d = int(np.searchsorted(self.ends, index, side="right"))
        return self.datasets[d][index - (int(self.ends[d - 1]) if d else 0)]


def holdout_start(total: int, seq_len: int, valid_fraction: float) -> int:
    """Token position where the validation tail held out of ``total`` tokens starts (before
    moving to a document boundary): at least one sample of ``seq_len + 1`` tokens is held out.
    A result below ``seq_len + 1`` leaves no training sample."""
    return total - max(seq_len + 1, round(total * valid_fraction))


def _split_point(indexed: IndexedTokens, seq_len: int, valid_fraction: float) -> int:
    """Token position where the held-out tail starts: the document boundary nearest to
    ``(1 - valid_fraction) * num_tokens`` if it keeps the tail within half of its intended
    size (so no document is in both splits), else exactly that position."""
    total = indexed.num_tokens
    want = holdout_start(total, seq_len, valid_fraction)
    if want < seq_len + 1:
        raise DatasetError(
            f"{indexed.prefix} has {total} tokens: too few to hold out a validation tail and "
            f"keep one training sample of seq_len {seq_len}"
        )
    offsets = indexed.doc_offsets
    nearest = int(offsets[np.argmin(np.abs(offsets - want))])
    tail = total - want
    ok = abs(nearest - want) <= tail // 2 and seq_len + 1 <= nearest <= total - seq_len - 1
    return nearest if ok else want


def build_train_valid(
    train_prefix: str | Path,
    seq_len: int,
    valid_prefix: str | Path | None = None,
    valid_fraction: float = 0.01,
) -> tuple[PackedDataset, PackedDataset | None]:
    """Train and validation datasets.

    With ``valid_prefix`` the validation set is that token file. Without it, the last
    ``valid_fraction`` of the training tokens (at least ``seq_len + 1``, cut at a document
    boundary when one is near) is held out and the training set stops before it;
    ``valid_fraction=0`` gives no validation set. Both files must come from one tokenizer.
    """
    train_tokens = IndexedTokens(train_prefix)
    if valid_prefix is not None:
        valid = PackedDataset(valid_prefix, seq_len)
        if valid.vocab_size != train_tokens.vocab_size:
            raise DatasetError(
                f"{valid_prefix} has vocab_size {valid.vocab_size} but {train_prefix} has "
                f"{train_tokens.vocab_size}: tokenized with different tokenizers"
            )
        return PackedDataset(train_tokens, seq_len), valid
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if valid_fraction == 0:
        return PackedDataset(train_tokens, seq_len), None
    cut = _split_point(train_tokens, seq_len, valid_fraction)
    train = PackedDataset(train_tokens, seq_len, token_range=(0, cut))
    valid = PackedDataset(train_tokens, seq_len, token_range=(cut, train_tokens.num_tokens))
    return train, valid


def collate(samples: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack windows of ``seq_len + 1`` tokens into ``(tokens, labels)``, each ``[b, seq_len]``
    int64, with ``labels[:, t] == tokens[:, t + 1]`` in the window (next-token targets)."""
    if len(samples) == 0:
        raise ValueError("collate needs at least one sample")
    lengths = {len(s) for s in samples}
    if len(lengths) != 1 or min(lengths) < 2:
        raise ValueError(f"samples must share one length >= 2, got lengths {sorted(lengths)}")
    batch = torch.from_numpy(np.stack([np.asarray(s, dtype=np.int64) for s in samples]))
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def rank_batches(
    dataset: SampleSource, sampler: DataSampler
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's collated ``(tokens, labels)`` for each global step of ``sampler``.

    A rank whose share of a short last batch (``drop_last=False``) is empty gets tensors
    of shape ``[0, seq_len]``, so all ranks still step together.
    """
    if len(dataset) != sampler.num_samples:
        raise DatasetError(
            f"sampler built for {sampler.num_samples} samples, dataset has {len(dataset)}"
        )
    for indices in sampler:
        if indices:
            yield collate([dataset[i] for i in indices])
        else:
            empty = torch.empty(0, len(dataset[0]) - 1, dtype=torch.int64)
            yield empty, empty.clone()
