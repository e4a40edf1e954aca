"""Checks of the data a run names, on disk, before any collective: every token file exists, is
intact, was tokenized with the model's vocabulary and holds at least one sample; the tokenizer
matches the model. Each failure is one :class:`~megallama.config.ConfigError` line naming the
option."""

from __future__ import annotations

from pathlib import Path

from megallama.config import ConfigError, ModelConfig
from megallama.config.train_config import DataConfig
from megallama.data.indexed import IndexedTokens
from megallama.data.tokenizer import Tokenizer, TokenizerError, check_vocab


def check_data_files(d: DataConfig, model: ModelConfig) -> None:
    """The token files of ``data.train`` / ``data.valid`` and ``data.tokenizer``."""
    for option, prefixes in (("data.train", d.train), ("data.valid", d.valid)):
        for i, prefix in enumerate(prefixes):
            _check_token_file(f"{option}[{i}]", prefix, model.vocab_size, d.seq_len)
    if d.tokenizer is not None:
        _check_tokenizer(d.tokenizer, model.vocab_size)


def _check_token_file(option: str, prefix: str, model_vocab: int, seq_len: int) -> None:
    try:
        tokens = IndexedTokens(prefix)
    except ValueError as exc:  # IndexedFormatError: missing, truncated or foreign files
        raise ConfigError(
            f"{option}={prefix}: {exc} (create it with megallama-preprocess)"
        ) from None
    vocab, num_tokens = tokens.vocab_size, tokens.num_tokens
    del tokens  # release the memory map
    if vocab != model_vocab:
        raise ConfigError(
            f"{option}={prefix} was tokenized with a {vocab}-piece vocabulary but "
            f"model.vocab_size={model_vocab}; set model.vocab_size={vocab} or re-tokenize"
        )
    if num_tokens < seq_len + 1:
        raise ConfigError(
            f"{option}={prefix} holds {num_tokens} tokens, fewer than one sample of "
            f"data.seq_len+1 = {seq_len + 1}; give more data or lower data.seq_len"
        )


def _check_tokenizer(path: str, model_vocab: int) -> None:
    try:
        tokenizer = Tokenizer(Path(path))
        check_vocab(tokenizer.vocab_size, model_vocab, path)
    except TokenizerError as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None
