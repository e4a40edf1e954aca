"""Where a run keeps its files under ``trainer.output_dir``, which checkpoint ``trainer.resume``
or ``trainer.init_from`` names, and whether it can be started from. Free of DeepSpeed and
torch.distributed, so the command line checks them on every rank before any collective."""

from __future__ import annotations

from pathlib import Path

from megallama.checkpoint.atomic import CheckpointError
from megallama.checkpoint.lookup import find_checkpoint
from megallama.checkpoint.state import check_training_checkpoint
from megallama.checkpoint.stateful import has_training_state
from megallama.checkpoint.weights import check_weights
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


def check_start_checkpoint(cfg: TrainConfig) -> None:
    """The checkpoint the run starts from -- ``trainer.resume``'s (a full training state, or the
    weights of a weights-only directory), else ``trainer.init_from``'s weights -- checked as far
    as it can be without reading tensors: indexes, model config and shapes, every file's size
    and header, ``trainer_state.json``. Raises ConfigError naming the option and the file.
    Checksums are verified when the files are read."""
    path = resolve_resume(cfg)
    option, full = f"trainer.resume={cfg.trainer.resume}", True
    if path is None:
        path, option, full = resolve_init(cfg), f"trainer.init_from={cfg.trainer.init_from}", False
    if path is None:
        return
    try:
        if full and has_training_state(path):
            check_training_checkpoint(path, cfg.model)
        else:
            check_weights(path, cfg.model)
    except CheckpointError as e:
        raise ConfigError(f"{option}: {e}") from None
