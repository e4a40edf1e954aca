"""Checks of the data a run names, on disk, before any collective. Each failure is one
:class:`~megallama.config.ConfigError` line naming the option, and the primary problem is
reported first: every token file exists and is intact (its index, its tokens and, for chat data,
its loss mask: a truncated ``.mask`` is reported like a truncated ``.bin``); all of them come
from one tokenizer; ``data.tokenizer`` loads and is that tokenizer; ``model.vocab_size`` matches
it; every file holds at least one sample (and, packed by document, a document of 2 or more
tokens); the held-out validation tail (``data.valid_fraction``)
fits. So a config whose tokenizer disagrees with its token files says that, instead of advising
a model vocabulary that the token files would then refuse."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from megallama.config import ConfigError, ModelConfig
from megallama.config.train_config import DataConfig
from megallama.data.dataset import holdout_start
from megallama.data.indexed import IndexedTokens
from megallama.data.tokenizer import Tokenizer, TokenizerError


class _TokenFile(NamedTuple):
    option: str  # e.g. "data.train[0]"
    prefix: str
    vocab_size: int
    num_tokens: int
    longest_document: int

    @property
    def name(self) -> str:
        return f"{self.option}={self.prefix}"


def check_data_files(d: DataConfig, model: ModelConfig) -> None:
    """The token files of ``data.train`` / ``data.valid`` and ``data.tokenizer``, in the order of
    the module docstring."""
    files = [_open_token_file(f"{option}[{i}]", prefix)
             for option, prefixes in (("data.train", d.train), ("data.valid", d.valid))
             for i, prefix in enumerate(prefixes)]
    if not files:
        return
    first = files[0]
    for other in files[1:]:
        if other.vocab_size != first.vocab_size:
            raise ConfigError(
                f"{other.name} was tokenized with a {other.vocab_size}-piece vocabulary but "
                f"{first.name} with a {first.vocab_size}-piece one: all token files must come "
                "from the same tokenizer; re-tokenize one of them"
            )
    if d.tokenizer is not None:
        _check_tokenizer(d.tokenizer, first, model.vocab_size)
    if first.vocab_size != model.vocab_size:
        raise ConfigError(
            f"{first.name} was tokenized with a {first.vocab_size}-piece vocabulary but "
            f"model.vocab_size={model.vocab_size}; set model.vocab_size={first.vocab_size} or "
            "re-tokenize"
        )
    for f in files:
        if f.num_tokens < d.seq_len + 1:
            raise ConfigError(
                f"{f.name} holds {f.num_tokens} tokens, fewer than one sample of "
                f"data.seq_len+1 = {d.seq_len + 1}; give more data or lower data.seq_len"
            )
    if d.packing != "concat":
        for f in files:
            if f.longest_document < 2:
                raise ConfigError(
                    f"{f.name}: every document is shorter than 2 tokens, so data.packing="
                    f"{d.packing} has nothing to predict; use data.packing=concat or other data")
    if not d.valid and d.valid_fraction > 0:
        _check_holdout(first, d.seq_len, d.valid_fraction)


def _open_token_file(option: str, prefix: str) -> _TokenFile:
    try:
        tokens = IndexedTokens(prefix)
    except ValueError as exc:  # IndexedFormatError: missing, unreadable, truncated or foreign
        # (the .idx, the .bin or the .mask beside them)
        verb = "create" if "not found" in str(exc) else "re-create"
        raise ConfigError(f"{option}={prefix}: {exc} ({verb} it with megallama-preprocess)"
                          ) from None
    offsets = np.asarray(tokens.doc_offsets, dtype=np.int64)
    longest = int(np.diff(offsets).max()) if len(offsets) > 1 else 0
    found = _TokenFile(option, prefix, tokens.vocab_size, tokens.num_tokens, longest)
    del tokens  # release the memory map
    return found


def _check_tokenizer(path: str, files: _TokenFile, model_vocab: int) -> None:
    """``data.tokenizer`` loads and has the vocabulary the token files were made with."""
    try:
        vocab = Tokenizer(Path(path)).vocab_size
    except TokenizerError as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None
    if vocab == files.vocab_size:
        return
    fix = "point data.tokenizer at the tokenizer megallama-preprocess used"
    if files.vocab_size == model_vocab:
        raise ConfigError(
            f"data.tokenizer: model vocab_size {model_vocab} != tokenizer vocab_size {vocab} of "
            f"{path}, and {files.name} was tokenized with {files.vocab_size} pieces as well: {fix}"
        )
    raise ConfigError(
        f"data.tokenizer={path} has {vocab} pieces but {files.name} was tokenized with a "
        f"{files.vocab_size}-piece vocabulary: {fix}, or re-tokenize"
    )


def _check_holdout(train: _TokenFile, seq_len: int, fraction: float) -> None:
    """Without ``data.valid`` the tail of the first training file is held out for validation;
    the rule of :func:`megallama.data.dataset.holdout_start`, checked before any
    collective instead of failing on every rank after start-up."""
    total = train.num_tokens
    keep = holdout_start(total, seq_len, fraction)
    if keep < seq_len + 1:
        raise ConfigError(
            f"{train.name} holds {total} tokens: too few to hold out data.valid_fraction="
            f"{fraction} for validation and keep a training sample of data.seq_len+1 = "
            f"{seq_len + 1}; give data.valid, more data or a lower data.seq_len"
        )
