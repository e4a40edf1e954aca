"""Process start-up: pick the device (CUDA/NCCL or CPU/gloo) and initialise torch.distributed.

The same code path serves a laptop and a cluster; only the backend and the device differ.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist

from megallama.config import ConfigError
from megallama.config.arguments import os_error_message, report_error


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU; ``cuda`` without a GPU is a config error."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"trainer.device={device!r}: expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _init_on_agent_store(backend: str, timeout_s: float) -> None:
    """Join the process group through torchrun's agent store under a per-attempt prefix.

    After ``torchrun --max-restarts`` restarts the workers, the default env:// rendezvous let
    gloo read the previous attempt's peer addresses from the agent store and fail to connect
    ("connectFullMesh ... Connection refused", torch 2.13); a prefix naming the restart attempt
    keeps every attempt's keys apart."""
    timeout = datetime.timedelta(seconds=timeout_s)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"megallama/attempt_{attempt}", base)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> None:
    """Initialise torch.distributed (NCCL on CUDA, gloo on CPU); no-op when already initialised.

    Works under torchrun and as a plain single process (world of one). DeepSpeed attaches its
    comm layer to this group later, inside the engine (:mod:`megallama.engine`)."""
    if dist.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:  # a plain single process: any free port will do
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        _init_on_agent_store(backend, timeout_s)
    else:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def world_info() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment, valid before init."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_command(prog: str, body: Callable[[], int], errors: tuple[type[BaseException], ...]) -> int:
    """Run a command line's ``body`` as every rank should: an expected error (``errors``; an
    OSError among them is shown as ``PATH: reason``) is one line ``prog: error: ...`` on stderr
    and exit status 2, no traceback; a process group the body started is destroyed on the way
    out (a caller's group is the caller's to end).

    Every rank prints the line, not only rank 0: torchrun stops the other workers as soon as one
    exits, so a rank 0 a moment late would be killed before it said why. All ranks meet the same
    error (checks run before torch.distributed starts; load errors are agreed over ranks)."""
    started_here = not dist.is_initialized()
    try:
        return body()
    except errors as e:
        report_error(prog, os_error_message(e) if isinstance(e, OSError) else e)
        return 2
    finally:
        if started_here and dist.is_initialized():
            dist.destroy_process_group()
