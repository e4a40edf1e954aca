"""Everything checked before torch.distributed starts: the options (:mod:`megallama.config.validate`)
and then the files they name (:mod:`megallama.data.checks`). Run on every rank, so a bad input
stops all of them with the same one line instead of a hang in the first collective."""

from __future__ import annotations

from megallama.config.grid import Grid
from megallama.config.train_config import TrainConfig
from megallama.config.validate import validate_options
from megallama.data.checks import check_data_files


def validate(cfg: TrainConfig, world_size: int) -> Grid:
    """Raise ConfigError on the first problem; return the rank grid for ``world_size``."""
    grid = validate_options(cfg, world_size)
    check_data_files(cfg.data, cfg.model)
    return grid
