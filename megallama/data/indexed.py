"""The indexed token file: ``<prefix>.bin`` (all tokens) + ``<prefix>.idx`` (document index).

``<prefix>.bin`` is the token ids of every document, concatenated, as raw little-endian
``uint16`` (when ``vocab_size <= 65536``, so every id fits) or ``int32``; no header.

``<prefix>.idx`` is little-endian binary:

======  =====  ===========================================================
offset  type   field
======  =====  ===========================================================
0       8 B    magic ``b"MLTOKIDX"``
8       u32    format version (1)
12      u32    bytes per token in ``.bin``: 2 (uint16) or 4 (int32)
16      u64    vocab_size of the tokenizer that produced the tokens
24      u64    num_docs
32      u64    num_tokens (``.bin`` size is num_tokens * bytes per token)
40      i64[]  doc_offsets, num_docs + 1 entries: document d is tokens
               ``[doc_offsets[d], doc_offsets[d + 1])``; first 0, last num_tokens
======  =====  ===========================================================

so ``np.fromfile(idx, "<i8", offset=40)`` gives the offsets and ``np.memmap(bin, dtype)``
the tokens.

``<prefix>.mask`` (optional) is the per-token loss mask of chat data: raw ``uint8``, one byte per
token of ``.bin`` in the same order (so its size is num_tokens bytes), 1 where the token is a
training target (an answer's tokens and its EOS), 0 where it only conditions the model (BOS, system
prompt, ``[INST] ... [/INST]``); see :mod:`megallama.data.chat`. Text-only corpora have no mask
file: every token is a target. When a corpus mixes text and chat documents the text documents'
bytes are all 1. :attr:`IndexedTokens.loss_mask` is the mask memory-mapped, or None.

The writer creates both (and any sidecar, such as preprocessing's summary) under
temporary names and publishes them as one unit (:func:`megallama.data.outputs.publish`): an
older set is moved aside index first, the new ``.idx`` is renamed last, and a failed rename puts
the older set back; so a reader never pairs a complete index with a partial token file, and a
failed run leaves the previous files as they were; a corpus written without a mask removes an
older ``.mask`` at the prefix in the same step. Sizes are checked on open.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np

from megallama.data.outputs import publish

MAGIC = b"MLTOKIDX"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQQ")
HEADER_BYTES = _HEADER.size  # 40


class IndexedFormatError(ValueError):
    """A token file pair that is missing, truncated or not in this format."""


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id (< vocab_size) fits in it, else ``int32``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size > np.iinfo(np.int32).max:
        raise ValueError(f"vocab_size {vocab_size} does not fit int32 token ids")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def index_paths(prefix: str | Path) -> tuple[Path, Path]:
    """``(<prefix>.bin, <prefix>.idx)``."""
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


def mask_path(prefix: str | Path) -> Path:
    """``<prefix>.mask``: the loss mask beside the tokens (chat data only)."""
    return Path(f"{prefix}.mask")


class IndexedWriter:
    """Appends documents to a new token file; ``finalize()`` publishes it atomically.

    Use as a context manager: leaving the block normally finalizes, leaving it with an
    exception removes the temporary files and leaves any previous files untouched. The loss mask
    file is started by the first ``add_documents`` call that passes a mask (the tokens before it
    get 1s: all targets) and is then written for every later document.
    """

    def __init__(self, prefix: str | Path, vocab_size: int) -> None:
        self.prefix = Path(prefix)
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype(self.vocab_size)
        self.bin_path, self.idx_path = index_paths(self.prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._tag = f".tmp-{os.getpid()}-{id(self):x}"
        self._bin_tmp = self.bin_path.with_name(f".{self.bin_path.name}{self._tag}")
        self._idx_tmp = self.idx_path.with_name(f".{self.idx_path.name}{self._tag}")
        self.mask_path = mask_path(self.prefix)
        self._mask_tmp = self.mask_path.with_name(f".{self.mask_path.name}{self._tag}")
        self._mask_file: BinaryIO | None = None
        self._sidecar_tmps: list[Path] = []
        self._file = open(self._bin_tmp, "wb")
        self._lengths: list[int] = []
        self.num_tokens = 0
        self._state = "open"

    @property
    def num_docs(self) -> int:
        """Documents added so far."""
        return len(self._lengths)

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document's token ids (already including any BOS/EOS)."""
        array = np.asarray(ids)
        if array.ndim != 1:
            raise ValueError(f"a document is a 1-D sequence of ids, got shape {array.shape}")
        self.add_documents(array, [array.shape[0]])

    def add_documents(self, tokens: np.ndarray, lengths: Sequence[int] | np.ndarray,
                      mask: np.ndarray | None = None) -> None:
        """Append several documents given as one concatenated id array and their lengths, with
        their loss mask (one 0/1 per token) or None (every token a target)."""
        if self._state != "open":
            raise RuntimeError(f"writer for {self.prefix} is already {self._state}")
        tokens = np.asarray(tokens)
        lengths = [int(n) for n in np.asarray(lengths).reshape(-1)]
        if sum(lengths) != tokens.shape[0] or any(n < 0 for n in lengths):
            raise ValueError(f"lengths {sum(lengths)} do not add up to {tokens.shape[0]} tokens")
        if tokens.size:
            if not np.issubdtype(tokens.dtype, np.integer):
                raise ValueError(f"token ids must be integers, got {tokens.dtype}")
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"token id {bad} outside [0, {self.vocab_size}) for {self.prefix}")
        if mask is not None and np.asarray(mask).shape != tokens.shape:
            raise ValueError(f"loss mask of {np.asarray(mask).shape} for {tokens.shape} tokens")
        self._write_mask(mask, tokens.shape[0])
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.extend(lengths)
        self.num_tokens += tokens.shape[0]

    def _write_mask(self, mask: np.ndarray | None, count: int) -> None:
        if mask is None and self._mask_file is None:
            return
        if self._mask_file is None:  # the first masked documents: the earlier ones get 1s
            self._mask_file = open(self._mask_tmp, "wb")
            for start in range(0, self.num_tokens, 1 << 24):
                self._mask_file.write(b"\x01" * min(1 << 24, self.num_tokens - start))
        if mask is None:
            self._mask_file.write(b"\x01" * count)
        else:
            self._mask_file.write(np.asarray(mask).astype(np.uint8, copy=False).tobytes())

    def finalize(self, sidecars: Mapping[Path, bytes] | None = None) -> None:
        """Write the index and publish ``.bin``, the ``sidecars`` (path -> content, e.g. a
        summary) and ``.idx`` as one unit: afterwards all of them are the new files or, when this
        raises, all are as they were before."""
        if self._state != "open":
            raise RuntimeError(f"writer for {self.prefix} is already {self._state}")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            moves = [(self._bin_tmp, self.bin_path)]
            if self._mask_file is not None:
                self._mask_file.flush()
                os.fsync(self._mask_file.fileno())
                self._mask_file.close()
                moves.append((self._mask_tmp, self.mask_path))
            for path, content in (sidecars or {}).items():
                tmp = Path(path).with_name(f".{Path(path).name}{self._tag}")
                self._sidecar_tmps.append(tmp)
                _write_synced(tmp, content)
                moves.append((tmp, Path(path)))
            offsets = np.zeros(len(self._lengths) + 1, dtype="<i8")
            np.cumsum(self._lengths, out=offsets[1:])
            header = _HEADER.pack(
                MAGIC,
                VERSION,
                self.dtype.itemsize,
                self.vocab_size,
                self.num_docs,
                self.num_tokens,
            )
            _write_synced(self._idx_tmp, header + offsets.tobytes())
            _publish_without_stale_mask([*moves, (self._idx_tmp, self.idx_path)], self.mask_path)
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"

    def abort(self) -> None:
        """Discard everything written; previous files at the prefix stay as they were."""
        if not self._file.closed:
            self._file.close()
        if self._mask_file is not None and not self._mask_file.closed:
            self._mask_file.close()
        for tmp in (self._bin_tmp, self._idx_tmp, self._mask_tmp, *self._sidecar_tmps):
            tmp.unlink(missing_ok=True)
        self._state = "aborted"

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.finalize()


