"""Per-parameter access to the optimizer state DeepSpeed holds (fp32 master weights and Adam
moments, possibly ZeRO-partitioned over DP), behind the interface megallama's fused optimizer has
natively: ``full_state(p, key)`` / ``set_full_state(p, key, value)`` with key one of ``fp32``,
``exp_avg``, ``exp_avg_sq``. Checkpoint code sees only that interface."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state
from torch import nn


class OptimizerStateAccess(Protocol):
    """Full (unpartitioned) optimizer state of one parameter, readable and writable."""

    def full_state(self, p: nn.Parameter, key: str) -> torch.Tensor: ...

    def set_full_state(self, p: nn.Parameter, key: str, value: torch.Tensor) -> None: ...


class DeepSpeedState:
    """:class:`OptimizerStateAccess` over DeepSpeed's ZeRO (or BF16) optimizer: assembles each
    parameter's state over DP (``safe_get_full_*``, a collective) and scatters it back."""

    def __init__(self, ds_optimizer: Any) -> None:
        self.ds_optimizer = ds_optimizer
        ensure_adam_state(ds_optimizer.optimizer)  # DeepSpeed's setters need the state to exist
        link_zero_state(ds_optimizer)

    def full_state(self, p: nn.Parameter, key: str) -> torch.Tensor:
        value = (safe_get_full_fp32_param(p) if key == "fp32"
                 else safe_get_full_optimizer_state(p, key))
        if value is None:
            shape = tuple(getattr(p, "ds_shape", p.shape))
            raise RuntimeError(f"DeepSpeed holds no {key} state for a parameter of shape {shape} "
                               "(ZeRO stage >= 1 is required)")
        return value

    def set_full_state(self, p: nn.Parameter, key: str, value: torch.Tensor) -> None:
        if key == "fp32":
            safe_set_full_fp32_param(p, value)
        else:
            safe_set_full_optimizer_state(p, value, key)


def link_zero_state(ds_optimizer: Any) -> None:
    """Point every parameter's ZeRO fragment mapping at its Adam moments.

    DeepSpeed links them lazily inside the first step, while it has narrowed the optimizer to one
    parameter group, so only the first group gets linked (norm weights would have no readable
    moments). Linking all groups here is idempotent."""
    # ZeRO-1/2 optimizer, or DeepSpeed's BF16_Optimizer (bf16 with ZeRO-1)
    groups = getattr(ds_optimizer, "bit16_groups", getattr(ds_optimizer, "bf16_groups", None))
    flat = getattr(ds_optimizer, "single_partition_of_fp32_groups",
                   getattr(ds_optimizer, "fp32_groups_flat_partition", None))
    if groups is None or flat is None:
        return  # ZeRO-3 keeps its own per-parameter mapping
    for lp_params, hp in zip(groups, flat, strict=True):
        lazy_init_hp_params_optimizer_state(lp_params, hp, ds_optimizer.optimizer.state)


def ensure_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create torch AdamW's lazily initialised state (step, moments) without changing anything:
    one step with zero gradients at lr 0 (DeepSpeed's setters need the state to exist)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if all(p in optimizer.state and "exp_avg" in optimizer.state[p] for p in params):
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs, strict=True):
        g["lr"] = lr
    for p in params:
        p.grad = None
