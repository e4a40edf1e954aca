"""Reading documents from the corpus formats that preprocessing and tokenizer training accept.

Two formats, each optionally compressed (``.gz`` via gzip, ``.xz`` via lzma, chosen by suffix):

- text (any suffix other than below): documents are separated by one or more blank lines
  (lines that are empty or whitespace only); a document keeps its inner newlines and its
  leading/trailing spaces, only the newline ending its last line is dropped. Line endings
  are read in universal-newline mode, so ``\\r\\n`` becomes ``\\n``.
- JSONL (``.jsonl`` or ``.json``): one JSON object per line whose string field ``key``
  (default ``"text"``) is the document. Blank lines are ignored; malformed lines are an error
  naming ``file:line``, or are skipped and counted when ``on_bad_json="skip"``. Malformed
  includes what Python's parser cannot read although it is JSON (nesting deeper than its
  recursion limit, an integer longer than ``sys.get_int_max_str_digits()``) and document text
  with a lone UTF-16 surrogate escape (``"\\ud800"``), which is no character and has no UTF-8.
- chat JSONL (read when ``chat=True``, as preprocessing does): records with ``messages`` or the
  short form ``prompt``/``response`` (optional ``system``) are dialogs (see
  :mod:`megallama.data.chat`), checked here and yielded as :class:`ChatRecord`. The first record
  decides what a file holds: dialogs or text records, not both. A malformed dialog, or a record
  of the other kind, is a bad line like malformed JSON (error naming ``file:line``, or skipped).

Documents with empty text are skipped and counted; they would only add BOS/EOS.
Inputs are streamed line by line, so files larger than memory are fine.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from megallama.data.chat import CHAT_KEYS, ChatFormatError, json_type, record_messages, split_dialog

BadJsonPolicy = Literal["fail", "skip"]
COMPRESSED_SUFFIXES = (".gz", ".xz")
JSONL_SUFFIXES = (".jsonl", ".json")
MAX_REPORTED_BAD_LINES = 20
# a \uD800-\uDFFF escape: the only way a lone surrogate gets into a string read from valid UTF-8
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
DIALOG_NOT_TEXT = (
    "a dialog ('messages' or 'prompt'/'response' record), not a text record: its text is spread "
    "over its messages, so no --jsonl-key names it, and only megallama-preprocess reads dialogs; "
    "train the tokenizer on a text corpus (text files, or JSONL records with one text field), "
    "or fine-tune with the tokenizer of the model you start from")


class SourceError(ValueError):
    """An input file that cannot be read as a corpus (missing, malformed, not UTF-8, empty)."""


@dataclass(frozen=True)
class ChatRecord:
    """One dialog of a chat JSONL file, already checked (:func:`~megallama.data.chat.split_dialog`)
    and with the ``file:line`` it came from, for errors found later (while tokenizing)."""

    messages: list[dict[str, Any]]
    where: str

    @property
    def nbytes(self) -> int:
        """UTF-8 bytes of the message contents."""
        return sum(len(m["content"].encode("utf-8")) for m in self.messages)


def input_format(path: Path) -> Literal["text", "jsonl"]:
    """The corpus format of ``path`` from its suffixes, ignoring a compression suffix."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return "jsonl" if suffixes and suffixes[-1] in JSONL_SUFFIXES else "text"


def _open_binary(raw: BinaryIO, path: Path) -> BinaryIO:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if suffix == ".xz":
        return lzma.LZMAFile(raw, mode="rb")  # type: ignore[return-value]
    return raw


