"""Where the data command lines write, and how a set of output files is published as one unit.

A run that fails must leave nothing behind and must not damage the outputs of an earlier run at
the same prefix. So the command lines (1) check the output prefix before any work
(:func:`check_output_prefix`: a typo is reported in a second, not after an hour of tokenizing),
(2) create the missing parent directories and remove them again when the run fails
(:func:`created_parents`), and (3) write every file under a temporary name and rename the set
into place at the end (:func:`publish`), restoring the previous files if a rename fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path


class OutputError(ValueError):
    """An output prefix that cannot be written: names a directory, lies under a file, ..."""


def check_output_prefix(prefix: str | Path, suffixes: Sequence[str],
                        option: str = "--output-prefix") -> None:
    """Raise OutputError unless ``<prefix><suffix>`` can be created for every suffix: the prefix
    ends in a file name, no target is a directory, and the nearest existing ancestor directory
    is a writable directory (missing ones in between are created by :func:`created_parents`)."""
    text = str(prefix)
    if os.path.basename(text) in ("", ".", ".."):
        example = f"{text.rstrip('/') or '.'}/NAME"
        raise OutputError(f"{option} {text!r} names a directory, not a file prefix: "
                          f"give a prefix such as {example}")
    for suffix in suffixes:
        target = Path(text + suffix)
        if target.is_dir():
            raise OutputError(f"{option} {text}: {target} is a directory; remove it or choose "
                              "another prefix")
    ancestor = Path(text).parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{option} {text}: {ancestor} is not a directory; choose a prefix "
                          "in a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {text}: directory {ancestor} is not writable; choose "
                          "another prefix")


@contextlib.contextmanager
def created_parents(path: str | Path) -> Iterator[list[Path]]:
    """Create the missing parent directories of ``path``; if the block raises, remove the ones
    created here again (when still empty), so that a failed run leaves no trace."""
    missing: list[Path] = []
    parent = Path(path).parent
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    created: list[Path] = []
    try:
        for directory in reversed(missing):  # the outermost first
            try:
                directory.mkdir()
            except FileExistsError:  # created meanwhile by someone else: theirs to keep
                continue
            created.append(directory)
        yield created
    except BaseException:
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def publish(moves: Sequence[tuple[Path, Path]]) -> None:
    """Rename each ``(temporary, final)`` pair into place as one unit.

    The finals that exist are moved aside first, the last one of ``moves`` first (put the file
    that makes the set readable, e.g. the index, last: readers then never pair an old index with
    new data); then the temporaries are renamed in order and the old files deleted. If any rename
    fails, the new files are removed and the old ones put back before the error propagates.
    """
    for _, final in moves:
        if final.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(final))
    tag = f".old-{os.getpid()}"
    aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for _, final in reversed(moves):
            if os.path.lexists(final):
                backup = final.with_name(f".{final.name}{tag}")
                os.replace(final, backup)
                aside.append((backup, final))
        for tmp, final in moves:
            os.replace(tmp, final)
            placed.append(final)
    except BaseException:
        for final in placed:
            final.unlink(missing_ok=True)
        for backup, final in aside:
            os.replace(backup, final)
        raise
    for backup, _ in aside:
        backup.unlink(missing_ok=True)
