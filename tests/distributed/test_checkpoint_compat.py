"""A checkpoint written before the package reorganisation (tests/fixtures/checkpoint_v0_1, made by
megallama at commit d57db4e: a 2-layer GQA model after 3 fp32 steps) still resumes training and
still loads for inference, with every piece of state restored as it was stored; resumed with
another schedule, its first step follows the new one."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megallama.config.compose import load_saved_config
from megallama.config.grid import Grid
from megallama.data.sampler import DataSampler
from megallama.engine import Engine
from megallama.inference.loader import load_for_inference
from megallama.optim.schedule import lr_at
from megallama.parallel.runtime import init_distributed
from megallama.parallel.topology import build_topology
from megallama.training.run_files import resolve_resume
from megallama.training.train_state import TrainingState
from tests.distributed.harness import run_world

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v0_1"


def _resume_old_checkpoint(rank: int, world: int, run: str) -> None:
    init_distributed(torch.device("cpu"))
    step_dir = Path(run) / "checkpoints" / "step_00000003"
    cfg = load_saved_config(step_dir / "config.yaml")
    cfg.trainer.output_dir, cfg.trainer.resume = run, "auto"
    assert resolve_resume(cfg) == step_dir
    engine = Engine(cfg, build_topology(Grid()), torch.device("cpu"))
    sampler = DataSampler(100, 2, 0, 1)
    assert TrainingState(engine, cfg, build_topology(Grid()), sampler).resume(step_dir) == 3
    stored = load_file(step_dir / "model-pp00-tp00.safetensors")
    master = load_file(step_dir / "optim" / "fp32" / "model-pp00-tp00.safetensors")
    moment = load_file(step_dir / "optim" / "exp_avg_sq" / "model-pp00-tp00.safetensors")
    for prefix, module in engine.local_layers():
        for local, p in module.named_parameters():
            name = f"{prefix}.{local}"
            assert torch.equal(p.detach(), stored[name]), name
            assert torch.equal(engine.optimizer_state.full_state(p, "fp32"), master[name]), name
            assert torch.equal(engine.optimizer_state.full_state(p, "exp_avg_sq"), moment[name])
    state = json.loads((step_dir / "trainer_state.json").read_text())
    assert engine.adam_step() == state["adam_step"] == 3
    assert engine.counters() == {"global_steps": 3, "skipped_steps": 0}
    assert engine.scheduler_state()["last_epoch"] == 3
    assert sampler.state_dict() == state["sampler"]
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    result = engine.train_step([(tokens[:, :-1], tokens[:, 1:])])
    assert torch.isfinite(torch.tensor(result.loss)) and not result.skipped
    assert result.lr == pytest.approx(lr_at(3, cfg.optim, cfg.trainer.steps), rel=1e-12)
    # resumed with another schedule (length and peak): the first step already follows it
    changed = copy.deepcopy(cfg)
    changed.trainer.steps, changed.optim.lr = 40, 1e-3
    other = Engine(changed, build_topology(Grid()), torch.device("cpu"))
    TrainingState(other, changed, build_topology(Grid()), DataSampler(100, 2, 0, 1)).resume(step_dir)
    first = other.train_step([(tokens[:, :-1], tokens[:, 1:])])
    assert first.lr == pytest.approx(lr_at(3, changed.optim, 40), rel=1e-12), first.lr
    assert other.scheduler.get_last_lr()[0] == pytest.approx(lr_at(4, changed.optim, 40))
    model = load_for_inference(Path(run), tp=1, pp=1)
    logits = model(tokens[:, :-1])
    assert logits.shape == (2, 16, cfg.model.vocab_size) and torch.isfinite(logits).all()


def test_pre_reorganisation_checkpoint_resumes_and_loads(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    run_world(1, _resume_old_checkpoint, str(run))