class DocumentReader:
    """Iterates over the documents of one input file and keeps counts for the summary.

    ``position`` is how far the underlying (possibly compressed) file has been read, in bytes
    of the file on disk, so that progress can be shown as a fraction of the input size.
    """

    def __init__(
        self,
        path: str | Path,
        jsonl_key: str = "text",
        on_bad_json: BadJsonPolicy = "fail",
        chat: bool = False,
    ) -> None:
        if on_bad_json not in ("fail", "skip"):
            raise ValueError(f"on_bad_json must be 'fail' or 'skip', got {on_bad_json!r}")
        self.path = Path(path)
        self.format = input_format(self.path)
        self.jsonl_key = jsonl_key
        self.on_bad_json = on_bad_json
        self.chat = chat
        self.kind: Literal["text", "chat"] | None = None  # of a JSONL file: its first record's
        self.first_line = 0  # ... at this line
        self.num_documents = 0
        self.num_dialogs = 0
        self.num_empty = 0
        self.num_bad_lines = 0
        self.bad_lines: list[str] = []  # the first MAX_REPORTED_BAD_LINES as "file:line: why"
        self._raw: BinaryIO | None = None
        if self.path.is_dir():
            raise SourceError(f"input {self.path} is a directory, not a file: name the files in it")
        if not self.path.is_file():
            raise SourceError(f"input file not found: {self.path}")

    @property
    def size(self) -> int:
        """Size of the file on disk in bytes."""
        return self.path.stat().st_size

    @property
    def position(self) -> int:
        """Bytes of the on-disk file consumed so far (0 before and after iteration)."""
        raw = self._raw
        if raw is None or raw.closed:
            return 0
        return raw.tell()

    def __iter__(self) -> Iterator[str | ChatRecord]:
        try:
            raw = open(self.path, "rb")
        except OSError as exc:
            raise SourceError(f"cannot read input file {self.path}: {exc.strerror}") from None
        with raw:
            self._raw = raw
            stream = io.TextIOWrapper(_open_binary(raw, self.path), encoding="utf-8")
            lines = self._numbered_lines(stream)
            if self.format == "jsonl":
                yield from self._jsonl_documents(lines)
            else:
                yield from self._text_documents(lines)

    def _numbered_lines(self, stream: io.TextIOWrapper) -> Iterator[tuple[int, str]]:
        try:
            yield from enumerate(stream, 1)
        except UnicodeDecodeError as exc:
            raise SourceError(self._where_not_utf8(exc)) from None
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
            raise SourceError(self._read_error(exc)) from None

    def _read_error(self, exc: BaseException) -> str:
        """One line for a failed read: an OS error (``strerror``), or a compressed file that is
        truncated or damaged (gzip/lzma/zlib errors, EOFError for a missing end marker)."""
        if isinstance(exc, OSError) and exc.strerror:
            return f"cannot read input file {self.path}: {exc.strerror}"
        if self.path.suffix.lower() in COMPRESSED_SUFFIXES:
            return (f"{self.path}: compressed file is truncated or damaged ({exc}); "
                    "recreate or re-download it")
        return f"cannot read input file {self.path}: {exc}"

    def _where_not_utf8(self, exc: UnicodeDecodeError) -> str:
        """``file:line: not valid UTF-8 (... at byte B of the line, offset O)``. The text stream
        decodes whole blocks ahead of the lines it yields, so the error's own position is inside
        a block: the (decompressed) bytes are scanned again line by line to find the real one."""
        offset = 0
        with open(self.path, "rb") as raw:
            for lineno, line in enumerate(_open_binary(raw, self.path), 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as bad:
                    return (f"{self.path}:{lineno}: not valid UTF-8 ({bad.reason} at byte "
                            f"{bad.start} of the line, offset {offset + bad.start})")
                offset += len(line)
        return f"{self.path}: not valid UTF-8 ({exc.reason})"

    def _emit(self, text: str) -> bool:
        if not text:
            self.num_empty += 1
            return False
        self.num_documents += 1
        return True

    def _text_documents(self, lines: Iterator[tuple[int, str]]) -> Iterator[str]:
        current: list[str] = []
        for _, line in lines:
            if line.strip():
                current.append(line)
            elif current:
                text = "".join(current)
                current = []
                if self._emit(text.removesuffix("\n")):
                    yield text.removesuffix("\n")
        if current:
            text = "".join(current).removesuffix("\n")
            if self._emit(text):
                yield text

    def _bad_line(self, lineno: int, why: str) -> None:
        message = f"{self.path}:{lineno}: {why}"
        if self.on_bad_json == "fail":
            raise SourceError(message + " (use on_bad_json='skip' / --skip-bad-json to skip)")
        self.num_bad_lines += 1
        if len(self.bad_lines) < MAX_REPORTED_BAD_LINES:
            self.bad_lines.append(message)

    def _jsonl_documents(self, lines: Iterator[tuple[int, str]]) -> Iterator[str | ChatRecord]:
        key = self.jsonl_key
        for lineno, line in lines:
            if not line.strip():
                continue
            record, why = parse_json_line(line)
            if why is not None:
                self._bad_line(lineno, why)
                continue
            if self.chat and not self._same_kind(record, lineno):
                continue
            if self.kind == "chat":
                dialog = self._dialog(record, lineno, line)
                if dialog is not None:
                    self.num_documents += 1
                    self.num_dialogs += 1
                    yield dialog
                continue
            problem = _missing_text(record, key)
            if problem and _is_dialog(record):  # not malformed: a format this reader does not take
                raise SourceError(f"{self.path}:{lineno}: {DIALOG_NOT_TEXT}")
            problem = problem or _lone_surrogate(line, record[key], repr(key))
            if problem:
                self._bad_line(lineno, problem)
                continue
            text = record[key]
            if self._emit(text):
                yield text

    def _same_kind(self, record: object, lineno: int) -> bool:
        """Whether ``record`` is of the file's kind (set by the first record); reports a bad line
        when it is not."""
        kind = "chat" if _is_dialog(record) else "text"
        if self.kind is None:
            self.kind, self.first_line = kind, lineno
        if kind == self.kind:
            return True
        first = "a dialog" if self.kind == "chat" else "a text record"
        if kind == "chat":
            why = "a dialog ('messages' or 'prompt'/'response')"
        elif isinstance(record, dict):
            keys = ", ".join(map(str, list(record)[:8])) or "none"
            why = f"not a dialog: no 'messages' or 'prompt'/'response' field (its keys: {keys})"
        else:
            why = f"not a dialog: the line is {json_type(record)}, not an object"
        self._bad_line(lineno, f"{why}, but the file's first record (line {self.first_line}) is "
                               f"{first}: a file holds dialogs or text records, not both")
        return False

    def _dialog(self, record: dict, lineno: int, line: str) -> ChatRecord | None:
        """The checked dialog of a chat record, or None when it is malformed (and skipped)."""
        try:
            messages = record_messages(record)
            split_dialog(messages, last="assistant")
        except ChatFormatError as exc:
            self._bad_line(lineno, f"bad dialog: {exc}")
            return None
        for i, message in enumerate(messages, 1):
            problem = _lone_surrogate(line, message["content"],
                                      f"message {i} ({message['role']}): 'content'")
            if problem:
                self._bad_line(lineno, problem)
                return None
        return ChatRecord(messages, f"{self.path}:{lineno}")


def parse_json_line(line: str) -> tuple[Any, str | None]:
    """``(value, None)`` for a line holding one JSON value, else ``(None, why)``: malformed JSON
    (at its column on the line; a line that ends inside the record says so), nesting deeper than
    Python's parser recurses, or an integer longer than Python converts (its limit of digits)."""
    text = line.rstrip("\n")
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        # JSON's messages that name a position end in " at" ("Unterminated string starting at")
        message = f"{exc.msg.removesuffix(' at')} at column {exc.colno}"
        if exc.msg.startswith("Unterminated string") or exc.pos >= len(text.rstrip()):
            message += "; the line ends inside the record: cut short, or spread over lines"
        return None, f"invalid JSON ({message}); expected one JSON object per line"
    except RecursionError:
        return None, (f"invalid JSON (nested more than about {sys.getrecursionlimit()} levels "
                      "deep, more than Python's JSON parser reads)")
    except ValueError as exc:  # an integer of more digits than sys.get_int_max_str_digits()
        limit = sys.get_int_max_str_digits()
        run = re.search(rf"\d{{{limit + 1},}}", text) if limit else None
        if run is None:
            return None, f"invalid JSON ({exc})"
        return None, (f"invalid JSON (an integer of {len(run.group()):,} digits at column "
                      f"{run.start() + 1}: Python's JSON parser reads at most {limit:,})")


def _lone_surrogate(line: str, text: str, field: str) -> str | None:
    """Why ``text``, a string read from the JSON ``line``, cannot be a document: it holds a lone
    UTF-16 surrogate escape (``"\\ud800"``), no character and not encodable as UTF-8; None when
    it is fine. Checked only when the line has such an escape (a pair decodes to one character)."""
    if _SURROGATE_ESCAPE.search(line) is None:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        escape = f"\\u{ord(text[exc.start]):04x}"
        column = line.lower().find(escape) + 1
        at = f" at column {column}" if column else ""
        return (f"invalid JSON string: {field} holds the lone surrogate escape {escape}{at}, "
                "half of a UTF-16 pair and no character (it has no UTF-8 encoding)")
    return None


def _is_dialog(record: object) -> bool:
    """Whether a parsed JSONL record is a dialog (has a field of :data:`CHAT_KEYS`)."""
    return isinstance(record, dict) and any(k in record for k in CHAT_KEYS)


def _missing_text(record: object, key: str) -> str | None:
    """Why a parsed JSONL line holds no document text, or None when ``record[key]`` is a
    string."""
    if not isinstance(record, dict):
        return f"no string field {key!r}: the line is {json_type(record)}, not an object"
    if key not in record:
        keys = ", ".join(map(str, list(record)[:8])) or "none"
        return (f"no string field {key!r} in this JSON line (its keys: {keys}); "
                "name the text field with --jsonl-key")
    value = record[key]
    if not isinstance(value, str):
        return f"no string field {key!r}: its value is {json_type(value)}, not a string"
    return None


def iter_documents(
    paths: list[Path] | list[str],
    jsonl_key: str = "text",
    on_bad_json: BadJsonPolicy = "fail",
) -> Iterator[str]:
    """All documents of ``paths`` in order; a file without any document is a SourceError."""
    for path in paths:
        reader = DocumentReader(path, jsonl_key=jsonl_key, on_bad_json=on_bad_json)
        yield from reader
        if reader.num_documents == 0:
            raise SourceError(empty_input_message(reader))


def empty_input_message(reader: DocumentReader) -> str:
    """The one-line error for an input file that produced no documents."""
    detail = "it is empty or contains only blank lines"
    if reader.num_bad_lines:
        detail = f"all {reader.num_bad_lines} non-blank lines were malformed JSON and skipped"
    elif reader.num_empty:
        detail = f"all {reader.num_empty} documents have empty text"
    return f"input file {reader.path} contains no documents: {detail}"
