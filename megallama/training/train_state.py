"""Save and resume the whole training state through the crash-safe checkpoint writer.

A save is collective: every rank writes its pieces into ``step_N.tmp``; the directory is renamed to
``step_N`` and ``latest`` moved only after all ranks succeeded, so a crash at any point leaves the
previous checkpoint intact. Resuming works at any (tp, pp, dp): weights and optimizer state are
resharded by name, the sampler state is global (samples consumed) and so independent of dp.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megallama.checkpoint.atomic import checkpoint_writer, latest_checkpoint
from megallama.checkpoint.state import (
    adam_step,
    load_optimizer_state,
    load_rng,
    read_trainer_state,
    save_optimizer_state,
    save_rng,
    set_adam_step,
    write_trainer_state,
)
from megallama.checkpoint.weights import INDEX_NAME, load_model_weights, save_model_weights
from megallama.config import ConfigError
from megallama.config.training import TrainConfig
from megallama.data.sampler import DataSampler
from megallama.engine import faults
from megallama.engine.deepspeed_engine import Engine
from megallama.parallel.topology import Topology


def checkpoint_root(cfg: TrainConfig) -> Path:
    return Path(cfg.trainer.output_dir) / "checkpoints"


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """``trainer.resume``: none | auto (latest complete checkpoint of this run, if any) | PATH
    (a step directory, or a run / checkpoints directory whose latest is taken)."""
    spec = cfg.trainer.resume
    if spec in ("none", "", None):
        return None
    if spec == "auto":
        return latest_checkpoint(checkpoint_root(cfg))
    path = Path(spec)
    for candidate in (path, path / "checkpoints"):
        if (candidate / INDEX_NAME).is_file():
            return candidate
        if candidate.is_dir() and (found := latest_checkpoint(candidate)) is not None:
            return found
    raise ConfigError(f"trainer.resume={spec}: no complete checkpoint there "
                      f"(expected {INDEX_NAME} in a step directory)")


def save_checkpoint(engine: Engine, cfg: TrainConfig, topo: Topology, step: int,
                    sampler: DataSampler) -> Path:
    """Write weights, optimizer state, RNG, sampler and step for ``step`` (collective)."""
    from megallama.config.compose import save_config

    root = checkpoint_root(cfg)
    layers = engine.local_layers()
    with checkpoint_writer(root, step, keep_last=cfg.trainer.keep_last) as tmp:
        save_model_weights(layers, engine.tp, topo, tmp, cfg.model, extra={"step": step})
        if faults.armed("killsave", step, topo.rank, topo.grid.world_size):
            faults.kill_self()
        save_optimizer_state(layers, engine.tp, topo, tmp, cfg.model, engine.ds_optimizer)
        save_rng(tmp, topo.rank)
        if topo.rank == 0:
            grid = topo.grid
            write_trainer_state(tmp, {
                "step": step,
                "sampler": sampler.state_dict(),
                "scheduler": _scheduler_state(engine),
                "adam_step": adam_step(engine.optimizer),
                "skipped_steps": engine.skipped_steps,
                "layout": {"tp": grid.tp, "pp": grid.pp, "dp": grid.dp},
            })
            save_config(cfg, tmp / "config.yaml")
    return root / f"step_{step:08d}"


def _scheduler_state(engine: Engine) -> dict[str, Any]:
    state = engine.scheduler.state_dict()
    state.pop("lr_lambdas", None)  # closures: rebuilt from the config
    return state


def resume(engine: Engine, cfg: TrainConfig, topo: Topology, path: Path,
           sampler: DataSampler) -> int:
    """Load a checkpoint into the engine; returns the step to continue after (0 for weights-only
    checkpoints such as a converted Meta/HF model)."""
    layers = engine.local_layers()
    load_model_weights(layers, engine.tp, path, cfg.model)
    if not (path / "trainer_state.json").is_file():
        return 0  # weights only: a fresh optimizer starts from them
    state = read_trainer_state(path)
    load_optimizer_state(layers, engine.tp, path, cfg.model, engine.ds_optimizer)
    set_adam_step(engine.optimizer, state["adam_step"])
    sampler.load_state_dict(state["sampler"])
    sched = state["scheduler"]
    engine.scheduler.load_state_dict({**engine.scheduler.state_dict(), **sched})
    for group, lr in zip(engine.ds_optimizer.param_groups, engine.scheduler.get_last_lr(),
                         strict=True):
        group["lr"] = lr
    step = int(state["step"])
    engine.ds.global_steps = step
    engine.ds.skipped_steps = engine._skipped_before = int(state["skipped_steps"])
    grid = topo.grid
    same = state["layout"] == {"tp": grid.tp, "pp": grid.pp, "dp": grid.dp}
    load_rng(path, topo.rank, same_layout=same)
    if not same:  # rank i of another layout is another process: reseed deterministically
        torch.manual_seed(cfg.trainer.seed + step)
    return step
