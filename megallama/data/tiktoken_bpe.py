"""Llama 3's tokenizer: a tiktoken byte-level BPE file with Meta's split pattern and special tokens.

The file (Llama 3's ``tokenizer.model``) holds 128,000 mergeable ranks, one ``base64-token rank``
per line. As in Meta's reference ``Tokenizer`` (``llama_models.llama3.tokenizer``), 256 special
tokens follow the ranks: ``<|begin_of_text|>`` (BOS, 128000), ``<|end_of_text|>`` (EOS, 128001),
``<|reserved_special_token_0|>``, ``<|reserved_special_token_1|>``, ``<|finetune_right_pad_id|>``
(pad, 128004), ``<|step_id|>``, ``<|start_header_id|>`` (128006), ``<|end_header_id|>``,
``<|eom_id|>`` (128008), ``<|eot_id|>`` (128009), ``<|python_tag|>``, ``<|image|>``, then
``<|reserved_special_token_2|>`` ... ``<|reserved_special_token_245|>``: 128,256 ids.

``encode`` gives Meta's ids exactly. Like Meta's (``allowed_special=set()``,
``disallowed_special=()``), it encodes the text of a special token found in the input as plain
text, never as the special id: only the chat format places control ids. Meta cuts a text into
pieces of at most 400,000 characters, and each of those wherever a run of whitespace or of
non-whitespace would exceed 25,000 characters (tiktoken's regex otherwise overflows), and encodes
the pieces separately; the cuts change ids at those points, so they are replicated here (found
by measuring only the runs through every 25,000th character, rather than Meta's loop over every
character).

``decode`` is tiktoken's (Meta's): special tokens decode to their text, and bytes that do not
form UTF-8 (a character cut between tokens) decode as U+FFFD. Every text round-trips:
``decode(encode(text)) == text``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from megallama.data.tokenizer import Tokenizer, TokenizerError

try:
    import tiktoken
except ImportError:  # a dependency of megallama; checked when a tiktoken file is opened
    tiktoken = None

# Meta's pattern string (llama_models.llama3.tokenizer.Tokenizer.pat_str)
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (tool calls)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
)
ALL_SPECIAL_TOKENS = SPECIAL_TOKENS + tuple(
    f"<|reserved_special_token_{2 + i}|>"
    for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(SPECIAL_TOKENS)))

TIKTOKEN_MAX_ENCODE_CHARS = 400_000  # Meta's limit of one tiktoken call
MAX_NO_WHITESPACES_CHARS = 25_000  # Meta's limit of one run of (non-)whitespace
# a run longer than the limit, matched only from its first character: linear time (without the
# lookbehinds, a short run would be rescanned from each of its characters). ``\s`` is exactly
# ``str.isspace`` (both are CPython's Py_UNICODE_ISSPACE), the test of Meta's loop.
_LONG_RUN = re.compile(
    rf"(?<!\s)\s{{{MAX_NO_WHITESPACES_CHARS + 1},}}|(?<!\S)\S{{{MAX_NO_WHITESPACES_CHARS + 1},}}")
_SPACE_RUN, _WORD_RUN = re.compile(r"\s+"), re.compile(r"\S+")


class TiktokenTokenizer(Tokenizer):
    """Llama 3's tiktoken BPE file at ``path``, with Meta's pattern and 256 special tokens."""

    chat_format = "llama3"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        ranks = _load_ranks(self.path)
        self._special = {tok: len(ranks) + i for i, tok in enumerate(ALL_SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(name=self.path.name, pat_str=PAT_STR,
                                      mergeable_ranks=ranks, special_tokens=self._special)
        self._vocab = len(ranks) + len(self._special)

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken ``Encoding`` itself (raw speed for benchmarks; no 400k/25k cuts)."""
        return self._enc

    @property
    def vocab_size(self) -> int:
        """Ranks + 256 special tokens (128,256 for Llama 3)."""
        return self._vocab

    @property
    def bos_id(self) -> int:
        """``<|begin_of_text|>`` (128000 for Llama 3)."""
        return self._special["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        """``<|end_of_text|>`` (128001 for Llama 3)."""
        return self._special["<|end_of_text|>"]

    @property
    def pad_id(self) -> int:
        """``<|finetune_right_pad_id|>`` (128004), Meta's pad id."""
        return self._special["<|finetune_right_pad_id|>"]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """``<|end_of_text|>``, ``<|eom_id|>`` and ``<|eot_id|>``, Meta's ``stop_tokens``."""
        return (self.eos_id, self._special["<|eom_id|>"], self._special["<|eot_id|>"])

    @property
    def special_tokens(self) -> dict[str, int]:
        """The 256 special tokens by their text."""
        return dict(self._special)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (Meta's), with BOS first when ``bos`` and EOS last when ``eos``."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if len(text) <= MAX_NO_WHITESPACES_CHARS:  # no cut possible: one call
            ids = self._enc.encode_ordinary(text)
        else:
            ids = []
            for piece in split_for_tiktoken(text):
                ids += self._enc.encode_ordinary(piece)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(
        self, texts: Sequence[str], bos: bool = True, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]:
        """``encode`` of each text (``num_threads`` > 1 encodes on a thread pool)."""
        if num_threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(num_threads) as pool:
                return list(pool.map(lambda t: self.encode(t, bos, eos), texts))
        return [self.encode(t, bos, eos) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (Meta's ``decode``: special tokens as their text). Ids outside
        ``[0, vocab_size)`` (e.g. a pad value of -1 or -100) raise TokenizerError."""
        return self._enc.decode(self._check_ids(ids))

    def id_to_piece(self, token_id: int) -> str:
        """The bytes of one id as text (undecodable bytes as ``\\xNN``), or a special token."""
        if not 0 <= int(token_id) < self.vocab_size:
            raise TokenizerError(f"id {token_id} outside [0, {self.vocab_size})")
        raw = self._enc.decode_single_token_bytes(int(token_id))
        return raw.decode("utf-8", errors="backslashreplace")


def split_for_tiktoken(text: str) -> Iterator[str]:
    """Meta's cuts of ``text`` before encoding: pieces of at most 400,000 characters, each cut
    further so that no run of whitespace or of non-whitespace (``str.isspace``) exceeds 25,000
    characters (a long run is cut every 25,000 characters from its start)."""
    for start in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
        chunk = text[start: start + TIKTOKEN_MAX_ENCODE_CHARS]
        if not _has_long_run(chunk):  # the common case: no cut inside this chunk
            yield chunk
            continue
        begin = 0
        for run in _LONG_RUN.finditer(chunk):
            for cut in range(run.start() + MAX_NO_WHITESPACES_CHARS, run.end(),
                             MAX_NO_WHITESPACES_CHARS):
                yield chunk[begin:cut]
                begin = cut
        yield chunk[begin:]


def _has_long_run(chunk: str) -> bool:
    """Whether ``chunk`` has a run of whitespace or of non-whitespace longer than the limit.
    Such a run covers one of the positions 0, 25000, 50000, ...: only the runs through those
    are measured (forward, and backward on the reversed chunk), much faster than a regex pass
    over every character."""
    limit, last = MAX_NO_WHITESPACES_CHARS, len(chunk) - 1
    reverse = ""
    for p in range(0, len(chunk), limit):
        run = _SPACE_RUN if chunk[p].isspace() else _WORD_RUN
        ahead = run.match(chunk, p).end() - p
        if ahead > limit:
            return True
        reverse = reverse or chunk[::-1]
        behind = run.match(reverse, last - p).end() - (last - p)
        if ahead + behind - 1 > limit:
            return True
    return False


def _load_ranks(path: Path) -> dict[bytes, int]:
    """The mergeable ranks of a tiktoken BPE file, checked: one TokenizerError line naming the
    file for a bad line, duplicate tokens or ranks that are not 0..n-1."""
    if tiktoken is None:
        raise TokenizerError(f"tokenizer {path} is a tiktoken BPE file (Llama 3) but tiktoken is "
                             "not installed: pip install tiktoken (a dependency of megallama)")
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise TokenizerError(f"cannot read tokenizer model {path}: {exc.strerror}") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"tokenizer model {path}, line {n}: not 'base64-token rank' (a "
                                 "tiktoken BPE file such as Llama 3's tokenizer.model)") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"tokenizer model {path}: its {len(ranks)} tokens do not have the "
                             "distinct ranks 0..n-1 of a tiktoken BPE file")
    return ranks


__all__ = ["ALL_SPECIAL_TOKENS", "PAT_STR", "SPECIAL_TOKENS", "TiktokenTokenizer",
           "split_for_tiktoken"]
