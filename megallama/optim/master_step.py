"""What megallama's two master-weight AdamW optimizers share (``optim.impl=fused``, every DP rank
holding the whole state, and ``optim.impl=distributed``, the state sharded over DP): when
gradients need an fp32 buffer, the local part of the squared global gradient norm, the clip
coefficient, the Adam scalars of a parameter group, one AdamW update of a tensor (the Triton kernel
or the torch reference, as :mod:`megallama.optim.kernels` decides) and a non-blocking copy of the norm to the host.

Both optimizers follow one rule for a step whose global norm is not finite: nothing changes (the
kernel reads ``ok`` on the device; the reference is skipped from the host) and ``overflow`` is set,
which makes DeepSpeed count the step as skipped and hold the LR schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from megallama.optim.adamw_kernel import (
    AdamWScalars,
    adamw_fused,
    adamw_reference,
    sum_of_squares,
)
from megallama.parallel.mappings import all_reduce_sum_


def needs_fp32_grad_buffer(param_dtype: torch.dtype, gas: int, dp: int) -> bool:
    """Whether gradients go through an fp32 ``main_grad`` buffer: when a low-precision gradient
    is summed (over micro-batches or DP ranks), the sum must be taken in fp32."""
    return param_dtype != torch.float32 and (gas > 1 or dp > 1)


def counts_in_norm(p: nn.Parameter, tp_rank: int) -> bool:
    """Whether this rank adds ``p``'s gradient to the global norm: a TP-sharded parameter on
    every TP rank, a replicated one on TP rank 0 only (as DeepSpeed's norm), and the last
    pipeline stage's copy of a tied embedding (``tied_copy``) never: the first stage counts it."""
    if getattr(p, "tied_copy", False):
        return False
    return bool(getattr(p, "model_parallel", False)) or tp_rank == 0


def sum_tied_grad(p: nn.Parameter, grad: torch.Tensor) -> None:
    """Sum ``grad`` in place over ``p.tied_group`` when ``p`` is one copy of a tied embedding
    split over pipeline stages (the first stage's table, the last stage's copy): both then hold
    the gradient of the one weight, as at pp = 1 (Megatron's embedding group)."""
    group = getattr(p, "tied_group", None)
    if group is not None:
        all_reduce_sum_(grad, group)


def local_sum_of_squares(tensors: list[torch.Tensor], device: torch.device,
                         use_kernel: bool) -> torch.Tensor:
    """sum(t^2) over all elements of ``tensors`` as a float64 0-d tensor on ``device`` (this
    rank's part of the squared global gradient norm).

    Why float64, as DeepSpeed's ZeRO optimizers (``get_norm_dtype``): summed in fp32, the squares
    of a large tensor's small elements fall below half an ulp of the running sum and vanish, a
    one-sided bias (measured: 8.7e-5 of a 512,000-element output head's squared norm, so
    layouts, which cut tensors differently, logged norms 1e-6 apart). The reference takes each
    tensor's norm in float64; the Triton kernel sums blocks of ``NORM_BLOCK`` elements in fp32
    (a tree of 8192 positive terms: relative error ~1e-7 per block, unbiased across blocks) and
    adds the blocks' partial sums in float64. The sum stays float64 through the DP/TP/PP
    all-reduces; :func:`global_norm` rounds the root to fp32."""
    if tensors and use_kernel:
        return sum_of_squares(tensors)
    if tensors:
        return torch.stack(torch._foreach_norm(tensors, 2.0, dtype=torch.float64)).square().sum()
    return torch.zeros((), dtype=torch.float64, device=device)


def global_norm(sum_sq: torch.Tensor) -> torch.Tensor:
    """The fp32 global norm from the (float64, fully reduced) sum of squares: fp32, as the clip
    coefficient the update kernels read."""
    return sum_sq.sqrt().float()


def clip_coefficient(norm: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """min(1, max_norm / (norm + 1e-6)) as torch's ``clip_grad_norm_`` computes it (1: no clip)."""
    if max_grad_norm > 0:
        return torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
    return torch.ones_like(norm)


def adam_scalars(group: dict[str, Any], step: int) -> AdamWScalars:
    """The Adam scalars of one parameter group at (1-based) Adam step ``step``."""
    b1, b2 = group["betas"]
    return AdamWScalars(group["lr"], b1, b2, group["eps"], group["weight_decay"], step)


def update(weight: torch.Tensor, grad: torch.Tensor, lo: torch.Tensor | None,
           exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, coef: torch.Tensor,
           ok: torch.Tensor, s: AdamWScalars, *, use_kernel: bool, apply: bool) -> None:
    """One AdamW update of ``weight`` (its master split with ``lo`` when bf16). The kernel reads
    ``ok`` on the device; the reference runs only when the host says ``apply``."""
    if use_kernel:
        adamw_fused(weight, grad, lo, exp_avg, exp_avg_sq, coef, ok, s)
    elif apply:
        adamw_reference(weight, grad, lo, exp_avg, exp_avg_sq, coef, s)


def copy_to_host(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start copying a device scalar to the host; the returned callable waits for that copy only
    (not for the kernels queued after it)."""
    if not x.is_cuda:
        return lambda: x
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def wait() -> torch.Tensor:
        done.synchronize()
        return host
    return wait
