"""Tokenize text / JSONL corpora into an indexed token file (see ``indexed``).

Each document becomes ``[BOS] + encode(text) + [EOS]`` (both on by default) so that packed
training samples, which cross document boundaries, still see where documents start and
end. Documents are read in the main process, sent in chunks to a pool of worker processes
(each loads the tokenizer once) and written back in input order, so the output does not
depend on the number of workers. With ``workers=1`` everything runs in-process.

Outputs ``<prefix>.bin``, ``<prefix>.idx`` and ``<prefix>.summary.json`` are written under
temporary names and published together when complete (``outputs.publish``); the prefix is
checked before any work and missing parent directories are created. A failed run leaves nothing
behind (no output, no temporary file, no directory it created) and the files of an earlier run
at the prefix as they were. Exit status: 0 ok, 2 usage or input error, 1 OS error while writing.

CLI::

    megallama-preprocess data/sotu/train.txt.gz --tokenizer tokenizer.model \\
        --output-prefix runs/data/sotu_train --workers 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from megallama.config.arguments import positive_int, report_error
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
OUTPUT_SUFFIXES = (".bin", ".idx", ".summary.json")
PROG = "megallama-preprocess"
EXIT_INPUT = 2  # a usage or input error, like argparse's own
EXIT_FAILED = 1  # an OS error while writing


class _Encoder:
    """Turns a list of texts into one id array plus per-document lengths."""

    def __init__(self, tokenizer: Tokenizer, bos: bool, eos: bool) -> None:
        self.tokenizer = tokenizer
        self.bos = bos
        self.eos = eos
        self.dtype = token_dtype(tokenizer.vocab_size)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        encoded = self.tokenizer.encode_batch(texts, bos=self.bos, eos=self.eos)
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        tokens = np.fromiter(
            itertools.chain.from_iterable(encoded), dtype=self.dtype, count=int(lengths.sum())
        )
        nbytes = sum(len(text.encode("utf-8")) for text in texts)
        return tokens, lengths, nbytes


_WORKER_ENCODER: _Encoder | None = None


def _init_worker(tokenizer_path: str, bos: bool, eos: bool) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = _Encoder(Tokenizer(tokenizer_path), bos, eos)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    assert _WORKER_ENCODER is not None, "worker not initialised"
    return _WORKER_ENCODER(texts)


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
        self.docs = self.tokens = 0

    def update(self, docs: int, tokens: int, done_bytes: int) -> None:
        """Record the totals so far and ``done_bytes`` of input read (cumulative)."""
        self.docs, self.tokens = docs, tokens
        if self.bar.disable:
            return
        self._set_postfix()
        self.bar.update(min(done_bytes, self.bar.total) - self.bar.n)

    def log(self, line: str) -> None:
        """Print ``line`` on stderr above the bar."""
        write_line(line, self.stream)

    def _set_postfix(self) -> None:
        elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
        self.bar.set_postfix_str(
            f"{self.docs:,} docs, {self.tokens:,} tokens, {self.tokens / elapsed:,.0f} tok/s",
            refresh=False,
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
) -> Iterator[tuple[list[str], int]]:
    """Chunks of documents from all readers in order, each with the bytes read so far;
    skipped lines are reported through ``log`` (above the progress bar)."""
    done_files = 0
    for reader in readers:
        texts: list[str] = []
        chars = 0
        for text in reader:
            texts.append(text)
            chars += len(text)
            if chars >= CHUNK_CHARS or len(texts) >= CHUNK_DOCS:
                yield texts, done_files + reader.position
                texts, chars = [], 0
        if texts:
            yield texts, done_files + reader.size
        for message in reader.bad_lines:
            log(f"[preprocess] skipped malformed JSON: {message}")
        if reader.num_bad_lines > len(reader.bad_lines):
            extra = reader.num_bad_lines - len(reader.bad_lines)
            log(f"[preprocess] ... and {extra} more in {reader.path}")
        if reader.num_documents == 0:
            raise SourceError(empty_input_message(reader))
        done_files += reader.size


def _default_start_method() -> str:
    """``fork`` (workers start in milliseconds) when this process is a plain single-threaded
    one, else ``spawn`` (about 0.3 s per pool): forking a process that runs other threads,
    e.g. torch's, can copy a lock some thread holds and deadlock the child."""
    single_threaded = threading.active_count() == 1 and "torch" not in sys.modules
    if single_threaded and "fork" in mp.get_all_start_methods():
        return "fork"
    return "spawn"


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


