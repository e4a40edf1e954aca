"""Where a run keeps its files under ``trainer.output_dir``, and which checkpoint
``trainer.resume`` names. Free of DeepSpeed and torch.distributed, so the command line checks a
bad ``trainer.resume`` on every rank before any collective."""

from __future__ import annotations

from pathlib import Path

from megallama.checkpoint.atomic import CheckpointError
from megallama.checkpoint.lookup import find_checkpoint
from megallama.config import ConfigError
from megallama.config.train_config import TrainConfig


def checkpoint_root(cfg: TrainConfig) -> Path:
    return Path(cfg.trainer.output_dir) / "checkpoints"


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """``trainer.resume``: none | auto (latest complete checkpoint of this run, if any) | PATH
    (a step directory, or a run / checkpoints directory whose latest is taken)."""
    spec = cfg.trainer.resume
    if spec in ("none", "", None):
        return None
    if spec == "auto":
        root = checkpoint_root(cfg)
        try:
            return find_checkpoint(root) if root.is_dir() else None
        except CheckpointError:
            return None  # a run that has not saved yet starts fresh
    try:
        return find_checkpoint(Path(spec))
    except CheckpointError as e:
        raise ConfigError(f"trainer.resume={spec}: {e}") from None


def resolve_init(cfg: TrainConfig) -> Path | None:
    """``trainer.init_from``: the checkpoint whose model weights start a run (None: random init)."""
    spec = cfg.trainer.init_from
    if spec in (None, "", "none"):
        return None
    try:
        return find_checkpoint(Path(spec))
    except CheckpointError as e:
        raise ConfigError(f"trainer.init_from={spec}: {e}") from None
