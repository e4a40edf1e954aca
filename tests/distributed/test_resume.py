"""Checkpoint resume through the real entry point: bit-exact at the same layout, within fp32
round-off at other (tp, pp, dp) layouts, safe against kill -9 during a save, automatic under
torchrun --max-restarts, and a clean save on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from megallama.checkpoint.atomic import latest_checkpoint
from tests.distributed.cli import FAULTS, REPO, overrides, read_scalars, torchrun

pytestmark = pytest.mark.slow
STEPS = 6


def run(token_files, out, nproc, *extra, fault=None, launcher=()):
    """Train for STEPS steps; ``fault`` (KIND@STEP) runs it with that fault's hooks installed."""
    args = overrides(token_files, out, "trainer.log_interval=1", "trainer.eval_interval=0",
                     "data.valid=[]", f"trainer.steps={STEPS}", *extra)
    if fault:
        proc, _ = torchrun(nproc, FAULTS, [fault, *args], launcher=launcher)
    else:
        proc, _ = torchrun(nproc, "megallama.train", args, launcher=launcher)
    return proc


def losses(out):
    return read_scalars(out / "tensorboard")["train/loss"]


@pytest.fixture(scope="module")
def reference(token_files, tmp_path_factory):
    """An uninterrupted 2x2x1 (tp, pp, dp) run saving every 3 steps."""
    out = tmp_path_factory.mktemp("ref")
    proc = run(token_files, out, 4, "parallel.tp=2", "parallel.pp=2", "trainer.save_interval=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, losses(out)


def test_same_layout_resume_is_bit_exact(token_files, tmp_path, reference):
    ref_out, ref = reference
    out = tmp_path / "resumed"
    proc = run(token_files, out, 4, "parallel.tp=2", "parallel.pp=2",
               f"trainer.resume={ref_out / 'checkpoints' / 'step_00000003'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(out) == ref[3:], (losses(out), ref)
    state = json.loads((out / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["sampler"]["consumed_samples"] == STEPS * 8


@pytest.mark.parametrize("layout", [("parallel.tp=1", "parallel.pp=2"),   # 1x2x2
                                    ("parallel.tp=4", "parallel.pp=1")])  # 4x1x1, KV replicated
def test_resume_at_another_layout(token_files, tmp_path, reference, layout):
    ref_out, ref = reference
    out = tmp_path / "resharded"
    proc = run(token_files, out, 4, *layout,
               f"trainer.resume={ref_out / 'checkpoints' / 'step_00000003'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for got, want in zip(losses(out), ref[3:], strict=True):
        assert abs(got - want) <= 1e-5 * want, (losses(out), ref[3:])


def test_kill_during_save_keeps_previous_checkpoint(token_files, tmp_path, reference):
    _, ref = reference
    out = tmp_path / "killed"
    proc = run(token_files, out, 4, "parallel.tp=2", "parallel.pp=2", "trainer.save_interval=2",
               fault="killsave@4")
    assert proc.returncode != 0
    root = out / "checkpoints"
    assert latest_checkpoint(root) == root / "step_00000002"
    assert not (root / "step_00000004").exists()
    proc = run(token_files, out, 4, "parallel.tp=2", "parallel.pp=2")  # resume=auto
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step 2" in proc.stdout
    assert losses(out)[-1] == ref[-1]


def test_torchrun_restarts_after_a_crash(token_files, tmp_path, reference):
    _, ref = reference
    out = tmp_path / "restarted"
    proc = run(token_files, out, 4, "parallel.tp=2", "parallel.pp=2", "trainer.save_interval=2",
               fault="crash@5", launcher=("--max-restarts=1",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected crash at step 5" in proc.stderr and "resumed from" in proc.stdout
    assert losses(out)[-1] == ref[-1]


def test_sigterm_saves_and_exits(token_files, tmp_path):
    """SIGTERM to the training processes (what a scheduler's preemption delivers): every rank
    saves the same step and exits 0, so torchrun exits 0 too; the checkpoint then resumes.
    (torchrun itself answers a SIGTERM of its own by exiting 1 whatever its workers do, so the
    signal goes to the workers, not to the launcher.)"""
    psutil = pytest.importorskip("psutil")  # a DeepSpeed dependency
    out = tmp_path / "preempted"
    args = overrides(token_files, out, "trainer.log_interval=1", "trainer.eval_interval=0",
                     "data.valid=[]", "trainer.steps=500", "parallel.pp=2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "megallama.train", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    deadline, seen = time.monotonic() + 180, []
    for line in proc.stdout:  # wait until training runs
        seen.append(line)
        if line.startswith("step 3/") or time.monotonic() > deadline:
            break
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2, ("expected torchrun's 2 workers", workers, "".join(seen)[-3000:])
    for w in workers:
        w.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, f"exit status {proc.returncode}:\n{rest[-3000:]}"
    assert "SIGTERM: saving step" in rest, rest[-3000:]
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and (ckpt / "trainer_state.json").is_file()
    saved = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert 3 <= saved < 500 and ckpt.name == f"step_{saved:08d}"
    assert f"SIGTERM: saving step {saved} and exiting" in rest, rest[-3000:]
    # the saved state resumes: two more steps from it, through the same entry point
    resumed = tmp_path / "resumed"
    args = overrides(token_files, resumed, "trainer.log_interval=1", "trainer.eval_interval=0",
                     "data.valid=[]", f"trainer.steps={saved + 2}", "parallel.pp=2",
                     f"trainer.resume={ckpt}")
    proc, _ = torchrun(2, "megallama.train", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {ckpt} at step {saved}" in proc.stdout, proc.stdout[-3000:]
    state = json.loads((resumed / "checkpoints" / f"step_{saved + 2:08d}" / "trainer_state.json")
                       .read_text())
    assert state["step"] == saved + 2
    assert state["sampler"]["consumed_samples"] == (saved + 2) * 8
    assert len(losses(resumed)) == 2  # steps saved+1 and saved+2 only


@pytest.mark.parametrize("optimizer", [("optim.impl=deepspeed",),
                                       ("optim.impl=fused", "parallel.zero_stage=0")],
                         ids=["deepspeed", "fused"])
def test_bf16_resume_matches(token_files, tmp_path, optimizer):
    """bf16 with ZeRO-1 runs on DeepSpeed's BF16_Optimizer, optim.impl=fused on megallama's
    (fp32 master split over the bf16 weight and a remainder, gradients accumulated in fp32 over
    the micro-batches): master weights and Adam moments must round-trip (identical losses)."""
    ref, out = tmp_path / "bf16_ref", tmp_path / "bf16_resumed"
    common = ("parallel.pp=2", "trainer.precision=bf16", *optimizer)
    proc = run(token_files, ref, 2, *common, "trainer.save_interval=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(token_files, out, 2, *common,
               f"trainer.resume={ref / 'checkpoints' / 'step_00000003'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(out) == losses(ref)[3:]