def _encoded(chunks: Iterable[tuple[list[str], int]], tokenizer: Tokenizer, workers: int,
             start_method: str | None, prepend_bos: bool, append_eos: bool,
             ) -> Iterator[tuple[tuple[np.ndarray, np.ndarray, int], int]]:
    """(encoded chunk, input bytes done) in input order: in this process when ``workers`` is 1,
    else over a pool with a bounded number of chunks in flight."""
    if workers == 1:
        encoder = _Encoder(tokenizer, prepend_bos, append_eos)
        for texts, done_bytes in chunks:
            yield encoder(texts), done_bytes
        return
    context = mp.get_context(start_method or _default_start_method())
    initargs = (str(tokenizer.path), prepend_bos, append_eos)
    with context.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        pending: deque = deque()
        for texts, done_bytes in chunks:
            pending.append((pool.apply_async(_encode_in_worker, (texts,)), done_bytes))
            if len(pending) >= 4 * workers:  # bounded memory, order preserved
                result, done = pending.popleft()
                yield result.get(), done
        while pending:
            result, done = pending.popleft()
            yield result.get(), done


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
) -> dict:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx`` and return the summary dict.

    The summary (also written to ``<output_prefix>.summary.json``) has ``documents``,
    ``tokens``, ``bytes`` (UTF-8 bytes of document text), ``seconds``, ``tokens_per_s`` and
    the settings used. Raises SourceError for missing/empty/malformed inputs (JSONL errors
    name ``file:line``), TokenizerError for an unusable tokenizer, OutputError for an output
    prefix that cannot be written and OSError when writing fails. ``start_method`` is
    the multiprocessing start method for ``workers > 1`` (default: see
    ``_default_start_method``).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not inputs:
        raise SourceError("no input files given")
    start = time.perf_counter()
    readers = [DocumentReader(p, jsonl_key=jsonl_key, on_bad_json=on_bad_json) for p in inputs]
    tokenizer = Tokenizer(tokenizer_path)
    check_output_prefix(output_prefix, OUTPUT_SUFFIXES)  # before any work
    report = _Progress(sum(r.size for r in readers), progress)
    totals = {"documents": 0, "tokens": 0, "bytes": 0}

    def consume(result: tuple[np.ndarray, np.ndarray, int], done_bytes: int) -> None:
        chunk_tokens, lengths, chunk_bytes = result
        writer.add_documents(chunk_tokens, lengths)
        totals["documents"] += len(lengths)
        totals["tokens"] += len(chunk_tokens)
        totals["bytes"] += chunk_bytes
        report.update(totals["documents"], totals["tokens"], done_bytes)

    settings = {"bos": prepend_bos, "eos": append_eos, "workers": workers}
    with (created_parents(output_prefix), report,
          IndexedWriter(output_prefix, tokenizer.vocab_size) as writer):
        chunks = _chunks(readers, report.log)
        for result, done_bytes in _encoded(chunks, tokenizer, workers, start_method,
                                           prepend_bos, append_eos):
            consume(result, done_bytes)
        summary = _summary(inputs, output_prefix, tokenizer, readers, totals, settings,
                           time.perf_counter() - start)
        text = json.dumps(summary, indent=2) + "\n"
        # the summary is published with the token files: all three are new, or none is
        writer.finalize({Path(f"{output_prefix}.summary.json"): text.encode("utf-8")})
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``megallama-preprocess``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize text/JSONL corpora (.gz/.xz ok) into an indexed token file.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="text or .jsonl/.json files")
    parser.add_argument("--tokenizer", required=True, type=Path, help="SentencePiece .model")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx")
    parser.add_argument("--workers", type=positive_int, default=1, help="tokenizer processes")
    parser.add_argument("--jsonl-key", default="text", help="JSONL field with the text")
    parser.add_argument(
        "--skip-bad-json",
        action="store_true",
        help="skip (and count) malformed JSONL lines instead of failing",
    )
    parser.add_argument("--no-eos", action="store_true", help="do not append EOS")
    parser.add_argument("--no-bos", action="store_true", help="do not prepend BOS")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``megallama-preprocess``: prints the JSON summary on stdout. Exit status 0
    on success, 2 for a usage or input error (options, inputs, tokenizer, output prefix) and 1
    when writing fails (an OS error such as a full disk); each failure is one line on stderr."""
    args = build_parser().parse_args(argv)
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
