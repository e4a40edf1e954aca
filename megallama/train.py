"""``python -m megallama.train [hydra overrides...]`` -- the training entry point (under torchrun).

Order of events: compose and validate the config on every rank *before* any collective (a bad
option stops every rank with the same one-line message, never a hang), initialise
torch.distributed and the rank grid, build the engine, then loop: sample a global batch, run one
DeepSpeed step, log, evaluate, save.

Exit status: 0 when training completes; 2 for a configuration error (an unknown or mistyped
override, a bad layout, a missing or damaged file...): every rank exits with it before any
collective and rank 0 prints the one line ``megallama.train: error: ...`` (``MEGALLAMA_DEBUG=1``
adds the traceback). A failure during training is not a config error: it exits non-zero with its
traceback.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
from typing import TYPE_CHECKING

import torch

from megallama.config import ConfigError
from megallama.config.arguments import report_error
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


def _fail(rank: int, message: object) -> int:
    """Report a config error once (rank 0) and return the exit status every rank uses."""
    if rank == 0:
        report_error("megallama.train", message)
    return EXIT_CONFIG


def prepare(overrides: list[str], world: int) -> tuple[TrainConfig, object, torch.device]:
    """Config, grid and device, checked without touching torch.distributed."""
    from megallama.config.compose import load_config
    from megallama.training.preflight import validate
    from megallama.training.run_files import resolve_resume

    cfg = load_config(overrides)
    grid = validate(cfg, world)
    resolve_resume(cfg)  # a bad trainer.resume path fails here, before any collective
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
        return _fail(rank, f"{e.filename}: {e.strerror}" if e.filename else e)
    init_distributed(device)
    from megallama.training.loop import train  # imports DeepSpeed: after the config checks

    train(cfg, grid, device, hooks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

