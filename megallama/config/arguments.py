"""What every command line shares: argparse value types (a bad number is a usage error naming the
option, exit status 2, never a traceback from deep inside) and how an expected error is reported
(one line; ``MEGALLAMA_DEBUG=1`` adds the traceback)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value}: must be >= {low}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes and counts: tp, pp, workers, sequence lengths...)."""
    return _int_at_least(text, 1)


DEBUG_ENV = "MEGALLAMA_DEBUG"


def report_error(prog: str, message: object) -> None:
    """Print an expected failure as the one line ``prog: error: message`` on stderr. With
    ``MEGALLAMA_DEBUG=1`` the traceback of the exception being handled is printed above it (for
    bug reports); unexpected errors are never caught, so they always show theirs."""
    if os.environ.get(DEBUG_ENV) == "1" and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (counts where 0 means "no limit" or "off": --max-batches, --top-k)."""
    return _int_at_least(text, 0)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
    if value - value != 0:  # nan or +-inf (nan would pass every comparison test below)
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (--temperature: 0 is greedy)."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g}: must be >= 0")
    return value


def probability(text: str) -> float:
    """A number in (0, 1] (--top-p: 1 keeps every token, 0 would keep none)."""
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g}: must be in (0, 1]")
    return value


def os_error_message(exc: OSError) -> str:
    """An OSError as one line that names the file first (``PATH: Permission denied``) rather than
    Python's ``[Errno 13] Permission denied: 'PATH'``."""
    if exc.filename is None:
        return exc.strerror or str(exc)
    return f"{exc.filename}: {exc.strerror or exc}"
