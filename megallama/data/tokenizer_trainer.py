"""Train a SentencePiece BPE tokenizer with the settings of Llama 2's ``tokenizer.model``.

The settings are copied from the trainer_spec and normalizer_spec stored inside Meta's
model (inspect one with ``sentencepiece_model_pb2.ModelProto``): BPE, byte fallback, digits
split into single pieces, whitespace-only pieces allowed, UNK=0 BOS=1 EOS=2 and no pad,
identity normalization (no NFKC), ``add_dummy_prefix=True`` (Llama's normalizer has it, so
"Hello" and " Hello" both start with ``▁Hello``) and ``remove_extra_whitespaces=False``
(runs of spaces are kept, as code and tables need). A model trained here is therefore used
by ``Tokenizer`` exactly like Llama's, only with another vocabulary.

SentencePiece ignores "sentences" longer than ``max_sentence_length`` bytes, and corpora
such as the State of the Union set keep a whole document on one line, so documents are
split into lines, lines into sentences (after ``.``, ``!``, ``?``) and over-long sentences
at spaces. When there are more than ``max_sentences`` sentences, a seeded reservoir sample
is kept in corpus order, so the result is a deterministic function of inputs and options.
The model is written to a temporary name and renamed, so ``<prefix>.model`` only ever
appears complete.

CLI: ``megallama-train-tokenizer CORPUS... --output-prefix PREFIX [--vocab-size 8000]``.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from megallama.config.arguments import positive_int, report_error
from megallama.data.outputs import OutputError, check_output_prefix, created_parents
from megallama.data.sources import BadJsonPolicy, SourceError, iter_documents
from megallama.data.tokenizer import Tokenizer, TokenizerError

LLAMA_MAX_SENTENCE_BYTES = 4192
MIN_VOCAB_SIZE = 3 + 256 + 1  # UNK/BOS/EOS and the 256 byte pieces come first, then one merge
COVERAGE_RANGE = (0.98, 1.0)  # what SentencePiece accepts for character_coverage
MAX_SEED = 2**32 - 1  # SentencePiece's random seed is an unsigned 32-bit integer
PROG = "megallama-train-tokenizer"
EXIT_INPUT = 2  # a usage or input error, like argparse's own
EXIT_FAILED = 1  # an OS error while writing
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def llama_trainer_options(vocab_size: int, character_coverage: float, num_threads: int) -> dict:
    """SentencePieceTrainer options equal to Llama 2's, apart from corpus and vocab size."""
    return {
        "model_type": "bpe",
        "vocab_size": vocab_size,
        "character_coverage": character_coverage,
        "normalization_rule_name": "identity",
        "add_dummy_prefix": True,
        "remove_extra_whitespaces": False,
        "byte_fallback": True,
        "split_digits": True,
        "split_by_unicode_script": True,
        "split_by_whitespace": True,
        "split_by_number": True,
        "treat_whitespace_as_suffix": False,
        "allow_whitespace_only_pieces": True,
        "max_sentencepiece_length": 16,
        "max_sentence_length": LLAMA_MAX_SENTENCE_BYTES,
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": -1,
        "unk_surface": " \u2047 ",
        "hard_vocab_limit": True,
        "vocabulary_output_piece_score": True,
        "num_threads": num_threads,
        # sampling is done (deterministically) before sentencepiece sees the data
        "input_sentence_size": 0,
        "shuffle_input_sentence": False,
    }


def _split_long(sentence: str, max_bytes: int) -> Iterator[str]:
    """Pieces of ``sentence`` of at most ``max_bytes`` UTF-8 bytes, cut at spaces if possible."""
    if len(sentence.encode("utf-8")) <= max_bytes:
        yield sentence
        return
    current = ""
    for word in re.split(r"(?<= )", sentence):  # keeps each space with the word before it
        if len((current + word).encode("utf-8")) <= max_bytes:
            current += word
            continue
        if current:
            yield current
        current = ""
        for char in word:  # a single word longer than the limit: cut between characters
            if len((current + char).encode("utf-8")) > max_bytes:
                yield current
                current = ""
            current += char
    if current:
        yield current


