"""Where a checkpoint, its run's config and its tokenizer are, from what a user types.

One answer for every entry point: training's ``trainer.resume=PATH``, evaluation and generation
all accept a step directory, a ``checkpoints/`` root or a run directory, and take the latest
complete step of the last two. A run directory looks like::

    run/config.yaml                       the composed config the run was started with
    run/checkpoints/latest                names the newest committed step (optional)
    run/checkpoints/step_00000100/        model.index.json + shards (+ optimizer, trainer state)

A converted model (``megallama-reshard --tokenizer``) keeps ``tokenizer.model`` beside its weights,
Meta's downloads keep it one level up; both are found without ``--tokenizer``.
"""

from __future__ import annotations

from pathlib import Path

from megallama.checkpoint.atomic import CheckpointError, latest_checkpoint
from megallama.checkpoint.weights import INDEX_NAME
from megallama.config.compose import load_saved_config

TOKENIZER_NAME = "tokenizer.model"
RUN_CONFIG_NAME = "config.yaml"


def find_checkpoint(path: Path) -> Path:
    """The step directory ``path`` designates: ``path`` itself when it holds ``model.index.json``,
    else the latest complete step of ``path`` as a checkpoints/ root, else of ``path/checkpoints``
    (a run directory). Raises :class:`CheckpointError` (one line) when there is none."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / INDEX_NAME).is_file():
            return candidate
        if candidate.is_dir() and (latest := latest_checkpoint(candidate)) is not None:
            return latest
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    raise CheckpointError(f"{path}: no checkpoint (no {INDEX_NAME} and no complete step_* "
                          "inside, nor in checkpoints/)")


def run_config_of(step_dir: Path) -> Path | None:
    """The ``config.yaml`` of the run that wrote ``step_dir`` (``run/checkpoints/step_N``: two
    levels up), or None for a directory outside a run (a converted model)."""
    config = Path(step_dir).parent.parent / RUN_CONFIG_NAME
    return config if config.is_file() else None


def find_tokenizer(checkpoint_dir: Path) -> Path | None:
    """The tokenizer that belongs to a checkpoint: ``tokenizer.model`` beside the weights, else in
    the parent directory (Meta's layout: ``llama-2-7b/`` next to ``tokenizer.model``), else the
    run config's ``data.tokenizer`` when that file exists; None when nothing is found.

    Raises ConfigError if the run's config.yaml exists but cannot be read."""
    checkpoint_dir = Path(checkpoint_dir)
    for candidate in (checkpoint_dir / TOKENIZER_NAME, checkpoint_dir.parent / TOKENIZER_NAME):
        if candidate.is_file():
            return candidate
    run_config = run_config_of(checkpoint_dir)
    if run_config is not None:
        saved = load_saved_config(run_config).data.tokenizer
        if saved and Path(saved).is_file():
            return Path(saved)
    return None


__all__ = ["RUN_CONFIG_NAME", "TOKENIZER_NAME", "find_checkpoint", "find_tokenizer",
           "run_config_of"]
