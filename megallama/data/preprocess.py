"""Tokenize text / JSONL corpora into an indexed token file (see ``indexed``).

Each document becomes ``[BOS] + encode(text) + [EOS]`` (both on by default) so that packed
training samples, which cross document boundaries, still see where documents start and
end. A dialog of a chat JSONL file (``messages`` or ``prompt``/``response`` records, see
:mod:`megallama.data.chat`) becomes one document in Llama 2's chat format, and its loss mask
(answers and their EOS are targets, the rest is not) goes to ``<prefix>.mask`` (see
``indexed``). ``max_tokens`` limits the tokens of a document: longer ones are dropped or
truncated to it (``overlong``; by default dialogs are dropped, since a cut answer teaches a cut
answer, and text is truncated) and counted. Documents are read in the main process, sent in
chunks to a pool of worker processes (``encoding``; each loads the tokenizer once) and written
back in input order, so the output does not depend on the number of workers. With
``workers=1`` everything runs in-process.

Outputs ``<prefix>.bin``, ``<prefix>.idx``, ``<prefix>.summary.json`` (and ``<prefix>.mask``
for chat data) are written under temporary names and published together when complete
(``outputs.publish``; an older ``.mask`` at the prefix goes when the new corpus has none); the
prefix is checked before any work and missing parent directories are created. A failed run
leaves nothing behind (no output, no temporary file, no directory it created) and the files of
an earlier run at the prefix as they were. Exit status: 0 ok, 2 usage or input error, 1 OS
error while writing.

CLI::

    megallama-preprocess data/sotu/train.txt.gz --tokenizer tokenizer.model \\
        --output-prefix runs/data/sotu_train --workers 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from megallama.config.arguments import positive_int, report_error
from megallama.data.encoding import DEFAULT_OVERLONG, Encoded, Item, OverlongPolicy, encoded_chunks
from megallama.data.indexed import IndexedWriter, token_dtype
from megallama.data.outputs import OutputError, check_output_prefix, created_parents
from megallama.data.progress_bar import progress_bar, write_line
from megallama.data.sources import (
    BadJsonPolicy,
    DocumentReader,
    SourceError,
    empty_input_message,
)
from megallama.data.tokenizer import Tokenizer, TokenizerError

CHUNK_CHARS = 1 << 18  # characters of text per task sent to a worker
CHUNK_DOCS = 4096  # ... or this many documents, whichever comes first
OUTPUT_SUFFIXES = (".bin", ".idx", ".summary.json", ".mask")
PROG = "megallama-preprocess"
EXIT_INPUT = 2  # a usage or input error, like argparse's own
EXIT_FAILED = 1  # an OS error while writing


class _Progress:
    """Preprocessing progress on stderr: a tqdm bar over the input bytes read (percent, MB/s,
    elapsed, ETA) followed by the documents, tokens and tokens/s so far. Drawn only when enabled
    and stderr is a terminal (see ``progress_bar``); :meth:`log` lines always print, above it.

    A context manager: on a clean exit the bar is completed and closed, on an error it is closed
    where it stands, so the error message starts on a line of its own.
    """

    def __init__(self, total_bytes: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.bar = progress_bar(
            max(1, total_bytes), enabled=enabled, file=self.stream,
            desc="[preprocess]", unit="B", unit_scale=True,
        )
        self.docs = self.tokens = self.dropped = self.truncated = 0

    def update(self, totals: dict[str, int], done_bytes: int) -> None:
        """Record the totals so far and ``done_bytes`` of input read (cumulative)."""
        self.docs, self.tokens = totals["documents"], totals["tokens"]
        self.dropped, self.truncated = totals["dropped_overlong"], totals["truncated_overlong"]
        if self.bar.disable:
            return
        self._set_postfix()
        self.bar.update(min(done_bytes, self.bar.total) - self.bar.n)

    def log(self, line: str) -> None:
        """Print ``line`` on stderr above the bar."""
        write_line(line, self.stream)

    def _set_postfix(self) -> None:
        elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
        overlong = (f", overlong: {self.dropped:,} dropped, {self.truncated:,} truncated"
                    if self.dropped or self.truncated else "")
        self.bar.set_postfix_str(
            f"{self.docs:,} docs, {self.tokens:,} tokens, {self.tokens / elapsed:,.0f} tok/s"
            f"{overlong}", refresh=False,
        )

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None and not self.bar.disable:
            self._set_postfix()
            self.bar.update(self.bar.total - self.bar.n)  # all input read
        self.bar.close()


def _chunks(
    readers: Sequence[DocumentReader], log: Callable[[str], None]
) -> Iterator[tuple[list[Item], int]]:
    """Chunks of documents from all readers in order, each with the bytes read so far; a chunk
    holds one file's documents (so all texts or all dialogs). Skipped lines are reported through
    ``log`` (above the progress bar)."""
    done_files = 0
    for reader in readers:
        items: list[Item] = []
        chars = 0
        for item in reader:
            items.append(item)
            chars += len(item) if isinstance(item, str) else item.nbytes
            if chars >= CHUNK_CHARS or len(items) >= CHUNK_DOCS:
                yield items, done_files + reader.position
                items, chars = [], 0
        if items:
            yield items, done_files + reader.size
        for message in reader.bad_lines:
            log(f"[preprocess] skipped malformed JSON: {message}")
        if reader.num_bad_lines > len(reader.bad_lines):
            extra = reader.num_bad_lines - len(reader.bad_lines)
            log(f"[preprocess] ... and {extra} more in {reader.path}")
        if reader.num_documents == 0:
            raise SourceError(empty_input_message(reader))
        done_files += reader.size


def _summary(inputs: Sequence[str | Path], output_prefix: str | Path, tokenizer: Tokenizer,
             readers: Sequence[DocumentReader], totals: dict[str, int], settings: dict,
             seconds: float) -> dict:
    """The run's summary: what was read and written, with which settings, how fast."""
    return {
        "output_prefix": str(output_prefix),
        "inputs": [str(p) for p in inputs],
        "tokenizer": str(tokenizer.path),
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        **settings,
        **totals,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(totals["tokens"] / max(seconds, 1e-9), 1),
        "skipped_bad_json_lines": sum(r.num_bad_lines for r in readers),
        "skipped_empty_documents": sum(r.num_empty for r in readers),
    }


