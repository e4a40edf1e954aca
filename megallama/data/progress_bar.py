"""Console progress bars: the tqdm settings shared by preprocessing, resharding and training.

A bar is drawn on stderr only when it is wanted and stderr is a terminal: under a job scheduler or
in a pipe there is nothing to redraw in place, and a log full of carriage returns is unreadable.
Lines printed while a bar may be on screen go through :func:`write_line` (``tqdm.write``), which
clears the bar, prints the line and redraws the bar below it, so neither is garbled.

This module lives in ``megallama.data`` (no torch, nothing of megallama) because that is the
lowest layer all three users may import: preprocessing (data), resharding (checkpoint) and
training.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

# tqdm's default layout, with the remaining time labelled: "desc: 42%|####  | 42/100
# [elapsed 00:21, ETA 00:29, 2.00step/s, <postfix>]".
BAR_FORMAT = (
    "{l_bar}{bar}| {n_fmt}/{total_fmt} [elapsed {elapsed}, ETA {remaining}, {rate_fmt}{postfix}]"
)


class _Bar(tqdm):
    """tqdm without its monitor thread: preprocessing forks its worker pool only from a
    single-threaded process, and training needs no extra thread next to NCCL's."""

    monitor_interval = 0


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (a bar can be redrawn in place there)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(
    total: float,
    *,
    enabled: bool = True,
    file: TextIO | None = None,
    force: bool = False,
    **options: Any,
) -> tqdm:
    """A tqdm bar over ``total`` units on ``file`` (default: ``sys.stderr`` at call time).

    It is drawn when ``enabled`` and ``file`` is a terminal, or when ``enabled`` and ``force``
    (tests use that with a StringIO); otherwise it is a disabled tqdm whose methods do nothing.
    ``options`` go to tqdm as they are (``unit``, ``unit_scale``, ``desc``, ``initial``, ...).
    """
    stream = file if file is not None else sys.stderr
    shown = enabled and (force or is_terminal(stream))
    settings: dict[str, Any] = {
        "bar_format": BAR_FORMAT,
        "dynamic_ncols": True,  # follow terminal resizes
        "mininterval": 0.2,  # redraw at most 5 times a second
    }
    settings.update(options)
    return _Bar(total=total, file=stream, disable=not shown, **settings)


def write_line(line: str, file: TextIO | None = None) -> None:
    """Print ``line`` on ``file`` (default ``sys.stderr``) above any bar drawn there, and flush
    so that log files see it at once."""
    stream = file if file is not None else sys.stderr
    tqdm.write(line, file=stream)
    stream.flush()


__all__ = ["BAR_FORMAT", "is_terminal", "progress_bar", "write_line"]
