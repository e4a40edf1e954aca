"""``python -m megallama.train [hydra overrides...]`` -- the training entry point (under torchrun).

Order of events: compose and validate the config on every rank *before* any collective (a bad
option stops every rank with the same one-line message, never a hang), initialise
torch.distributed and the rank grid, build the engine, then loop: sample a global batch, run one
DeepSpeed step, log, evaluate, save.

Exit status: 0 when training completes; 2 for a configuration error (an unknown or mistyped
override, a bad layout, a missing or damaged file, a damaged checkpoint to start from...): every
rank finds it on its own, before any collective, ends with the one line
``megallama.train: error: ...`` (``MEGALLAMA_DEBUG=1`` adds the traceback) and exits with 2; see
:func:`_fail` for why a launcher's terminal shows the line once. Also 2, one line on every rank:
a checkpoint refused while the trainer loads it (a file failing its checksum, optimizer state
that is not finite or out of its domain) and non-finite weights at a save (nothing is
committed). Any other failure during training exits non-zero with its traceback.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megallama.checkpoint.atomic import CheckpointError, InvalidStateError
from megallama.config import ConfigError
from megallama.config.arguments import os_error_message, report_error
from megallama.config.train_config import TrainConfig
from megallama.parallel.runtime import init_distributed, resolve_device, world_info

if TYPE_CHECKING:
    from megallama.training.loop import TrainHooks

USAGE = """usage: torchrun --nproc-per-node N -m megallama.train [OVERRIDE ...]

Hydra overrides, e.g.:  experiment=tiny_cpu parallel.tp=2 parallel.pp=2 trainer.steps=300
Groups: model=llama2_7b|llama2_13b|llama2_70b|tiny|tiny_gqa|tiny_70b_shape, parallel, optim,
data, trainer, experiment=tiny_cpu|llama2_7b_pretrain. Any field can be overridden (see conf/).
"""


EXIT_CONFIG = 2  # like argparse's usage errors
PEER_REPORT_DELAY_S = 5.0


def _fail(rank: int, message: object) -> int:
    """Report a config error and return the exit status every rank uses.

    Rank 0 reports at once. The other ranks found the same error on their own and report it
    after ``PEER_REPORT_DELAY_S``: torchrun stops the remaining workers as soon as one has failed,
    so when rank 0 has reported, they are stopped silently and the terminal shows the line once;
    when rank 0 is slower (a loaded node) or elsewhere (another node's log), the line still
    appears. Called inside the ``except`` block, so ``MEGALLAMA_DEBUG=1`` shows the traceback.
    """
    if rank != 0:
        time.sleep(PEER_REPORT_DELAY_S)
    report_error("megallama.train", message)
    return EXIT_CONFIG


def prepare(overrides: list[str], world: int) -> tuple[TrainConfig, object, torch.device]:
    """Config, grid and device, checked without touching torch.distributed."""
    from megallama.config.compose import load_config
    from megallama.training.preflight import validate
    from megallama.training.run_files import check_start_checkpoint

    cfg = load_config(overrides)
    grid = validate(cfg, world)
    check_start_checkpoint(cfg)  # trainer.resume / trainer.init_from: paths, indexes, headers
    return cfg, grid, resolve_device(cfg.trainer.device)


def main(argv: list[str] | None = None, hooks: TrainHooks | None = None) -> int:
    """Run training with Hydra overrides ``argv``; ``hooks`` are extension points for tests
    and tools (see :class:`megallama.training.loop.TrainHooks`)."""
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` dumps stacks
    rank, world = world_info()
    try:
        cfg, grid, device = prepare(args, world)
    except (ConfigError, ValueError) as e:
        return _fail(rank, e)
    except OSError as e:  # reading the config or a file it names
        return _fail(rank, os_error_message(e))
    init_distributed(device)
    from megallama.training.loop import Trainer  # imports DeepSpeed: after the config checks

    trainer = None
    try:
        trainer = Trainer(cfg, grid, device, hooks)  # loads the checkpoint it starts from
        trainer.train()
    except ConfigError as e:  # found after start-up, by one rank (W&B refusing the run): one line
        report_error("megallama.train", e)
        return EXIT_CONFIG
    except CheckpointError as e:
        if trainer is not None and not isinstance(e, InvalidStateError):
            raise  # a save that failed (disk full...): a failure, with its traceback
        # on every rank alike: a checkpoint refused while loading (a checksum, invalid optimizer
        # state), or non-finite weights at a save (nothing committed)
        return _fail(rank, e)
    return 0


def cli() -> None:
    """The process entry point (``python -m megallama.train``, ``megallama-train``): :func:`main`,
    then the exit. A rank that reported an error after torch.distributed started leaves at once
    with its status: a normal interpreter exit runs the process group's C++ destructors while
    gloo's threads may still talk to a peer that already left, and under load that aborts the
    process ("terminate called without an active exception", SIGABRT) instead of exiting with the
    status. After a run that ended well (every rank passed the trainer's closing barrier), the
    process group is destroyed before the interpreter exits, for the same reason: its gloo
    threads are joined in order, not torn down by finalisation (seen once as SIGABRT after a
    complete run under load). Only here, never inside :func:`main`, which tests call
    in-process."""
    code = main()
    if code != 0 and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(code)


if __name__ == "__main__":
    cli()

