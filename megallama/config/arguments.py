"""argparse value types shared by the command lines: a bad number is a usage error naming the
option (exit status 2), never a traceback from deep inside."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes and counts: tp, pp, workers, sequence lengths...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value
