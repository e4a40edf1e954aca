"""Weights & Biases beside TensorBoard (``trainer.wandb.*``): one W&B run per training run, opened
by the reporting rank (global rank 0) only, logging the scalars :class:`MetricsWriter
<megallama.training.metrics.MetricsWriter>` writes to TensorBoard, at the same steps (the training
step is W&B's ``step``), with the resolved configuration as the run's config.

``wandb`` is an optional dependency (``pip install 'megallama[wandb]'``), imported here only when
``trainer.wandb.mode`` is not ``disabled``; :func:`megallama.config.validate.check_wandb` has
already checked on every rank, before any collective, that it imports.

Resuming: the W&B run id is kept in ``<trainer.output_dir>/wandb_run_id``. A run that resumes from
a checkpoint continues that W&B run (``resume="allow"``); a run that starts from step 0 starts a
new W&B run and records its id there. W&B keeps a run's steps increasing: rows logged again for
steps it already has (those between the checkpoint and a crash) are dropped, not overwritten.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from megallama.config.train_config import TrainConfig

RUN_ID_FILE = "wandb_run_id"


def wandb_dir(cfg: TrainConfig) -> Path:
    """Where W&B writes its files (in a ``wandb/`` folder below): ``trainer.wandb.dir``, or
    ``trainer.output_dir`` when that is null."""
    return Path(cfg.trainer.wandb.dir or cfg.trainer.output_dir)


def run_id(output_dir: Path, resumed: bool) -> str:
    """The W&B run id of this training run: the recorded one when resuming from a checkpoint and
    there is one, else a new id, recorded in ``output_dir/wandb_run_id``."""
    path = Path(output_dir) / RUN_ID_FILE
    if resumed and path.is_file() and (recorded := path.read_text().strip()):
        return recorded
    alphabet = string.ascii_lowercase + string.digits
    new = "".join(secrets.choice(alphabet) for _ in range(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new + "\n")
    return new


def resolved_config(cfg: TrainConfig) -> dict[str, Any]:
    """The configuration as plain data, the same tree as the run's ``config.yaml``."""
    tree = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(tree, dict)
    return tree  # type: ignore[return-value]


class WandbRun:
    """An open W&B run: :meth:`log` scalars at a step, :meth:`finish` once."""

    def __init__(self, run: Any) -> None:
        self._run = run

    @property
    def id(self) -> str:
        return self._run.id

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Record ``values`` (plain floats) at ``step``; calls with the same step form one row."""
        if self._run is not None and values:
            self._run.log(dict(values), step=step)

    def finish(self) -> None:
        """Write the last row and close the run; safe to call twice."""
        if self._run is not None:
            self._run.finish()
            self._run = None


def open_wandb_run(cfg: TrainConfig, resumed: bool) -> WandbRun:
    """Start (or, when ``resumed`` and an id is recorded, continue) this training run's W&B run,
    as ``trainer.wandb`` says. Call on the reporting rank only."""
    import wandb  # optional dependency (megallama[wandb]); checked by config validation

    w, out = cfg.trainer.wandb, Path(cfg.trainer.output_dir)
    directory = wandb_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=w.project, entity=w.entity, name=w.name or out.resolve().name, mode=w.mode,
        dir=str(directory), id=run_id(out, resumed), resume="allow",
        config=resolved_config(cfg),
    )
    return WandbRun(run)


__all__ = ["RUN_ID_FILE", "WandbRun", "open_wandb_run", "resolved_config", "run_id", "wandb_dir"]
