"""The tokenizers megallama reads, behind one interface, and the check that a model's
vocabulary matches one.

``Tokenizer(path)`` opens either kind, chosen from the file itself:

- a SentencePiece model (Llama 2's ``tokenizer.model``, or one from megallama-train-tokenizer):
  :class:`SentencePieceTokenizer`, below;
- a tiktoken BPE file (Llama 3's ``tokenizer.model``: one ``base64-token rank`` per line):
  :class:`~megallama.data.tiktoken_bpe.TiktokenTokenizer`, with Meta's split pattern and 256
  special tokens after the ranks (128,256 ids for Llama 3).

Both give ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``, ``stop_ids`` (the ids that end a
generation), ``special_tokens``, ``chat_format`` ("llama2" or "llama3", the dialog format of
:mod:`megallama.data.chat`), ``encode`` / ``encode_batch`` / ``decode`` and ``id_to_piece``.

Llama 2's ``tokenizer.model`` is a 32000-piece SentencePiece BPE with byte fallback:
UNK=0, BOS=1, EOS=2 and no pad piece (``pad_id == -1``), so padding is never implicit:
whoever pads a batch chooses the pad value and masks it. Text outside the vocabulary is
encoded as UTF-8 byte pieces (``<0xF0>`` ...), so every string encodes without UNK and
``decode(encode(text)) == text`` holds exactly (see ``decode`` for the one exception).

The model's normalizer adds a "dummy prefix": the text is encoded as if it began with a
space, so "Hello" becomes ``▁Hello``; decoding removes that one leading space again. A
text that really begins with a space therefore encodes with an extra ``▁`` piece
(" leading" -> ``▁``, ``▁leading``) and decodes back with its space; ``decode`` relies on
sentencepiece (>= 0.2) doing exactly this, which the tests pin down.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

# the first line of a tiktoken BPE file: a base64 token, a space, its rank
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n")


class TokenizerError(ValueError):
    """A tokenizer model that cannot be used: missing, unreadable, corrupt or mismatched."""


class VocabMismatchError(TokenizerError):
    """The model's vocabulary size differs from the tokenizer's."""


class Tokenizer:
    """A tokenizer model loaded from ``path``; ``Tokenizer(path)`` returns the implementation
    that the file's content calls for (:class:`SentencePieceTokenizer` or
    :class:`~megallama.data.tiktoken_bpe.TiktokenTokenizer`)."""

    path: Path
    chat_format: str = ""  # "llama2" or "llama3": the dialog format of megallama.data.chat

    def __new__(cls, path: str | Path) -> Tokenizer:
        if cls is Tokenizer:
            cls = _implementation(Path(path))
        return super().__new__(cls)

    def __reduce__(self) -> tuple[type[Tokenizer], tuple[Path]]:
        # the native models are not picklable; worker processes reload from the path
        return (type(self), (self.path,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        """Number of ids, i.e. the embedding rows a model for this tokenizer needs."""
        raise NotImplementedError

    @property
    def bos_id(self) -> int:
        """Begin-of-sequence id (1 for Llama 2, 128000 for Llama 3)."""
        raise NotImplementedError

    @property
    def eos_id(self) -> int:
        """End-of-sequence id (2 for Llama 2, 128001 ``<|end_of_text|>`` for Llama 3)."""
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        """Pad id, or -1 when the model has no pad piece (Llama 2): pad explicitly."""
        raise NotImplementedError

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a generation: EOS, and for Llama 3 also ``<|eom_id|>`` and
        ``<|eot_id|>`` (Meta's ``stop_tokens``), since a chat turn ends with ``<|eot_id|>``."""
        return (self.eos_id,)

    @property
    def special_tokens(self) -> dict[str, int]:
        """The control tokens by their text (``<s>``, ``<|eot_id|>``, ...)."""
        raise NotImplementedError

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS first when ``bos`` and EOS last when ``eos``."""
        raise NotImplementedError

    def encode_batch(
        self, texts: Sequence[str], bos: bool = True, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]:
        """``encode`` of several texts in one call; ``num_threads`` defaults to 1 because
        preprocessing parallelises over processes."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; ids outside ``[0, vocab_size)`` raise TokenizerError."""
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of one id (for inspection and debugging)."""
        raise NotImplementedError

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        """``ids`` as a list of ints, or TokenizerError for one outside the vocabulary."""
        values = [int(i) for i in _as_list(ids)]
        vocab = self.vocab_size
        bad = [i for i in values if i < 0 or i >= vocab]
        if bad:
            raise TokenizerError(
                f"cannot decode id {bad[0]}: outside [0, {vocab}) of tokenizer {self.path}"
                " (strip padding before decoding)"
            )
        return values


def _implementation(path: Path) -> type[Tokenizer]:
    """The class for the file at ``path``: tiktoken when its first line is ``base64 rank``,
    else SentencePiece (whose loader reports a missing, empty or corrupt file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return SentencePieceTokenizer  # its loader names the problem
    line = head[: head.find(b"\n") + 1] if b"\n" in head else b""
    if _TIKTOKEN_LINE.fullmatch(line):
        from megallama.data.tiktoken_bpe import TiktokenTokenizer  # imports tiktoken

        return TiktokenTokenizer
    return SentencePieceTokenizer


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model loaded from ``path`` with Llama's BOS/EOS conventions."""

    chat_format = "llama2"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._sp = _load(self.path)

    @property
    def vocab_size(self) -> int:
        """Number of pieces, i.e. the embedding rows a model for this tokenizer needs."""
        return int(self._sp.vocab_size())

    @property
    def bos_id(self) -> int:
        """Begin-of-sequence id (1 for Llama)."""
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        """End-of-sequence id (2 for Llama)."""
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        """Pad id, or -1 when the model has no pad piece (Llama): pad explicitly."""
        return int(self._sp.pad_id())

    @property
    def unk_id(self) -> int:
        """Unknown-piece id (0 for Llama; never produced when byte fallback is on)."""
        return int(self._sp.unk_id())

    @property
    def special_tokens(self) -> dict[str, int]:
        """UNK, BOS, EOS (and a pad piece if the model has one) by their piece."""
        ids = [i for i in (self.unk_id, self.bos_id, self.eos_id, self.pad_id) if i >= 0]
        return {self._sp.id_to_piece(i): i for i in ids}

    @property
    def byte_fallback(self) -> bool:
        """Whether unknown characters are encoded as UTF-8 byte pieces."""
        return bool(self._sp.vocab_size() > 0 and self._sp.piece_to_id("<0x00>") != self.unk_id)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS first when ``bos`` and EOS last when ``eos``."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = True, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]:
        """``encode`` of several texts in one call (sentencepiece loops in C++).

        ``num_threads`` defaults to 1 because preprocessing parallelises over processes.
        """
        return self._sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; BOS/EOS/UNK control pieces produce no text.

        For ids from ``encode`` this is the exact inverse, leading spaces included. The
        one exception is inherent to SentencePiece: the meta symbol ``▁`` (U+2581) in the
        input text is indistinguishable from a space and decodes as one. Ids outside
        ``[0, vocab_size)`` (e.g. a pad value of -1 or -100) raise TokenizerError: strip
        padding before decoding.
        """
        return self._sp.decode(self._check_ids(ids))

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of one id (for inspection and debugging)."""
        if not 0 <= int(token_id) < self.vocab_size:
            raise TokenizerError(f"id {token_id} outside [0, {self.vocab_size})")
        return self._sp.id_to_piece(int(token_id))


def _as_list(ids: Iterable[int]) -> list[int]:
    tolist = getattr(ids, "tolist", None)  # numpy arrays and torch tensors
    if callable(tolist):
        values = tolist()
        return values if isinstance(values, list) else [values]
    return list(ids)


def _load(path: Path) -> spm.SentencePieceProcessor:
    if not path.exists():
        raise TokenizerError(f"tokenizer model not found: {path}")
    if not path.is_file():
        raise TokenizerError(f"tokenizer model is not a file: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerError(f"cannot read tokenizer model {path}: {exc.strerror}") from None
    if not data:
        raise TokenizerError(f"tokenizer model {path} is empty (0 bytes)")
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "ParseFromArray" in first:  # sentencepiece's C++ check, not news to the user
            first = "its bytes do not parse as a SentencePiece ModelProto"
        raise TokenizerError(
            f"tokenizer model {path} is not a valid SentencePiece model ({first}) nor a tiktoken "
            "BPE file ('base64-token rank' lines); give Llama 2's or Llama 3's tokenizer.model "
            "or one from megallama-train-tokenizer"
        ) from None
    if sp.vocab_size() <= 0:
        raise TokenizerError(f"tokenizer model {path} has no vocabulary")
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise TokenizerError(f"tokenizer model {path} defines no BOS or no EOS piece")
    return sp


def check_vocab(tokenizer_vocab: int, model_vocab: int, tokenizer_path: str | Path) -> None:
    """Raise VocabMismatchError unless the model's vocab size equals the tokenizer's.

    A model with fewer rows would index out of its embedding; one with more would train
    rows no token ever uses and, worse, usually means the checkpoint belongs to another
    tokenizer. The project requires equality; pad a vocabulary in the tokenizer, not here.
    """
    if int(tokenizer_vocab) != int(model_vocab):
        raise VocabMismatchError(
            f"model vocab_size {model_vocab} != tokenizer vocab_size {tokenizer_vocab} of "
            f"{tokenizer_path}: set the model's vocab_size to {tokenizer_vocab} or use the "
            "tokenizer the model was trained with"
        )
