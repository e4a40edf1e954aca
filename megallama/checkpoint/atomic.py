"""Crash-safe checkpoint directories: every rank writes into ``step_NNNNNNNN.tmp/``; once all ranks
report success, rank 0 renames it to ``step_NNNNNNNN/`` (an atomic rename: a step directory with its
final name is always complete) and repoints ``latest``. A crash or an exception on any rank leaves
the previous checkpoints and ``latest`` untouched; the stale ``.tmp`` directory is removed by the
next save.

Usage (collective: every rank of ``group`` -- the world by default -- enters and leaves together)::

    with checkpoint_writer(root, step, keep_last=3) as tmpdir:
        save_model_weights(layers, tp, topo, tmpdir, model_cfg)
        torch.save(optimizer_state, tmpdir / f"optim-rank{rank:05d}.pt")  # trainer's own files

All ranks must see the same filesystem at ``root`` (one node, or a shared filesystem).
Also here: file integrity helpers (fsync, sha256, verification) and :func:`agree`, the
gather-decide-broadcast step that makes every rank raise when any rank failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megallama.checkpoint.file_headers import what_file_holds

Group = dist.ProcessGroup | None

LATEST = "latest"
STEP_DIR_RE = re.compile(r"step_(\d{8})")
_CHUNK = 16 << 20

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the file and what is wrong."""


class InvalidStateError(CheckpointError):
    """Training state that must not be committed or resumed: non-finite weights or optimizer
    state, a negative second moment, master weights that do not belong to the weights."""