def _overlong_policies(max_tokens: int | None, overlong: OverlongPolicy | None,
                       ) -> dict[str, OverlongPolicy]:
    """What happens to a text and a chat document longer than ``max_tokens``."""
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if overlong not in (None, "truncate", "drop"):
        raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    return dict(DEFAULT_OVERLONG) if overlong is None else {"text": overlong, "chat": overlong}


def _overlong_line(totals: dict[str, int], max_tokens: int | None) -> str | None:
    """The closing line about overlong documents, or None when there were none."""
    dropped, truncated = totals["dropped_overlong"], totals["truncated_overlong"]
    if not dropped and not truncated:
        return None
    return (f"[preprocess] documents over --max-tokens {max_tokens}: {dropped:,} dropped, "
            f"{truncated:,} truncated (of {totals['documents'] + dropped:,})")


def _count(totals: dict[str, int], result: Encoded) -> None:
    """Add one encoded chunk to the summary's counts."""
    targets = len(result.tokens) if result.mask is None else int(result.mask.sum())
    totals["documents"] += len(result.lengths)
    totals["tokens"] += len(result.tokens)
    totals["bytes"] += result.nbytes
    totals["chat_documents"] += 0 if result.mask is None else len(result.lengths)
    totals["unmasked_tokens"] += targets
    totals["masked_tokens"] += len(result.tokens) - targets
    totals["dropped_overlong"] += result.dropped
    totals["truncated_overlong"] += result.truncated


def _check_not_all_dropped(totals: dict[str, int], max_tokens: int | None) -> None:
    if totals["documents"] == 0:  # every document was over max_tokens and dropped
        dropped = totals["dropped_overlong"]
        which = f"all {dropped:,} documents are" if dropped > 1 else "the one document is"
        raise SourceError(f"{which} longer than --max-tokens {max_tokens}: nothing to write; "
                          "raise the limit or use --overlong truncate")


