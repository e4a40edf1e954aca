"""How token files become training windows (``data.packing``) and which targets carry a loss.

* ``concat`` (the pretraining default): :class:`~megallama.data.dataset.PackedDataset`'s windows
  over the token stream; attention runs across document boundaries.
* ``documents``: whole documents packed in order into windows of ``seq_len + 1`` tokens (a
  document that does not fit starts the next window; one longer than a window is cut into
  window-sized pieces that overlap by one token), the rest padded. Each window carries
  ``segments`` (which document each token belongs to), so attention stays within a document and
  RoPE positions restart at each one (:mod:`megallama.model.documents`): a packed document is
  trained exactly as if it were alone.
* ``padded``: the same with one document (piece) per window -- no packing, more padding.

Targets: with a loss mask from preprocessing (chat data, ``<prefix>.mask``) and
``data.loss_mask=true``, only the tokens it marks are predicted (the answers and their EOS); with
``documents``/``padded`` the first token of each document (nothing in its document precedes it)
and the padding are never targets. A position whose target is excluded gets label -100, which the
cross-entropy ignores; the loss of a step is the mean over the remaining targets of the whole
global batch (see :meth:`megallama.engine.Engine.train_step`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from megallama.config.validate import PACKINGS
from megallama.data.dataset import DatasetError, PackedDataset, collate
from megallama.data.indexed import IndexedTokens

IGNORE_INDEX = -100
PAD_TOKEN = 0  # any valid id: padded positions are neither attended to nor predicted


class Window(NamedTuple):
    """One training window of ``seq_len + 1`` tokens with what is needed beyond the ids."""

    tokens: np.ndarray  # int64 [n]
    targets: np.ndarray  # bool [n]: token i may be predicted (from position i - 1)
    segments: np.ndarray | None  # int64 [n]: document index within the window; None: concat
    length: int | None = None  # tokens before the padding (None: no padding)


def _loss_mask(indexed: IndexedTokens, use: bool) -> np.ndarray | None:
    mask = getattr(indexed, "loss_mask", None) if use else None
    return mask


class MaskedWindows:
    """``concat`` windows of a token file that has a loss mask: :class:`Window` items."""

    def __init__(self, packed: PackedDataset, mask: np.ndarray) -> None:
        self.packed, self.mask = packed, mask
        self.offset = packed.token_range[0]

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, index: int) -> Window:
        tokens = self.packed[index]
        start = self.offset + (int(index) % len(self.packed)) * self.packed.seq_len
        targets = np.asarray(self.mask[start:start + len(tokens)], dtype=bool)
        return Window(tokens, targets, None)


def _pieces(indexed: IndexedTokens, token_range: tuple[int, int],
            window: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of every document piece in ``token_range``: documents clipped to the
    range, longer ones cut into pieces of ``window`` tokens overlapping by one; pieces shorter than
    two tokens (no target) are dropped."""
    lo, hi = token_range
    offsets = np.asarray(indexed.doc_offsets, dtype=np.int64)
    starts, ends = np.clip(offsets[:-1], lo, hi), np.clip(offsets[1:], lo, hi)
    keep = ends - starts >= 2
    starts, ends = starts[keep], ends[keep]
    step = window - 1
    counts = np.maximum(1, -(-(ends - starts - 1) // step))  # pieces per document
    first = np.repeat(starts, counts)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    piece_starts = first + k * step
    lengths = np.minimum(piece_starts + window, np.repeat(ends, counts)) - piece_starts
    return piece_starts, lengths


def _bins(lengths: np.ndarray, window: int, one_per_window: bool) -> np.ndarray:
    """Index of the first piece of every window (plus the total): pieces in order, a new window
    whenever the next piece does not fit (or always, with ``one_per_window``)."""
    if one_per_window:
        return np.arange(len(lengths) + 1)
    firsts, used = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > window:
            firsts.append(i)
            used = 0
        used += n
    firsts.append(len(lengths))
    return np.asarray(firsts, dtype=np.int64)


class DocumentWindows:
    """``documents`` / ``padded`` windows over ``packed``'s token file and range (see the module
    docstring); items are :class:`Window` with segments."""

    def __init__(self, packed: PackedDataset, *, one_per_window: bool, use_mask: bool) -> None:
        self.indexed, self.window = packed.indexed, packed.seq_len + 1
        self.mask = _loss_mask(self.indexed, use_mask)
        self.starts, self.lengths = _pieces(self.indexed, packed.token_range, self.window)
        self.bins = _bins(self.lengths, self.window, one_per_window)
        if len(self.bins) < 2:
            raise DatasetError(f"{self.indexed.prefix}: no document of 2 or more tokens in "
                               f"range {packed.token_range}")

    def __len__(self) -> int:
        return len(self.bins) - 1

    def __getitem__(self, index: int) -> Window:
        index = int(index) % len(self)
        pieces = range(int(self.bins[index]), int(self.bins[index + 1]))
        tokens = np.full(self.window, PAD_TOKEN, dtype=np.int64)
        targets = np.zeros(self.window, dtype=bool)
        segments = np.full(self.window, len(pieces), dtype=np.int64)  # padding: its own segment
        at = 0
        for seg, i in enumerate(pieces):
            start, n = int(self.starts[i]), int(self.lengths[i])
            tokens[at:at + n] = self.indexed.tokens[start:start + n]
            targets[at + 1:at + n] = (True if self.mask is None
                                      else self.mask[start + 1:start + n].astype(bool))
            segments[at:at + n] = seg
            at += n
        return Window(tokens, targets, segments, at)


def windows_for(packed: PackedDataset, packing: str, use_mask: bool):
    """``packed``'s token file and range as the windows ``packing`` asks for."""
    if packing not in PACKINGS:
        raise ValueError(f"packing {packing!r}: choose one of {list(PACKINGS)}")
    if packing != "concat":
        return DocumentWindows(packed, one_per_window=packing == "padded", use_mask=use_mask)
    mask = _loss_mask(packed.indexed, use_mask)
    return packed if mask is None else MaskedWindows(packed, mask)


def input_tokens(samples: Sequence[np.ndarray | Window]) -> int:
    """Input tokens of these windows that are data, not padding (what the data advanced by)."""
    count = 0
    for w in samples:
        if not isinstance(w, Window):
            count += len(w) - 1
            continue
        size = len(w.tokens) - 1
        count += size if w.length is None else min(w.length, size)
    return count


def blank_window(like: np.ndarray | Window) -> Window:
    """A window shaped like ``like`` with no target: it fills a short last batch of an
    evaluation and weighs nothing in the token-weighted loss."""
    tokens = like.tokens if isinstance(like, Window) else np.asarray(like)
    segments = like.segments if isinstance(like, Window) else None
    return Window(tokens, np.zeros(len(tokens), dtype=bool), segments, 0)


def collate_windows(samples: Sequence[np.ndarray | Window]) -> tuple[torch.Tensor, ...]:
    """A micro-batch: ``(tokens, labels)`` or, with segments, ``(tokens, labels, segments)``,
    each [b, seq_len]. Labels are the next tokens, -100 where the target is excluded (loss mask,
    padding, a document's first token)."""
    if not any(isinstance(w, Window) for w in samples):
        return collate(samples)  # type: ignore[arg-type]
    # a blend of plain and masked concat windows: plain ones predict every token
    samples = [w if isinstance(w, Window) else Window(np.asarray(w), np.ones(len(w), bool), None)
               for w in samples]
    tokens, labels = collate([w.tokens for w in samples])
    targets = torch.from_numpy(np.stack([w.targets for w in samples]))[:, 1:]
    if samples[0].segments is None:
        return tokens, labels.masked_fill(~targets, IGNORE_INDEX)
    segments = torch.from_numpy(np.stack([w.segments for w in samples]))
    same_doc = segments[:, 1:] == segments[:, :-1]
    labels = labels.masked_fill(~(targets & same_doc), IGNORE_INDEX)
    return tokens, labels, segments[:, :-1].contiguous()