# ---- files ---------------------------------------------------------------------------------------
def fsync_file(path: Path) -> None:
    """Flush a written file's data to stable storage (a rename is durable only after this)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames and new entries inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_object(path: Path, what: str, missing: str) -> dict[str, Any]:
    """The JSON object in ``path`` (a checkpoint's index or state file, ``what`` it is), or one
    line: ``missing`` when the file is absent, "not valid JSON" / "not a JSON object" else."""
    if not path.is_file():
        raise CheckpointError(f"{path}: {missing}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return value


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed in 16 MiB chunks (shards can be tens of GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


_verified: set[tuple[Any, ...]] = set()


def size_mismatch(path: Path, size: int, expected: int, listed_in: Path | str | None
                  ) -> CheckpointError:
    """The error of a file whose size differs from its record: truncated, or another file."""
    where = f" (listed in {listed_in})" if listed_in else ""
    why = what_file_holds(path, size) or ("the file is truncated or was not completely "
                                           "written")
    return CheckpointError(f"{path}: {size} bytes, expected {expected}{where}; {why}")


def verify_file(path: Path, size: int | None, sha256: str | None,
                listed_in: Path | None = None) -> None:
    """Check that ``path`` exists with the recorded size and sha256 (None: not recorded, not
    checked); raise :class:`CheckpointError` naming the file and what is wrong with it.

    A successful check is remembered (keyed by inode, size and mtime) so that reading many tensors
    from one shard hashes it once per process, not once per tensor.
    """
    where = f" (listed in {listed_in})" if listed_in else ""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint shard is missing{where}") from None
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha256)
    if key in _verified:
        return
    if size is not None and st.st_size != size:
        raise size_mismatch(path, st.st_size, size, listed_in)
    if sha256 is not None and file_sha256(path) != sha256:
        held = what_file_holds(path, st.st_size)
        why = held if held.startswith("it holds") else "the file is corrupted"
        raise CheckpointError(f"{path}: sha256 checksum mismatch{where}; {why}")
    _verified.add(key)


# ---- agreement between ranks ---------------------------------------------------------------------
def is_distributed() -> bool:
    """Whether torch.distributed is up (otherwise every collective here is a local no-op)."""
    return dist.is_available() and dist.is_initialized()


def agree(local: Any, decide: Callable[[list[Any]], Any], group: Group = None) -> Any:
    """Gather every rank's ``local`` object on the group's first rank, run ``decide`` on the list
    there, and return its result on all ranks. Also a barrier.

    If ``decide`` raises, the first rank re-raises it and every other rank raises
    :class:`CheckpointError`, so no rank carries on alone. Without torch.distributed this is
    ``decide([local])``.
    """
    if not is_distributed():
        return decide([local])
    root = 0 if group is None else dist.get_global_rank(group, 0)
    me = dist.get_rank()
    gathered = [None] * dist.get_world_size(group) if me == root else None
    dist.gather_object(local, gathered, dst=root, group=group)
    box: list[Any] = [None]
    error: Exception | None = None
    if me == root:
        try:
            box[0] = ("ok", decide(gathered))
        except Exception as e:  # forwarded to the other ranks, re-raised below
            error, box[0] = e, ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=root, group=group)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise CheckpointError(f"rank {root} failed: {value}")
    return value


def all_or_none(error: Exception | None, what: str, group: Group = None) -> None:
    """Collective end of a step that may fail on some ranks: every rank reports its ``error``
    (None: success); if any failed, every rank raises -- this rank its own error, the others a
    :class:`CheckpointError` naming ``what`` and the first rank that failed."""
    msg = None if error is None else f"{type(error).__name__}: {error}"

    def decide(outcomes: list[str | None]) -> None:
        failed = [(r, m) for r, m in enumerate(outcomes) if m is not None]
        if failed:
            raise CheckpointError(f"{what}: rank {failed[0][0]}: {failed[0][1]}")

    try:
        agree(msg, decide, group)
    except CheckpointError:
        if error is not None:
            raise error from None
        raise


# ---- step directories ----------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    """``step_00001234``: the name of a committed checkpoint directory."""
    if step < 0:
        raise ValueError(f"step={step}: must be >= 0")
    return f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Committed step directories under ``root`` as (step, path), oldest first; ``.tmp`` directories
    (incomplete or being deleted) are never listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR_RE.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The committed checkpoint that ``<root>/latest`` names; if the pointer is missing or names no
    committed directory, the newest committed one (with a warning); None when there is none."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if STEP_DIR_RE.fullmatch(name) and (root / name).is_dir():
            return root / name
        log.warning("%s names %r, which is not a committed checkpoint; using the newest one",
                    pointer, name)
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def _remove_dir(path: Path) -> None:
    """Delete a directory by renaming it out of the committed namespace first, so that a crash
    half-way through the deletion never leaves a partial directory with a step name."""
    doomed = path if path.name.endswith(".tmp") else path.with_name(f"{path.name}.deleting.tmp")
    if doomed != path:
        os.rename(path, doomed)
    shutil.rmtree(doomed)


def _sync_tree(path: Path) -> None:
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


def _prepare(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():  # left by a crashed attempt at the same step
        shutil.rmtree(tmp)
    tmp.mkdir()
    fsync_dir(root)


def _commit(root: Path, tmp: Path, final: Path, keep_last: int | None) -> None:
    """Rank 0's part of a successful save: make ``tmp`` the committed ``final``, repoint latest."""
    _sync_tree(tmp)
    replaced = None
    if final.exists():  # saving the same step again: swap, then delete the old copy
        replaced = final.with_name(f"{final.name}.replaced.tmp")
        if replaced.exists():
            shutil.rmtree(replaced)
        os.rename(final, replaced)
    os.rename(tmp, final)
    fsync_dir(root)
    write_text_atomic(root / LATEST, final.name + "\n")
    if replaced is not None:
        shutil.rmtree(replaced)
    prune(root, keep_last, keep={final})


def prune(root: Path, keep_last: int | None,
          keep: set[Path] | frozenset[Path] = frozenset()) -> None:
    """Delete all but the ``keep_last`` newest committed step directories (never one in ``keep``)
    and every stale ``step_*.tmp`` directory. ``keep_last`` None or < 1 keeps every checkpoint.

    Not safe while another job writes into the same ``root``.
    """
    root = Path(root)
    for p in root.glob("step_*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    if keep_last is None or keep_last < 1:
        return
    found = [p for _, p in list_checkpoints(root)]
    for p in found[: max(0, len(found) - keep_last)]:
        if p not in keep:
            _remove_dir(p)
    fsync_dir(root)


@contextmanager
def checkpoint_writer(root: Path, step: int, *, keep_last: int | None = None,
                      group: Group = None) -> Iterator[Path]:
    """Collective context for writing checkpoint ``step`` under ``root``; yields the temp directory.

    On entry the first rank of ``group`` (the world when None) creates a fresh
    ``<root>/step_NNNNNNNN.tmp``. On exit every rank reports whether its body raised; only if none
    did, the first rank fsyncs the tree, renames it to ``step_NNNNNNNN`` (replacing an existing
    directory of the same step), writes ``latest`` and prunes to ``keep_last`` checkpoints.
    Otherwise the temp directory is removed, ranks that raised re-raise their error and the others
    raise :class:`CheckpointError`. KeyboardInterrupt/SystemExit propagate without collectives
    (the temp directory is then cleaned by the next save).

    Deadlock caveat: a rank that raises *inside a collective of the body* (one another rank is
    still waiting in) cannot be rescued here; :func:`save_model_weights` therefore catches its own
    local errors and always completes its collectives.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f"{final.name}.tmp"
    agree(None, lambda _: _prepare(root, tmp), group)

    def finish(outcomes: list[str | None]) -> str | None:
        failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
        if failed:
            shutil.rmtree(tmp, ignore_errors=True)
            rank, what = failed[0]
            return f"checkpoint {final} not committed: rank {rank} raised {what}"
        _commit(root, tmp, final, keep_last)
        return None

    try:
        yield tmp
    except Exception as e:
        agree(f"{type(e).__name__}: {e}", finish, group)
        raise
    aborted = agree(None, finish, group)
    if aborted:
        raise CheckpointError(aborted)


def save_checkpoint_dir(root: Path, step: int, write_fn: Callable[[Path], None], *,
                        keep_last: int | None = None, group: Group = None) -> Path:
    """Run ``write_fn(tmpdir)`` on every rank inside :func:`checkpoint_writer`; return the committed
    step directory."""
    with checkpoint_writer(root, step, keep_last=keep_last, group=group) as tmp:
        write_fn(tmp)
    return Path(root) / step_dir_name(step)


__all__ = [
    "CheckpointError", "InvalidStateError", "agree", "all_or_none", "checkpoint_writer",
    "file_sha256", "fsync_dir", "fsync_file",
    "is_distributed", "latest_checkpoint", "list_checkpoints", "prune",
    "save_checkpoint_dir", "size_mismatch", "step_dir_name", "verify_file", "write_text_atomic",
]


def write_shard_file(tensors: dict[str, torch.Tensor], path: Path, writer: str,
                     entries: dict[str, Any], metadata: dict[str, str] | None = None
                     ) -> dict[str, Any]:
    """Write one safetensors shard durably; return its metadata for the index (file name, size,
    sha256 and the ``entries`` describing its tensors). ``metadata`` is added to the header's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata={"format": "pt", "writer": writer, **(metadata or {})})
    fsync_file(path)
    return {"file": path.name, "size": path.stat().st_size, "sha256": file_sha256(path),
            "tensors": entries}


def commit_index(meta: Any, error: Exception | None, index_path: Path, what: str,
                 build: Callable[[list[Any]], dict[str, Any]]) -> None:
    """Collective end of a sharded write: every rank reports its file metadata (or its error);
    the first rank builds the index from all of them and writes it atomically. If any rank
    failed, every rank raises (this rank its own error, if it had one)."""
    def decide(outcomes: list[tuple[Any, str | None]]) -> None:
        failed = [(r, msg) for r, (_, msg) in enumerate(outcomes) if msg is not None]
        if failed:
            raise CheckpointError(f"saving {what}: rank {failed[0][0]}: {failed[0][1]}")
        index = build([m for m, _ in outcomes])
        write_text_atomic(index_path, json.dumps(index, indent=1) + "\n")

    try:
        agree((meta, None if error is None else f"{type(error).__name__}: {error}"), decide)
    except CheckpointError:
        if error is not None:
            raise error from None
        raise