def preprocess(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tokenizer_path: str | Path,
    workers: int = 1,
    jsonl_key: str = "text",
    on_bad_json: BadJsonPolicy = "fail",
    append_eos: bool = True,
    prepend_bos: bool = True,
    progress: bool = True,
    start_method: str | None = None,
    max_tokens: int | None = None,
    overlong: OverlongPolicy | None = None,
    allow_chat_tags: bool = False,
) -> dict:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx`` (and ``.mask`` when there are
    dialogs) and return the summary dict.

    The summary (also written to ``<output_prefix>.summary.json``) has ``documents``,
    ``tokens``, ``bytes`` (UTF-8 bytes of document text), ``chat_documents``,
    ``unmasked_tokens`` (loss targets) and ``masked_tokens``, ``dropped_overlong`` and
    ``truncated_overlong``, ``seconds``, ``tokens_per_s`` and the settings used. Raises
    SourceError for missing/empty/malformed inputs (JSONL and dialog errors name
    ``file:line``), TokenizerError for an unusable tokenizer, OutputError for an output
    prefix that cannot be written and OSError when writing fails. ``prepend_bos`` and
    ``append_eos`` apply to text documents; dialogs always follow the chat format.
    ``max_tokens``/``overlong``: see the module docstring. ``allow_chat_tags`` keeps the chat
    format's tags inside messages as text (refused by default, as Meta's ``chat_completion``
    does; see :mod:`megallama.data.chat`). ``start_method`` is the
    multiprocessing start method for ``workers > 1`` (default: see ``encoding.default_start_method``).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    policies = _overlong_policies(max_tokens, overlong)
    if not inputs:
        raise SourceError("no input files given")
    start = time.perf_counter()
    readers = [DocumentReader(p, jsonl_key=jsonl_key, on_bad_json=on_bad_json, chat=True)
               for p in inputs]
    tokenizer = Tokenizer(tokenizer_path)
    check_output_prefix(output_prefix, OUTPUT_SUFFIXES)  # before any work
    report = _Progress(sum(r.size for r in readers), progress)
    totals = dict.fromkeys(("documents", "tokens", "bytes", "chat_documents", "unmasked_tokens",
                            "masked_tokens", "dropped_overlong", "truncated_overlong"), 0)

    settings = {"bos": prepend_bos, "eos": append_eos, "workers": workers,
                "max_tokens": max_tokens, "overlong": policies if max_tokens else None}
    encoder_args = (prepend_bos, append_eos, max_tokens, policies, allow_chat_tags)
    with (created_parents(output_prefix), report,
          IndexedWriter(output_prefix, tokenizer.vocab_size) as writer):
        chunks = _chunks(readers, report.log)
        for result, done_bytes in encoded_chunks(chunks, tokenizer, workers, start_method,
                                           encoder_args):
            writer.add_documents(result.tokens, result.lengths, result.mask)
            _count(totals, result)
            report.update(totals, done_bytes)
        _check_not_all_dropped(totals, max_tokens)
        summary = _summary(inputs, output_prefix, tokenizer, readers, totals, settings,
                           time.perf_counter() - start)
        summary["loss_mask"] = str(writer.mask_path) if totals["chat_documents"] else None
        text = json.dumps(summary, indent=2) + "\n"
        # the summary is published with the token files: all three are new, or none is
        writer.finalize({Path(f"{output_prefix}.summary.json"): text.encode("utf-8")})
    line = _overlong_line(totals, max_tokens)
    if line:
        report.log(line)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``megallama-preprocess``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize text/JSONL corpora (.gz/.xz ok) into an indexed token file; "
                    "chat JSONL (messages or prompt/response records) also gets a loss mask.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="text or .jsonl/.json files")
    parser.add_argument("--tokenizer", required=True, type=Path,
                        help="tokenizer.model: SentencePiece (Llama 2) or tiktoken BPE (Llama 3)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx")
    parser.add_argument("--workers", type=positive_int, default=1, help="tokenizer processes")
    parser.add_argument("--jsonl-key", default="text", help="JSONL field with the text")
    parser.add_argument(
        "--skip-bad-json",
        action="store_true",
        help="skip (and count) malformed JSONL lines instead of failing",
    )
    parser.add_argument("--no-eos", action="store_true", help="do not append EOS (text only)")
    parser.add_argument("--no-bos", action="store_true", help="do not prepend BOS (text only)")
    parser.add_argument("--max-tokens", type=positive_int, metavar="N",
                        help="documents longer than N tokens are dropped or truncated "
                             "(--overlong) and counted; default: no limit")
    parser.add_argument("--overlong", choices=["truncate", "drop"],
                        help="what --max-tokens does to a longer document (default: drop a "
                             "dialog, truncate a text)")
    parser.add_argument("--allow-chat-tags", action="store_true",
                        help="keep [INST], [/INST], <<SYS>>, <</SYS>> inside chat messages as "
                             "text (refused by default, as Meta's chat_completion does)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``megallama-preprocess``: prints the JSON summary on stdout. Exit status 0
    on success, 2 for a usage or input error (options, inputs, tokenizer, output prefix) and 1
    when writing fails (an OS error such as a full disk); each failure is one line on stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.overlong is not None and args.max_tokens is None:
        parser.error("--overlong needs --max-tokens N (the limit it applies to)")
    try:
        summary = preprocess(
            args.inputs,
            args.output_prefix,
            args.tokenizer,
            workers=args.workers,
            jsonl_key=args.jsonl_key,
            on_bad_json="skip" if args.skip_bad_json else "fail",
            append_eos=not args.no_eos,
            prepend_bos=not args.no_bos,
            progress=not args.quiet,
            max_tokens=args.max_tokens,
            overlong=args.overlong,
            allow_chat_tags=args.allow_chat_tags,
        )
    except (SourceError, TokenizerError, OutputError) as exc:
        report_error(PROG, exc)
        return EXIT_INPUT
    except OSError as exc:  # writing the output: a full disk, an I/O error...
        where = exc.filename or args.output_prefix
        report_error(PROG, f"{where}: {exc.strerror or exc} (writing --output-prefix "
                           f"{args.output_prefix}; nothing was written)")
        return EXIT_FAILED
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
