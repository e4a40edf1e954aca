"""The training state of a run as :class:`~megallama.checkpoint.stateful.StatePiece` objects, and
saving / resuming it through the crash-safe checkpoint writer.

A save is collective: every rank writes its pieces into ``step_N.tmp``; the directory is renamed to
``step_N`` and ``latest`` moved only after all ranks succeeded, so a crash at any point leaves the
previous checkpoint intact. Resuming works at any (tp, pp, dp): weights and optimizer state are
resharded by name, the sampler state is global (samples consumed) and so independent of dp.
To add a kind of state, add a piece to :class:`TrainingState` -- nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megallama.checkpoint.atomic import checkpoint_writer
from megallama.checkpoint.state import (
    check_finite_weights,
    load_optimizer_state,
    load_rng,
    save_optimizer_state,
    save_rng,
)
from megallama.checkpoint.stateful import (
    SavedHook,
    StatePiece,
    has_training_state,
    load_pieces,
    save_pieces,
)
from megallama.checkpoint.weights import load_model_weights, save_model_weights
from megallama.config import ModelConfig
from megallama.config.compose import save_config
from megallama.config.train_config import TrainConfig
from megallama.data.sampler import DataSampler
from megallama.engine import Engine
from megallama.parallel.layers import TensorParallel
from megallama.parallel.topology import Topology
from megallama.training.run_files import checkpoint_root


class ModelWeights:
    """This stage's parameters in the layout-free weights format (written by DP rank 0)."""

    def __init__(self, state: TrainingState) -> None:
        self.s = state

    def save(self, ckpt_dir: Path) -> dict[str, Any]:
        s = self.s
        save_model_weights(s.engine.local_layers(), s.engine.tp, s.topo, ckpt_dir, s.cfg.model,
                           extra={"step": s.step})
        return {}

    def load(self, ckpt_dir: Path, trainer_state: dict[str, Any] | None = None) -> None:
        s = self.s
        load_model_weights(s.engine.local_layers(), s.engine.tp, ckpt_dir, s.cfg.model)


class OptimizerState:
    """fp32 master weights and Adam moments (same format, under ``optim/``) and Adam's step."""

    def __init__(self, state: TrainingState) -> None:
        self.s = state

    def save(self, ckpt_dir: Path) -> dict[str, Any]:
        e = self.s.engine
        save_optimizer_state(e.local_layers(), e.tp, self.s.topo, ckpt_dir, self.s.cfg.model,
                             e.optimizer_state)
        return {"adam_step": e.adam_step()}

    def load(self, ckpt_dir: Path, trainer_state: dict[str, Any]) -> None:
        e = self.s.engine
        load_optimizer_state(e.local_layers(), e.tp, ckpt_dir, self.s.cfg.model,
                             e.optimizer_state)
        e.set_adam_step(trainer_state["adam_step"])


class Schedule:
    """The LR scheduler's position (its lambda is rebuilt from the config)."""

    def __init__(self, state: TrainingState) -> None:
        self.s = state

    def save(self, ckpt_dir: Path) -> dict[str, Any]:
        return {"scheduler": self.s.engine.scheduler_state()}

    def load(self, ckpt_dir: Path, trainer_state: dict[str, Any]) -> None:
        self.s.engine.load_scheduler_state(trainer_state["scheduler"])


