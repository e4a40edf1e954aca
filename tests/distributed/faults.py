"""Fault injection for the failure tests, installed as hooks from outside the package.

Run under torchrun in place of ``-m megallama.train``::

    torchrun ... tests/distributed/faults.py KIND@STEP [hydra overrides...]

KIND is one of
  crash     the last rank raises at STEP (first attempt only, so torchrun restarts can succeed)
  nan       the logits of STEP are NaN on every rank holding the output head (non-finite policy)
  killsave  the last rank SIGKILLs itself in the middle of saving STEP (after the weights)
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

KINDS = ("crash", "nan", "killsave")


@contextlib.contextmanager
def poisoned_output(engine) -> Iterator[None]:
    """Make the output head's logits NaN while inside (no-op on stages without the head)."""
    handles = [module.register_forward_hook(lambda m, i, out: out * float("nan"))
               for name, module in engine.local_layers() if name == "output"]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _last_rank_first_attempt() -> bool:
    last = int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1
    return last and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def hooks_for(spec: str):
    """The TrainHooks that inject fault ``KIND@STEP``."""
    from megallama.training.loop import TrainHooks

    kind, _, at = spec.partition("@")
    if kind not in KINDS or not at.isdigit():
        raise SystemExit(f"faults.py: {spec!r}: expected one of {KINDS} @STEP")
    fault_step, hooks = int(at), TrainHooks()
    poison: list[contextlib.ExitStack] = []

    def on_step(step: int, engine) -> None:
        if kind == "crash" and step == fault_step and _last_rank_first_attempt():
            raise RuntimeError(f"injected crash at step {step}")
        if kind == "nan":
            while poison:
                poison.pop().close()
            if step == fault_step:
                stack = contextlib.ExitStack()
                stack.enter_context(poisoned_output(engine))
                poison.append(stack)

    def on_saved(piece: str, tmp: Path) -> None:
        step = int(tmp.name.split("_")[1].split(".")[0])
        if kind == "killsave" and piece == "model" and step == fault_step \
                and _last_rank_first_attempt():
            os.kill(os.getpid(), signal.SIGKILL)

    hooks.step_start.append(on_step)
    hooks.piece_saved.append(on_saved)
    return hooks


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from megallama.train import main

    torch.set_num_threads(1)
    raise SystemExit(main(sys.argv[2:], hooks=hooks_for(sys.argv[1])))
