"""Everything checked before torch.distributed starts: the options
(:mod:`megallama.config.validate`), the files they name (:mod:`megallama.data.checks`), the directories the run will write and W&B credentials for an online run. Run on
every rank, so a bad input stops all of them with the same one line instead of a hang in the first
collective; nothing is created on disk until all of it has passed."""

from __future__ import annotations

import os
from pathlib import Path

from megallama.config import ConfigError
from megallama.config.grid import Grid
from megallama.config.train_config import TrainConfig
from megallama.config.validate import validate_options
from megallama.data.checks import check_data_files
from megallama.training.tracking import check_wandb_login


def validate(cfg: TrainConfig, world_size: int) -> Grid:
    """Raise ConfigError on the first problem; return the rank grid for ``world_size``."""
    grid = validate_options(cfg, world_size)
    check_data_files(cfg.data, cfg.model)
    check_output_dirs(cfg)
    check_wandb_login(cfg)  # trainer.wandb.mode=online with no API key anywhere
    return grid


def check_output_dirs(cfg: TrainConfig) -> None:
    """``trainer.output_dir`` (and ``trainer.wandb.dir`` when W&B logs) is a directory or can be
    created as one: rank 0 creates it only after start-up, where a path through a file would be a
    traceback on one rank while the others wait in a collective."""
    t = cfg.trainer
    dirs = [("trainer.output_dir", t.output_dir)]
    if t.wandb.mode != "disabled" and t.wandb.dir:
        dirs.append(("trainer.wandb.dir", t.wandb.dir))
    for option, value in dirs:
        path = Path(value)
        ancestor = path
        while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            where = "is a file" if ancestor == path else f"is under the file {ancestor}"
            raise ConfigError(f"{option}={value} {where}, not a directory; choose another "
                              f"{option}")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConfigError(f"{option}={value}: directory {ancestor} is not writable; choose "
                              f"another {option}")