class Sampler:
    """Global samples consumed and the shuffle epoch: independent of dp."""

    def __init__(self, sampler: DataSampler) -> None:
        self.sampler = sampler

    def save(self, ckpt_dir: Path) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load(self, ckpt_dir: Path, trainer_state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(trainer_state["sampler"])


class Counters:
    """The step reached and the steps skipped for non-finite gradients."""

    def __init__(self, state: TrainingState) -> None:
        self.s = state

    def save(self, ckpt_dir: Path) -> dict[str, Any]:
        return {"step": self.s.step, "skipped_steps": self.s.engine.skipped_steps}

    def load(self, ckpt_dir: Path, trainer_state: dict[str, Any]) -> None:
        self.s.step = int(trainer_state["step"])
        self.s.engine.set_counters(self.s.step, int(trainer_state["skipped_steps"]))


class RandomState:
    """Every rank's RNG states, restored only at the same layout (where rank i is the same
    process); at another layout every rank reseeds deterministically from (seed, step)."""

    def __init__(self, state: TrainingState) -> None:
        self.s = state

    def _layout(self) -> dict[str, int]:
        grid = self.s.topo.grid
        return {"tp": grid.tp, "pp": grid.pp, "dp": grid.dp}

    def save(self, ckpt_dir: Path) -> dict[str, Any]:
        save_rng(ckpt_dir, self.s.topo.rank)
        return {"layout": self._layout()}

    def load(self, ckpt_dir: Path, trainer_state: dict[str, Any]) -> None:
        same = trainer_state["layout"] == self._layout()
        load_rng(ckpt_dir, self.s.topo.rank, same_layout=same)
        if not same:
            torch.manual_seed(self.s.cfg.trainer.seed + self.s.step)


class RunConfig:
    """The resolved run config beside the state (rank 0), for evaluate/generate and humans."""

    def __init__(self, state: TrainingState) -> None:
        self.s = state

    def save(self, ckpt_dir: Path) -> dict[str, Any]:
        if self.s.topo.rank == 0:
            save_config(self.s.cfg, ckpt_dir / "config.yaml")
        return {}

    def load(self, ckpt_dir: Path, trainer_state: dict[str, Any]) -> None:
        pass  # the current run's config governs


class TrainingState:
    """Everything a resumed run needs, as named pieces saved and loaded in this order."""

    def __init__(self, engine: Engine, cfg: TrainConfig, topo: Topology,
                 sampler: DataSampler) -> None:
        self.engine, self.cfg, self.topo, self.step = engine, cfg, topo, 0
        self.on_saved: list[SavedHook] = []  # run after each piece is written (fault tests)
        self.pieces: dict[str, StatePiece] = {
            "model": ModelWeights(self), "optimizer": OptimizerState(self),
            "scheduler": Schedule(self), "sampler": Sampler(sampler),
            "counters": Counters(self), "rng": RandomState(self), "config": RunConfig(self),
        }

    def save(self, step: int) -> Path:
        """Write a checkpoint of ``step`` (collective); returns its directory. Non-finite weights
        on any rank are never committed: every rank raises InvalidStateError, the temporary
        directory is removed and ``latest`` keeps naming the previous checkpoint."""
        self.step = step
        root = checkpoint_root(self.cfg)
        with checkpoint_writer(root, step, keep_last=self.cfg.trainer.keep_last) as tmp:
            check_finite_weights(self.engine.local_layers(), step)
            save_pieces(self.pieces, tmp, write_json=self.topo.rank == 0, on_saved=self.on_saved)
        return root / f"step_{step:08d}"

    def resume(self, path: Path) -> int:
        """Load a full training checkpoint (weights, optimizer, schedule, sampler, counters, RNG);
        returns the step to continue after. Loaded optimizer state is validated before use
        (finite, second moments >= 0, masters that round to the weights). A weights-only directory (a converted Meta/HF model)
        is not resumed here: its weights must be in place before the optimizer is built
        (:func:`weights_loader`, given to the engine)."""
        if not has_training_state(path):
            raise ValueError(f"{path} holds weights only; start from it with weights_loader()")
        load_pieces(self.pieces, path)
        return self.step


def weights_loader(path: Path, cfg: ModelConfig) -> Callable[[list[tuple[str, nn.Module]],
                                                              TensorParallel], None]:
    """What the engine calls on a stage's fresh layers to start from ``path``'s model weights
    (``trainer.init_from``, or ``trainer.resume`` of a weights-only directory), at any layout they
    were saved at, before any optimizer copies the parameters."""

    def load(layers: list[tuple[str, nn.Module]], tp: TensorParallel) -> None:
        load_model_weights(layers, tp, path, cfg)

    return load