def iter_sentences(
    documents: Iterable[str], max_bytes: int = LLAMA_MAX_SENTENCE_BYTES
) -> Iterator[str]:
    """Training sentences of ``documents``: lines split after ``.!?`` and capped in size."""
    for document in documents:
        for line in document.split("\n"):
            for sentence in _SENTENCE_END.split(line):
                if sentence.strip():
                    yield from _split_long(sentence, max_bytes)


def sample_sentences(
    sentences: Iterable[str], max_sentences: int, seed: int
) -> tuple[list[str], int]:
    """A seeded uniform reservoir sample of at most ``max_sentences``, in corpus order.

    Returns the sample and the number of sentences seen.
    """
    rng = random.Random(seed)
    kept: list[tuple[int, str]] = []
    seen = 0
    for seen, sentence in enumerate(sentences, 1):
        if len(kept) < max_sentences:
            kept.append((seen, sentence))
        else:
            j = rng.randrange(seen)
            if j < max_sentences:
                kept[j] = (seen, sentence)
    kept.sort(key=lambda item: item[0])
    return [sentence for _, sentence in kept], seen


def default_num_threads() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _train_model(sentences: list[str], inputs: list[Path], vocab_size: int,
                 character_coverage: float, threads: int, seed: int, verbose: bool) -> bytes:
    """The serialized SentencePiece model trained on ``sentences``; TokenizerError on failure."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    options = llama_trainer_options(vocab_size, character_coverage, threads)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            minloglevel=0 if verbose else 2,
            **options,
        )
    except RuntimeError as exc:
        raise TokenizerError(_training_failure(exc, inputs, vocab_size)) from None
    return model.getvalue()


def _training_failure(exc: RuntimeError, inputs: list[Path], vocab_size: int) -> str:
    """One line for a failed SentencePiece training; the common cause, a vocabulary that does
    not fit the corpus, is said in words with the bound SentencePiece computed."""
    corpus = ", ".join(map(str, inputs))
    text = str(exc).strip()
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", text)
    if too_high:
        return (f"--vocab-size {vocab_size} is too large for the corpus {corpus}: it yields at "
                f"most {too_high.group(2)} pieces; lower --vocab-size or give more text")
    too_low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", text)
    if too_low:
        return (f"--vocab-size {vocab_size} is too small for the corpus {corpus}: its characters "
                f"and the special pieces need {too_low.group(2)}; raise --vocab-size or lower "
                "--character-coverage")
    message = text.splitlines()[-1] if text else repr(exc)
    return f"tokenizer training on {corpus} failed: {message}"


def _publish(model: bytes, output: Path) -> None:
    """Write ``output`` atomically, and only a model that loads; on failure neither the model,
    its temporary file nor a parent directory created here is left."""
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    with created_parents(output):
        try:
            tmp.write_bytes(model)
            Tokenizer(tmp)  # refuse to publish a model that does not load
            os.replace(tmp, output)
        finally:
            tmp.unlink(missing_ok=True)


def train_tokenizer(
    inputs: list[Path],
    output_prefix: str | Path,
    vocab_size: int = 8000,
    *,
    max_sentences: int = 2_000_000,
    seed: int = 0,
    character_coverage: float = 0.99995,
    num_threads: int | None = None,
    jsonl_key: str = "text",
    on_bad_json: BadJsonPolicy = "fail",
    verbose: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train a Llama-style BPE tokenizer on ``inputs`` and return ``<output_prefix>.model``.

    ``inputs`` are text or JSONL files, optionally ``.gz``/``.xz`` (see ``sources``).
    ``verbose`` shows sentencepiece's own log; ``log`` receives one-line progress messages.
    Raises TokenizerError when training fails (e.g. ``vocab_size`` too large for the corpus),
    SourceError for unreadable inputs and OutputError for an output prefix that cannot be
    written (checked before the corpus is read); no output file exists after a failure.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size {vocab_size} too small: 3 special and 256 byte pieces "
                             f"come first, so at least {MIN_VOCAB_SIZE}")
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be positive, got {max_sentences}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    if not COVERAGE_RANGE[0] <= character_coverage <= COVERAGE_RANGE[1]:
        raise ValueError(f"character_coverage must be in {list(COVERAGE_RANGE)}, "
                         f"got {character_coverage}")
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise SourceError("no input files given")
    check_output_prefix(output_prefix, (".model",))
    output = Path(str(output_prefix) + ".model")
    threads = num_threads or default_num_threads()
    start = time.perf_counter()
    documents = iter_documents(inputs, jsonl_key=jsonl_key, on_bad_json=on_bad_json)
    sentences, seen = sample_sentences(iter_sentences(documents), max_sentences, seed)
    if log:
        log(
            f"{len(sentences)} training sentences (of {seen}) from {len(inputs)} file(s) "
            f"in {time.perf_counter() - start:.1f}s"
        )
    model = _train_model(sentences, inputs, vocab_size, character_coverage, threads, seed, verbose)
    _publish(model, output)
    if log:
        log(f"wrote {output} (vocab {vocab_size}) in {time.perf_counter() - start:.1f}s")
    return output


def _bounded(kind: type, low: float, high: float | None,
             why: str) -> Callable[[str], int | float]:
    """An argparse type: a ``kind`` (int or float) in ``[low, high]``; anything else is a usage
    error naming the option (exit status 2) instead of a failure deep inside SentencePiece."""
    expected = "an integer" if kind is int else "a number"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}") from None
        if value != value or value < low or (high is not None and value > high):  # nan too
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{value}: must be {bound}{why}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``megallama-train-tokenizer``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train a SentencePiece BPE tokenizer with Llama 2's settings.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="text/JSONL files (.gz/.xz ok)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model")
    parser.add_argument("--vocab-size", default=8000, type=_bounded(
        int, MIN_VOCAB_SIZE, None, " (3 special and 256 byte pieces come first)"))
    parser.add_argument(
        "--max-sentences",
        type=positive_int,
        default=2_000_000,
        help="seeded sample size when the corpus has more sentences (default 2000000)",
    )
    parser.add_argument("--seed", type=_bounded(int, 0, MAX_SEED, ""), default=0)
    parser.add_argument("--character-coverage", default=0.99995,
                        type=_bounded(float, *COVERAGE_RANGE, " (SentencePiece's range)"))
    parser.add_argument("--num-threads", type=positive_int, default=None,
                        help="default: all CPUs")
    parser.add_argument("--jsonl-key", default="text", help="JSONL field with the text")
    parser.add_argument("--skip-bad-json", action="store_true", help="skip malformed lines")
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's log")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``megallama-train-tokenizer``; returns the exit status: 0 on success, 2 for
    a usage or input error (options, inputs, a vocabulary the corpus cannot fill, the output
    prefix) and 1 when writing the model fails (an OS error); each failure is one line."""
    args = build_parser().parse_args(argv)
    try:
        path = train_tokenizer(
            args.inputs,
            args.output_prefix,
            args.vocab_size,
            max_sentences=args.max_sentences,
            seed=args.seed,
            character_coverage=args.character_coverage,
            num_threads=args.num_threads,
            jsonl_key=args.jsonl_key,
            on_bad_json="skip" if args.skip_bad_json else "fail",
            verbose=args.verbose,
            log=lambda line: print(f"[train-tokenizer] {line}", file=sys.stderr),
        )
    except (TokenizerError, SourceError, OutputError) as exc:
        report_error(PROG, exc)
        return EXIT_INPUT
    except OSError as exc:  # writing the model: a full disk, an I/O error...
        where = exc.filename or f"{args.output_prefix}.model"
        report_error(PROG, f"{where}: {exc.strerror or exc} (nothing was written)")
        return EXIT_FAILED
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
