"""Where a conversion writes: a temporary sibling of the destination, ``.<dst>.tmp-<pid>``, renamed
to the destination only when every file in it is written and fsynced. Any exception (Ctrl-C and
SIGTERM included) removes it again; a SIGKILLed run cannot, so the next run to the same
destination removes the temporaries whose process is gone. Either way a failed conversion leaves
nothing at or beside the destination.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megallama.checkpoint.atomic import fsync_dir, fsync_file


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 probes without delivering anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(dst: Path) -> list[Path]:
    """Remove ``.<dst>.tmp-<pid>`` directories beside ``dst`` left by conversions that were
    killed (SIGKILL, power loss): their process no longer exists. A conversion still running
    into the same destination keeps its directory. Returns what was removed."""
    removed = []
    for tmp in dst.parent.glob(f".{dst.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def publish(tmp: Path, dst: Path) -> None:
    """fsync everything written into ``tmp``, then rename it to ``dst`` (atomic publication)."""
    for p in tmp.iterdir():
        fsync_file(p)
    fsync_dir(tmp)
    os.rename(tmp, dst)
    fsync_dir(dst.parent)


@contextmanager
def temporary_output(dst: Path) -> Iterator[Path]:
    """Yield ``.<dst>.tmp-<pid>`` beside ``dst``, new and empty (the temporaries of dead
    conversions to ``dst`` removed first). On any exception -- Ctrl-C and SIGTERM included -- it is
    removed with the parent directories created for it, so a failed run leaves nothing behind."""
    remove_stale_temporaries(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    made = [p for p in [tmp.parent, *tmp.parent.parents] if not p.exists()]  # deepest first
    try:
        tmp.mkdir(parents=True)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in made:
            try:
                parent.rmdir()
            except OSError:  # not empty (or never made): the ones above are not ours to remove
                break
        raise
