"""What megallama tells DeepSpeed: its JSON config, the ``mpu`` view of our process groups, and
the attachment of DeepSpeed's comm layer to the process group we started.

DeepSpeed's defaults are never relied on silently: gradient clipping, batch arithmetic, precision,
the fp32 gradient-accumulation dtype and the non-finite-gradient check are always written here.
"""

from __future__ import annotations

import datetime
import importlib
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from megallama.config.train_config import TrainConfig
from megallama.parallel.topology import Topology


def deepspeed_config(cfg: TrainConfig, dp: int) -> dict[str, Any]:
    """DeepSpeed's config dict for this run at data-parallel size ``dp``."""
    p = cfg.parallel
    fused = cfg.optim.impl in ("fused", "distributed")  # megallama's own optimizer
    return {
        "train_batch_size": p.global_batch_size,
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": p.global_batch_size // (p.micro_batch_size * dp),
        # explicit: DeepSpeed's default is 1.0 (the fused optimizer clips by itself)
        "gradient_clipping": 0.0 if fused else cfg.optim.grad_clip,
        # overlap_comm written as DeepSpeed's default (on for ZeRO-3 only): with it off, ZeRO-1
        # keeps each accumulated p.grad until its boundary DP reduction, where
        # megallama.engine.tp_grads sums SP norms / KV replicas over TP once per step
        "zero_optimization": {"stage": p.zero_stage, "overlap_comm": p.zero_stage == 3},
        # immediate_grad_update: each bf16 gradient is added into the fp32 buffer as soon as it is
        # ready and then freed, instead of all of them living until the step (2 bytes/param less).
        # With the fused optimizer DeepSpeed sees plain parameters (cast to bf16 by the Engine).
        "bf16": {"enabled": cfg.trainer.precision == "bf16" and not fused,
                 "check_grad_overflow": True, "immediate_grad_update": True},
        "data_types": {"grad_accum_dtype": "fp32"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device at every forward and step; we
        # measure throughput ourselves (megallama.training.metrics)
        "timers": {"throughput": {"enabled": False}},
        "zero_allow_untested_optimizer": True,
        # DeepSpeed may send 1/tp of each inter-stage activation and all-gather it on arrival,
        # which assumes activations are replicated over TP; under sequence parallelism each TP
        # rank holds a different sequence chunk, so that must be off.
        "pipeline": {"pipe_partitioned": not p.sequence_parallel,
                     "grad_partitioned": not p.sequence_parallel},
    }


class TopologyMPU:
    """The ``mpu`` interface DeepSpeed's plain engine reads for DP reduction and the TP-aware
    gradient norm (the PipelineEngine builds the same groups from its own topology)."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo

    def get_model_parallel_rank(self) -> int:
        return self.topo.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.topo.grid.tp

    def get_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.topo.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.topo.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topo.grid.dp

    def get_data_parallel_group(self) -> dist.ProcessGroup | None:
        return self.topo.dp_group


def attach_comm(device: torch.device, timeout_s: float = 600.0) -> None:
    """Set up DeepSpeed's comm layer over the already initialised torch.distributed group.

    On CPU, DeepSpeed would JIT-compile a shared-memory comm op (~40 s) that gloo does not need:
    it is replaced by a no-op first. ``deepspeed.comm.torch`` must be fetched with importlib:
    inside ``deepspeed.comm`` the name ``torch`` is the real torch module, so a plain import would
    patch the wrong object."""
    if device.type != "cuda":
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(  # reuses the existing group
        dist_backend="nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s), verbose=False)
