"""Helpers for tests that launch the real entry points under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAULTS = "tests/distributed/faults.py"  # megallama.train with fault hooks installed
VOCAB = 256


def torchrun(nproc: int, module: str, args: list[str], env: dict | None = None, timeout=240,
             launcher: tuple[str, ...] = ()):
    """Launch ``module`` (or a script path ending in .py) on ``nproc`` local ranks."""
    target = [str(REPO / module)] if module.endswith(".py") else ["-m", module]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *launcher, *target, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - start


def overrides(token_files: Path, out: Path, *extra: str) -> list[str]:
    return [
        "model=tiny_gqa", f"model.vocab_size={VOCAB}", "model.n_layers=2",
        f"data.train=[{token_files / 'train'}]", f"data.valid=[{token_files / 'val'}]",
        "data.seq_len=32", "parallel.micro_batch_size=2", "parallel.global_batch_size=8",
        "optim.lr=3e-3", "optim.warmup_steps=3", "trainer.log_interval=2",
        "trainer.eval_interval=15", "trainer.eval_iters=2", "trainer.device=cpu",
        f"trainer.output_dir={out}", *extra,
    ]


def read_scalars(logdir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


