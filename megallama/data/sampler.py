"""The data-parallel batch sampler: deterministic, resumable, independent of the DP size.

The samples are arranged in one global stream: epoch 0's order, then epoch 1's, and so on,
each epoch a permutation of ``range(num_samples)`` drawn from ``(seed, epoch)`` (or the
identity when ``shuffle=False``). Global step k takes stream positions
``[consumed, consumed + global_batch_size)`` (a batch may straddle two epochs; nothing is
dropped at epoch ends) and data-parallel rank r takes the contiguous slice
``[r * b, (r + 1) * b)`` of that global batch, ``b = global_batch_size // dp_size``.

The only progress state is ``consumed_samples``, a global count, so a run restored from
``state_dict()`` continues with exactly the next batch, and a run restored with another
``dp_size`` (or even another ``global_batch_size``) continues at the same stream position:
no sample repeated, none skipped.

With ``num_epochs`` set the stream ends after that many epochs (e.g. one pass over a
validation set). The last global batch may then be short: ``drop_last=True`` drops it;
``drop_last=False`` yields it split as evenly as possible over the ranks in order (the
first ``n % dp_size`` ranks get one more sample; a rank may get none). With ``num_epochs``
unset the stream is endless and ``drop_last`` has no effect.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

STATE_VERSION = 1


class DataSampler:
    """Yields, per global step, the sample indices of this data-parallel rank."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_epochs: int | None = None,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, dp_size={dp_size})")
        if global_batch_size <= 0 or global_batch_size % dp_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be a positive multiple of "
                f"dp_size {dp_size}"
            )
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.num_epochs = num_epochs
        self.consumed_samples = 0
        self.last_epochs: list[int] = []  # epoch of each index next_batch() returned last
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        """The epoch of the next sample to be taken."""
        return self.consumed_samples // self.num_samples

    @property
    def local_batch_size(self) -> int:
        """Samples this rank gets per full global batch."""
        return self.global_batch_size // self.dp_size

    @property
    def total_samples(self) -> int | None:
        """Length of the stream (None when endless)."""
        return None if self.num_epochs is None else self.num_epochs * self.num_samples

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch``: a permutation seeded by ``(seed, epoch)``."""
        order = self._perms.get(epoch)
        if order is None:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                order = np.arange(self.num_samples, dtype=np.int64)
            if len(self._perms) >= 2:  # a batch touches at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = order
        return order

    def stream(self, start: int, stop: int) -> np.ndarray:
        """Sample indices at global stream positions ``[start, stop)``."""
        positions = np.arange(start, stop, dtype=np.int64)
        out = np.empty(positions.shape[0], dtype=np.int64)
        epochs = positions // self.num_samples
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self.epoch_order(int(epoch))[positions[mask] % self.num_samples]
        return out

    def _rank_bounds(self, batch: int) -> tuple[int, int]:
        if batch == self.global_batch_size:
            size = self.local_batch_size
            return self.dp_rank * size, (self.dp_rank + 1) * size
        base, extra = divmod(batch, self.dp_size)  # short last batch: spread evenly
        start = self.dp_rank * base + min(self.dp_rank, extra)
        return start, start + base + (1 if self.dp_rank < extra else 0)

    def next_batch(self) -> list[int]:
        """This rank's indices for the next global step; advances ``consumed_samples``.

        Raises StopIteration at the end of a finite stream.
        """
        batch = self.global_batch_size
        total = self.total_samples
        if total is not None:
            remaining = total - self.consumed_samples
            if remaining <= 0 or (remaining < batch and self.drop_last):
                raise StopIteration
            batch = min(batch, remaining)
        lo, hi = self._rank_bounds(batch)
        start = self.consumed_samples
        indices = self.stream(start + lo, start + hi)
        # the epoch of each index (a batch may straddle two): for epoch-aware datasets
        self.last_epochs = (np.arange(start + lo, start + hi) // self.num_samples).tolist()
        self.consumed_samples += batch
        return indices.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    def __len__(self) -> int:
        """Steps left in a finite stream; TypeError for an endless one."""
        total = self.total_samples
        if total is None:
            raise TypeError("an endless DataSampler (num_epochs=None) has no length")
        remaining = max(0, total - self.consumed_samples)
        full, rest = divmod(remaining, self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def state_dict(self) -> dict[str, Any]:
        """The resumable state; global, so valid for any dp_rank / dp_size."""
        return {
            "version": STATE_VERSION,
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the sample order (seed, num_samples, shuffle) must match.

        A different ``global_batch_size`` or ``dp_size`` is fine: the stream position is
        global. A different order would silently repeat and skip samples, so it is refused.
        """
        if state.get("version", STATE_VERSION) != STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')} not supported")
        for key in ("seed", "num_samples", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}: the sample order would differ"
                )
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed}")
        self.consumed_samples = consumed

    def __repr__(self) -> str:
        return (
            f"DataSampler(num_samples={self.num_samples}, global_batch_size="
            f"{self.global_batch_size}, dp_rank={self.dp_rank}, dp_size={self.dp_size}, "
            f"seed={self.seed}, consumed_samples={self.consumed_samples})"
        )
