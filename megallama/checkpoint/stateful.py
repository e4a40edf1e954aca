"""The training state as named pieces that save and load themselves.

Each piece (model weights, optimizer, LR schedule, sampler, RNG, counters...) implements
:class:`StatePiece`: ``save`` writes its files into the checkpoint directory (collectively where
it needs to) and returns its entries for ``trainer_state.json``; ``load`` reads them back. The
checkpoint holds whatever the pieces write, so a new kind of state is added in one place: a new
piece in the trainer's dict. The file format (docs/CHECKPOINTS.md) is unchanged by this contract:
``trainer_state.json`` is the union of the pieces' entries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from megallama.checkpoint.state import read_trainer_state, write_trainer_state

SavedHook = Callable[[str, Path], None]  # (piece name, temp checkpoint dir), after each piece


class StatePiece(Protocol):
    """One part of the training state. ``save`` and ``load`` are called on every rank."""

    def save(self, ckpt_dir: Path) -> dict[str, Any]:
        """Write this piece's files (if any); return its ``trainer_state.json`` entries."""
        ...

    def load(self, ckpt_dir: Path, trainer_state: dict[str, Any]) -> None:
        """Restore this piece from ``ckpt_dir`` and the parsed ``trainer_state.json``."""
        ...


def save_pieces(pieces: Mapping[str, StatePiece], ckpt_dir: Path, *, write_json: bool,
                on_saved: list[SavedHook] | tuple[SavedHook, ...] = ()) -> None:
    """Save every piece in order; ``write_json`` (one rank) writes ``trainer_state.json``.
    ``on_saved`` hooks run after each piece (tests use them to inject faults mid-save)."""
    entries: dict[str, Any] = {}
    for name, piece in pieces.items():
        entries.update(piece.save(ckpt_dir))
        for hook in on_saved:
            hook(name, ckpt_dir)
    if write_json:
        write_trainer_state(ckpt_dir, entries)


def load_pieces(pieces: Mapping[str, StatePiece], ckpt_dir: Path) -> dict[str, Any]:
    """Load every piece in order from ``ckpt_dir``; returns the parsed ``trainer_state.json``."""
    state = read_trainer_state(ckpt_dir)
    for piece in pieces.values():
        piece.load(ckpt_dir, state)
    return state


def has_training_state(ckpt_dir: Path) -> bool:
    """Whether ``ckpt_dir`` holds more than weights (a converted Meta/HF model holds only those)."""
    return (Path(ckpt_dir) / "trainer_state.json").is_file()