def _publish_without_stale_mask(moves: list[tuple[Path, Path]], mask: Path) -> None:
    """``publish(moves)``; when the new set has no mask, an older ``mask`` at the prefix is moved
    aside first and deleted after the publication (put back when it fails), so that the new
    tokens are never read with the old corpus's mask."""
    if any(final == mask for _, final in moves) or not os.path.lexists(mask):
        publish(moves)
        return
    aside = mask.with_name(f".{mask.name}.old-{os.getpid()}")
    os.replace(mask, aside)
    try:
        publish(moves)
    except BaseException:
        os.replace(aside, mask)
        raise
    aside.unlink(missing_ok=True)


def _write_synced(path: Path, content: bytes) -> None:
    with open(path, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def read_index(idx_path: str | Path) -> tuple[np.dtype, int, np.ndarray]:
    """Parse an ``.idx`` file: ``(token dtype, vocab_size, doc_offsets)``."""
    idx_path = Path(idx_path)
    if not idx_path.is_file():
        what = "is not a file" if idx_path.exists() else "not found"
        raise IndexedFormatError(f"token index {what}: {idx_path}")
    try:
        data = idx_path.read_bytes()
    except OSError as exc:
        raise IndexedFormatError(f"cannot read token index {idx_path}: {exc.strerror}") from None
    if len(data) < HEADER_BYTES or data[:8] != MAGIC:
        raise IndexedFormatError(f"{idx_path} is not a megallama token index (bad header)")
    _, version, itemsize, vocab_size, num_docs, num_tokens = _HEADER.unpack_from(data)
    if version != VERSION:
        raise IndexedFormatError(f"{idx_path}: index version {version}, expected {VERSION}")
    if itemsize not in (2, 4):
        raise IndexedFormatError(f"{idx_path}: unsupported token size {itemsize} bytes")
    expected = HEADER_BYTES + 8 * (num_docs + 1)
    if len(data) != expected:
        raise IndexedFormatError(
            f"{idx_path} is truncated or corrupt: {len(data)} bytes, expected {expected} "
            f"for {num_docs} documents"
        )
    offsets = np.frombuffer(data, dtype="<i8", offset=HEADER_BYTES).astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != num_tokens or np.any(np.diff(offsets) < 0):
        raise IndexedFormatError(f"{idx_path}: document offsets are inconsistent")
    dtype = np.dtype("<u2") if itemsize == 2 else np.dtype("<i4")
    return dtype, int(vocab_size), offsets


class IndexedTokens:
    """Read side: the tokens of ``<prefix>.bin`` memory-mapped, with the document index."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        self.bin_path, self.idx_path = index_paths(self.prefix)
        self.dtype, self.vocab_size, self.doc_offsets = read_index(self.idx_path)
        if not self.bin_path.is_file():
            raise IndexedFormatError(f"token file not found: {self.bin_path}")
        size = self.bin_path.stat().st_size
        expected = self.num_tokens * self.dtype.itemsize
        if size != expected:
            what = "truncated" if size < expected else "longer than its index"
            raise IndexedFormatError(
                f"token file {self.bin_path} is {what}: {size} bytes, index {self.idx_path} "
                f"says {self.num_tokens} tokens = {expected} bytes"
            )
        if self.num_tokens:
            try:
                self.tokens: np.ndarray = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
            except OSError as exc:
                raise IndexedFormatError(
                    f"cannot read token file {self.bin_path}: {exc.strerror or exc}") from None
        else:  # numpy cannot map an empty file
            self.tokens = np.empty(0, dtype=self.dtype)
        self.mask_path = mask_path(self.prefix)
        self.loss_mask: np.ndarray | None = self._open_mask()

    def _open_mask(self) -> np.ndarray | None:
        """``<prefix>.mask`` memory-mapped (uint8, one per token), or None when there is none."""
        if not os.path.lexists(self.mask_path):
            return None
        if not self.mask_path.is_file():
            raise IndexedFormatError(f"loss mask {self.mask_path} is not a file")
        size = self.mask_path.stat().st_size
        if size != self.num_tokens:
            what = "truncated" if size < self.num_tokens else "longer than its index"
            raise IndexedFormatError(
                f"loss mask {self.mask_path} is {what}: {size} bytes, index {self.idx_path} says "
                f"{self.num_tokens} tokens (one byte each)"
            )
        if not self.num_tokens:
            return np.empty(0, dtype=np.uint8)
        try:
            return np.memmap(self.mask_path, dtype=np.uint8, mode="r")
        except OSError as exc:
            raise IndexedFormatError(
                f"cannot read loss mask {self.mask_path}: {exc.strerror or exc}") from None

    @property
    def num_tokens(self) -> int:
        """Total tokens over all documents."""
        return int(self.doc_offsets[-1])

    @property
    def num_docs(self) -> int:
        """Number of documents."""
        return int(self.doc_offsets.shape[0] - 1)

    def __len__(self) -> int:
        return self.num_docs

    def document(self, index: int) -> np.ndarray:
        """The token ids of document ``index`` (a read-only view into the map)."""
        if not -self.num_docs <= index < self.num_docs:
            raise IndexError(f"document {index} out of range for {self.num_docs} documents")
        index %= self.num_docs
        return self.tokens[self.doc_offsets[index] : self.doc_offsets[index + 1]]

    def __repr__(self) -> str:
        return (
            f"IndexedTokens({str(self.prefix)!r}, docs={self.num_docs}, "
            f"tokens={self.num_tokens}, dtype={self.dtype.name}, vocab={self.vocab_size})"
        )
