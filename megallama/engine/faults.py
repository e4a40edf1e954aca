"""Fault injection through the real entry points, for tests of failure handling.

``MEGALLAMA_FAULT=KIND@STEP`` with KIND one of
  crash     the last rank raises at STEP (first attempt only, so torchrun restarts can succeed)
  nan       the loss of STEP is NaN on every rank (non-finite policy)
  killsave  the last rank SIGKILLs itself in the middle of saving STEP (crash safety)
"""

from __future__ import annotations

import os
import signal

KINDS = ("crash", "nan", "killsave")


def fault() -> tuple[str, int] | None:
    spec = os.environ.get("MEGALLAMA_FAULT")
    if not spec:
        return None
    kind, _, step = spec.partition("@")
    if kind not in KINDS or not step.isdigit():
        raise ValueError(f"MEGALLAMA_FAULT={spec!r}: expected one of {KINDS} @STEP")
    return kind, int(step)


def armed(kind: str, step: int, rank: int, world: int, every_rank: bool = False) -> bool:
    """Whether fault ``kind`` fires now (at ``step`` on this rank, in the first attempt)."""
    f = fault()
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    on_rank = every_rank or rank == world - 1
    return f == (kind, step) and first_attempt and on_rank


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
