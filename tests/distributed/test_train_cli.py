"""The training and evaluation entry points under torchrun, end to end on CPU/gloo.

Checks: Hydra overrides reach the run (saved config, engine batch arithmetic), the TensorBoard
scalars exist, a bf16 run lowers the loss, evaluation gives the loss of the saved weights (computed
here in one process from the checkpoint's safetensors) at every layout, a config error stops every
rank at once with one message, a crashing rank brings the job down, non-finite steps are skipped
(counted) or stop the run naming the step, and a converted checkpoint's first training step starts
from its weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megallama.config import preset
from megallama.data.dataset import PackedDataset, collate
from megallama.model.llama import Transformer
from tests.distributed.cli import FAULTS, VOCAB, overrides, read_scalars, torchrun

pytestmark = pytest.mark.slow

# the model overrides() configures: tiny_gqa, vocab 256, two layers
CFG = preset("tiny_gqa", vocab_size=VOCAB, n_layers=2)


def checkpoint_model(step_dir: Path) -> Transformer:
    """A single-process Transformer holding the tensors of a megallama step directory, read with
    safetensors alone (docs/CHECKPOINTS.md: each shard holds its pieces under their global names;
    at tp = 1 a piece is the whole tensor) -- no megallama loader involved."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(step_dir.glob("model-pp*-tp*.safetensors")):
        tensors.update(load_file(shard))
    model = Transformer(CFG).eval()
    model.load_state_dict({name: t.float() for name, t in tensors.items()})  # strict: all, only these
    return model


@torch.no_grad()
def mean_loss(model: Transformer, samples: list[np.ndarray]) -> float:
    tokens, labels = collate(samples)
    return model.loss(model(tokens), labels).item()


def test_bf16_pipeline_run_logs_and_evaluates(token_files, tmp_path):
    out = tmp_path / "run"
    proc, _ = torchrun(2, "megallama.train", overrides(
        token_files, out, "parallel.pp=2", "trainer.steps=30", "trainer.precision=bf16", "optim.lr=1e-2",
        "optim.weight_decay=0.05"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = (out / "config.yaml").read_text()
    assert "weight_decay: 0.05" in saved and "pp: 2" in saved and "precision: bf16" in saved
    scalars = read_scalars(out / "tensorboard")
    for tag in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device",
                "peak_memory_gib", "skipped_steps"):
        assert f"train/{tag}" in scalars, sorted(scalars)
    assert scalars["valid/loss"] and scalars["valid/perplexity"]
    losses = scalars["train/loss"]
    assert losses[-1] < losses[0] - 0.5, f"bf16 loss did not fall: {losses}"
    assert scalars["train/skipped_steps"][-1] == 0

    results = []
    for nproc, layout in ((1, []), (2, ["--pp", "2"]), (2, ["--tp", "2"])):
        proc, _ = torchrun(nproc, "megallama.evaluate", [
            "--checkpoint", str(out), "--data", str(token_files / "val"), "--batch-size", "4",
            "--max-batches", "3", *layout])
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert results[0]["tokens"] == 3 * 4 * 32
    # the oracle: the first 3 * 4 windows of 33 tokens through the saved weights in one process;
    # a model that never loaded them (a fresh initialisation) is far from it
    step_dir = out / "checkpoints" / "step_00000030"
    windows = PackedDataset(token_files / "val", 32)
    samples = [windows[i] for i in range(3 * 4)]
    expected = mean_loss(checkpoint_model(step_dir), samples)
    untrained = mean_loss(Transformer(CFG, seed=1234).eval(), samples)
    assert untrained - expected > 0.5, (untrained, expected)
    for r in results:
        assert abs(r["val_loss"] - expected) < 1e-5 * expected, (results, expected)


def test_config_error_stops_every_rank_fast(token_files, tmp_path):
    proc, seconds = torchrun(2, "megallama.train", overrides(
        token_files, tmp_path / "bad", "parallel.global_batch_size=7"), timeout=120)
    assert proc.returncode != 0
    assert seconds < 60, f"took {seconds:.0f} s"
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("megallama.train: error:")]
    assert len(errors) == 1 and "global_batch_size" in errors[0], proc.stderr[-2000:]


def test_crash_on_one_rank_brings_job_down(token_files, tmp_path):
    proc, seconds = torchrun(2, FAULTS, ["crash@3", *overrides(
        token_files, tmp_path / "crash", "parallel.pp=2", "trainer.steps=50")], timeout=180)
    assert proc.returncode != 0
    assert "injected crash at step 3" in proc.stderr
    assert seconds < 120, f"job took {seconds:.0f} s to go down"


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_policy(token_files, tmp_path, policy):
    out = tmp_path / policy
    proc, _ = torchrun(1, FAULTS, ["nan@4", *overrides(
        token_files, out, "trainer.steps=6", f"trainer.nonfinite={policy}",
        "trainer.eval_interval=0", "data.valid=[]", "trainer.save_final=false")])
    if policy == "stop":
        assert proc.returncode != 0
        assert "non-finite loss or gradients at step 4" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        scalars = read_scalars(out / "tensorboard")
        assert scalars["train/skipped_steps"][-1] == 1
        assert np.isfinite(scalars["train/loss"][-1])


def test_converted_checkpoint_resumes_training(token_files, tmp_path):
    """megallama -> hf -> megallama(tp=2) with megallama-reshard, then training starts from it."""
    first = tmp_path / "first"
    proc, _ = torchrun(1, "megallama.train", overrides(
        token_files, first, "trainer.steps=2", "trainer.eval_interval=0", "data.valid=[]"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    step_dir = first / "checkpoints" / "step_00000002"
    hf, back = tmp_path / "hf", tmp_path / "megallama_tp2"
    for src, dst, extra in ((f"megallama:{step_dir}", f"hf:{hf}", []),
                            (f"hf:{hf}", f"megallama:{back}", ["--tp", "2"])):
        conv = subprocess.run([sys.executable, "-m", "megallama.reshard", "--src", src, "--dst", dst,
                               "--no-progress", *extra], capture_output=True, text=True)
        assert conv.returncode == 0, conv.stderr[-2000:]
    out = tmp_path / "continued"
    proc, _ = torchrun(2, "megallama.train", overrides(
        token_files, out, "parallel.tp=2", "trainer.steps=2", "trainer.eval_interval=0",
        "data.valid=[]", "trainer.log_interval=1", "trainer.seed=7", f"trainer.resume={back}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {back} at step 0" in proc.stdout
    # step 1's loss is the loss of the first run's final weights (read here from its step directory)
    # on the first global batch: 8 windows in the sampler's documented epoch-0 order, a permutation
    # seeded by (trainer.seed, epoch); the run's own initialisation (seed 7) gives another loss
    logged = read_scalars(out / "tensorboard")["train/loss"][0]
    data = PackedDataset(token_files / "train", 32)
    batch = [data[i] for i in np.random.default_rng([7, 0]).permutation(len(data))[:8]]
    expected = mean_loss(checkpoint_model(step_dir), batch)
    fresh = mean_loss(Transformer(CFG, seed=7).eval(), batch)
    assert abs(logged - expected) < 1e-5 * expected, (logged, expected, fresh)
    assert abs(fresh - expected) > 1e-3 * expected, (fresh, expected)
