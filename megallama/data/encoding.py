"""Tokenizing preprocessing's chunks of documents: texts with BOS/EOS, dialogs in the chat format
with their loss mask, documents over a token limit dropped or truncated; in this process or over a
pool of worker processes (each loads the tokenizer once), results always in input order.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Literal, NamedTuple

import numpy as np

from megallama.data.chat import ChatFormatError, ChatTagError, encode_dialog
from megallama.data.indexed import token_dtype
from megallama.data.sources import ChatRecord, SourceError
from megallama.data.tokenizer import Tokenizer

OverlongPolicy = Literal["truncate", "drop"]
DEFAULT_OVERLONG: dict[str, OverlongPolicy] = {"text": "truncate", "chat": "drop"}

Item = str | ChatRecord  # a text document or a dialog


class Encoded(NamedTuple):
    """One encoded chunk: the kept documents' ids concatenated, their lengths and loss mask
    (None for text), the input's UTF-8 bytes and how many documents were overlong."""

    tokens: np.ndarray
    lengths: np.ndarray
    mask: np.ndarray | None
    nbytes: int
    dropped: int
    truncated: int


class Encoder:
    """Turns a chunk of texts or of dialogs (never both) into an :class:`Encoded`."""

    def __init__(self, tokenizer: Tokenizer, bos: bool, eos: bool, max_tokens: int | None = None,
                 overlong: dict[str, OverlongPolicy] | None = None,
                 allow_chat_tags: bool = False) -> None:
        self.tokenizer = tokenizer
        self.allow_chat_tags = allow_chat_tags  # keep chat tags in messages as text
        self.bos = bos
        self.eos = eos
        self.max_tokens = max_tokens
        self.overlong = overlong or DEFAULT_OVERLONG
        self.dtype = token_dtype(tokenizer.vocab_size)

    def __call__(self, items: list[Item]) -> Encoded:
        masks: list[list[bool]] | None = None
        if isinstance(items[0], ChatRecord):
            dialogs = [item for item in items if isinstance(item, ChatRecord)]
            encoded, masks = self._dialogs(dialogs)
            nbytes = sum(record.nbytes for record in dialogs)
        else:
            texts = [item for item in items if isinstance(item, str)]
            encoded = self.tokenizer.encode_batch(texts, bos=self.bos, eos=self.eos)
            nbytes = sum(len(text.encode("utf-8")) for text in texts)
        dropped, truncated = self._limit(encoded, masks)
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        count = int(lengths.sum())
        tokens = np.fromiter(itertools.chain.from_iterable(encoded), dtype=self.dtype, count=count)
        mask = None if masks is None else np.fromiter(
            itertools.chain.from_iterable(masks), dtype=np.uint8, count=count)
        return Encoded(tokens, lengths, mask, nbytes, dropped, truncated)

    def _dialogs(self, dialogs: list[ChatRecord]) -> tuple[list[list[int]], list[list[bool]]]:
        """Ids and loss masks of ``dialogs`` (:func:`~megallama.data.chat.encode_dialog`)."""
        encoded, masks = [], []
        for record in dialogs:
            try:
                ids, mask = encode_dialog(self.tokenizer, record.messages,
                                          allow_tags=self.allow_chat_tags)
            except ChatFormatError as exc:  # form checked on reading; tags, a tokenizer's problem
                bad = "bad dialog: " if isinstance(exc, ChatTagError) else ""
                raise SourceError(f"{record.where}: {bad}{exc}") from None
            encoded.append(ids)
            masks.append(mask)
        return encoded, masks

    def _limit(self, encoded: list[list[int]], masks: list[list[bool]] | None) -> tuple[int, int]:
        """Drop or truncate (in place) the documents longer than ``max_tokens``; the counts."""
        limit = self.max_tokens
        if limit is None:
            return 0, 0
        policy = self.overlong["chat" if masks is not None else "text"]
        long = [i for i, ids in enumerate(encoded) if len(ids) > limit]
        for i in reversed(long):
            if policy == "drop":
                del encoded[i]
                if masks is not None:
                    del masks[i]
            else:
                encoded[i] = encoded[i][:limit]
                if masks is not None:
                    masks[i] = masks[i][:limit]
        return (len(long), 0) if policy == "drop" else (0, len(long))


_WORKER_ENCODER: Encoder | None = None


def _init_worker(tokenizer_path: str, bos: bool, eos: bool, max_tokens: int | None,
                 overlong: dict[str, OverlongPolicy], allow_chat_tags: bool = False) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = Encoder(Tokenizer(tokenizer_path), bos, eos, max_tokens, overlong,
                              allow_chat_tags)


def _encode_in_worker(items: list[Item]) -> Encoded:
    assert _WORKER_ENCODER is not None, "worker not initialised"
    return _WORKER_ENCODER(items)


def default_start_method() -> str:
    """``fork`` (workers start in milliseconds) when this process is a plain single-threaded
    one, else ``spawn`` (about 0.3 s per pool): forking a process that runs other threads,
    e.g. torch's, can copy a lock some thread holds and deadlock the child."""
    single_threaded = threading.active_count() == 1 and "torch" not in sys.modules
    if single_threaded and "fork" in mp.get_all_start_methods():
        return "fork"
    return "spawn"


def encoded_chunks(chunks: Iterable[tuple[list[Item], int]], tokenizer: Tokenizer, workers: int,
                   start_method: str | None, encoder_args: tuple,
                   ) -> Iterator[tuple[Encoded, int]]:
    """(encoded chunk, input bytes done) in input order: in this process when ``workers`` is 1,
    else over a pool with a bounded number of chunks in flight. ``encoder_args`` are
    :class:`Encoder`'s arguments after the tokenizer."""
    if workers == 1:
        encoder = Encoder(tokenizer, *encoder_args)
        for items, done_bytes in chunks:
            yield encoder(items), done_bytes
        return
    context = mp.get_context(start_method or default_start_method())
    initargs = (str(tokenizer.path), *encoder_args)
    with context.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        pending: deque = deque()
        for items, done_bytes in chunks:
            pending.append((pool.apply_async(_encode_in_worker, (items,)), done_bytes))
            if len(pending) >= 4 * workers:  # bounded memory, order preserved
                result, done = pending.popleft()
                yield result.get(), done
        while pending:
            result, done = pending.popleft()
            yield result.get(), done
