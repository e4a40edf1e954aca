"""What every command line shares: argparse value types (a bad number is a usage error naming the
option, exit status 2, never a traceback from deep inside) and how an expected error is reported
(one line; ``MEGALLAMA_DEBUG=1`` adds the traceback)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes and counts: tp, pp, workers, sequence lengths...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


DEBUG_ENV = "MEGALLAMA_DEBUG"


def report_error(prog: str, message: object) -> None:
    """Print an expected failure as the one line ``prog: error: message`` on stderr. With
    ``MEGALLAMA_DEBUG=1`` the traceback of the exception being handled is printed above it (for
    bug reports); unexpected errors are never caught, so they always show theirs."""
    if os.environ.get(DEBUG_ENV) == "1" and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
