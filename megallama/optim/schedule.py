"""AdamW parameter groups and the Llama 2 learning-rate schedule (linear warmup, cosine decay).

Weight decay applies to every matrix -- attention and FFN weights, the token embedding and the
output head -- and not to 1-D parameters, which in Llama are the RMSNorm gains (decaying a gain
toward 0 would shrink the normalised activations rather than regularise anything).

The schedule is an absolute learning rate per optimizer step, so the trainer, the logs and a
resumed run all compute the same number from (step, config) alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from megallama.config.train_config import OptimConfig


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float
) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group (ndim >= 2) and an undecayed one (ndim < 2).

    Frozen parameters (``requires_grad=False``) are left out; empty groups are dropped (DeepSpeed
    drops them too). DeepSpeed's ZeRO issues one collective per group for the gradient norm, so
    every rank must end up with the same groups: the pipeline partitioner guarantees it by giving
    every stage at least one block (matrices and norm weights). Groups hold only torch's own keys. The
    names are not needed for the split (it goes by shape) but keep the signature that of
    ``model.named_parameters()``.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for _name, param in named_params:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim >= 2:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The learning rate for the optimizer step taken after ``step`` steps (``step`` is 0-based).

    With peak ``P = cfg.lr``, warmup ``W = cfg.warmup_steps``, minimum ``M = cfg.min_lr_ratio * P``
    and decay end ``D = cfg.decay_steps`` (``total_steps`` when None; counted from step 0, warmup
    included, as Megatron's ``lr_decay_iters``):

    * ``step < W``: ``P * (step + 1) / W`` -- the first update already moves (lr P/W), and the
      W-th update uses P;
    * ``W <= step < D``: ``M + (P - M) * (1 + cos(pi * (step - W) / (D - W))) / 2`` -- P at
      ``step = W``, falling to M at ``step = D``;
    * ``step >= D``: M.

    When ``D <= W`` (a run shorter than its warmup) there is no cosine: after warmup the rate is M.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    peak = cfg.lr
    warmup = cfg.warmup_steps
    floor = cfg.min_lr_ratio * peak
    end = cfg.decay_steps if cfg.decay_steps is not None else total_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= end:
        return floor
    progress = (step - warmup) / (end - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]],
    cfg: OptimConfig,
    total_steps: int,
    fused: bool = False,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """torch's AdamW over :func:`param_groups`, and a LambdaLR following :func:`lr_at`.

    The scheduler's factor is ``lr_at(step) / cfg.lr``; LambdaLR applies step 0 at construction, so
    calling ``scheduler.step()`` once after every ``optimizer.step()`` leaves the optimizer at
    ``lr_at(k)`` after k steps. The factor is a closure, so ``scheduler.state_dict()`` holds only
    ``last_epoch``: on resume the schedule is rebuilt from the config. ``fused=True`` selects
    torch's fused CUDA kernel (all parameters must then be on a GPU); a torch optimizer instance
    is also what lets DeepSpeed skip JIT-building its own FusedAdam.
    """
    groups = param_groups(named_params, cfg.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters to optimize")
    extra: dict[str, Any] = {"fused": True} if fused else {}
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        **extra,
    )

    def factor(step: int) -> float:
        return lr_at(step, cfg, total_steps) / cfg.lr if cfg.lr else 0.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler


__all__ = ["build_optimizer", "lr_at", "param_groups"]
