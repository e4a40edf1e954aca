"""megallama's own mixed-precision AdamW (``optim.impl=fused``): fp32 master weights and moments,
gradient clipping by the global norm and non-finite-step skipping, as one pass per parameter.

Why: with bf16 training DeepSpeed wraps the optimizer in its bf16 optimizer (ZeRO-1), which copies
every gradient into an fp32 buffer, clips it, steps torch's AdamW on the fp32 master and copies the
weights back: five passes over memory and 4 bytes/param of extra resident buffer. This optimizer
reads the bf16 gradient directly in one fused kernel (megallama.optim.adamw_kernel), and keeps the
fp32 master as the bf16 weight plus a 16-bit remainder (exact, see there). DeepSpeed still runs the
model, the 1F1B schedule and the LR scheduler; only the optimizer state is not sharded
(``parallel.zero_stage=0``), which is the trade: speed and 12 bytes/param of optimizer state plus
2 of gradient, instead of ZeRO's sharding over data-parallel ranks.

Gradients go where DeepSpeed's own path sends them, with the same numerics:
* fp32 params, or bf16 params with one micro-batch per step on one DP rank: ``p.grad`` is read as is;
* bf16 params otherwise: a hook adds each gradient into an fp32 buffer (``main_grad``) as soon as
  autograd produces it and frees it, so accumulation and the DP reduction happen in fp32.
The DP mean all-reduce (a tied embedding's gradient first summed over its first and last pipeline
stage), the TP/PP-aware global norm (a sharded parameter counts on every TP rank, a replicated one
on TP rank 0 only, as DeepSpeed's norm does, a tied copy once) and the update all happen in
:meth:`step`. A step whose norm is not finite changes nothing and sets ``overflow``, which makes
DeepSpeed count it as skipped and hold the LR schedule, as its ZeRO optimizers do. Between the DP
mean and the norm, the gradients each TP rank holds in part (SP norm weights, KV replicas) are
summed over their group, one flat all-reduce per group per step
(:mod:`megallama.parallel.partial_grads`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from megallama.optim.adamw_kernel import adamw_fused, join_fp32, split_fp32
from megallama.optim.kernels import use_triton
from megallama.optim.master_step import (
    adam_scalars,
    clip_coefficient,
    copy_to_host,
    counts_in_norm,
    global_norm,
    local_sum_of_squares,
    needs_fp32_grad_buffer,
    sum_tied_grad,
    update,
)
from megallama.parallel import partial_grads
from megallama.parallel.mappings import all_reduce_mean_, all_reduce_sum_
from megallama.parallel.topology import Topology

__all__ = ["MasterWeightAdamW", "needs_fp32_grad_buffer"]


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW over (possibly bf16) parameters with fp32 master weights and moments."""

    def __init__(self, groups: Iterable[dict[str, Any]], *, lr: float, betas: tuple[float, float],
                 eps: float, max_grad_norm: float, topo: Topology, gas: int,
                 use_kernel: bool | None = None) -> None:
        super().__init__(list(groups), {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.max_grad_norm = max_grad_norm
        self.topo = topo
        self.step_count = torch.zeros(())  # shared as every parameter's state["step"], like AdamW's
        self.overflow = False
        self._global_grad_norm: float | None = None
        self.gas = gas  # micro-batches per step on this rank
        for p in self._params():
            self._init_state(p)
        if use_kernel is None:
            use_kernel = use_triton(self._params()[0].device)
        self.use_kernel = use_kernel
        # SP norm weights and KV replicas: their partial gradients summed over TP once per step
        self.partial = partial_grads.defer(self._params())

    def _params(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    def _init_state(self, p: nn.Parameter) -> None:
        state = self.state[p]
        state["step"] = self.step_count
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        if p.dtype != torch.float32:
            if p.dtype != torch.bfloat16 or not p.is_contiguous():
                raise TypeError(f"MasterWeightAdamW takes fp32 or contiguous bf16 parameters, "
                                f"got {p.dtype}")
            # the fp32 master is (p, master_lo): p holds its upper half (see adamw_kernel)
            state["master_lo"] = torch.zeros_like(p, dtype=torch.int16)
            if needs_fp32_grad_buffer(p.dtype, self.gas, self.topo.grid.dp):
                state["main_grad"] = torch.zeros_like(p, dtype=torch.float32)
                p.register_post_accumulate_grad_hook(self._move_grad)

    def _move_grad(self, p: nn.Parameter) -> None:
        self.state[p]["main_grad"].add_(p.grad)
        p.grad = None

    # ---- the step ----------------------------------------------------------------------------
    def _grad(self, p: nn.Parameter) -> torch.Tensor | None:
        main = self.state[p].get("main_grad")
        return main if main is not None else p.grad

    @torch.no_grad()
    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """Global L2 norm of the gradients over the whole model (all TP and PP ranks)."""
        tp_rank = self.topo.tp_rank
        counted = [self._grad(p) for p in params if counts_in_norm(p, tp_rank)]
        sq = local_sum_of_squares(counted, params[0].device, self.use_kernel)
        all_reduce_sum_(sq, self.topo.tp_group)
        all_reduce_sum_(sq, self.topo.pp_group)
        return global_norm(sq)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        if closure is not None:
            raise ValueError("MasterWeightAdamW does not take a closure")
        params = [p for p in self._params() if self._grad(p) is not None]
        if not params:
            return
        grads = [self._grad(p) for p in params]
        for p, g in zip(params, grads, strict=True):  # a tied embedding's two pipeline stages
            sum_tied_grad(p, g)
        all_reduce_mean_(grads, self.topo.dp_group)
        partial_grads.sum_partial((self._grad(p), partial_grads.group_of(p))
                                  for p in self.partial if self._grad(p) is not None)
        norm = self.grad_norm(params)
        ok = torch.isfinite(norm).float()
        coef = clip_coefficient(norm, self.max_grad_norm)
        norm_host = copy_to_host(norm)
        self.step_count += 1
        step = int(self.step_count)
        self._update(coef, ok, step)
        self._global_grad_norm = float(norm_host())
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            self.step_count -= 1

    def _update(self, coef: torch.Tensor, ok: torch.Tensor, step: int) -> None:
        """One AdamW update per parameter: the Triton kernel reads ``ok`` on the device; the
        torch reference is skipped from the host (one sync; :mod:`megallama.optim.kernels` says
        which of the two runs)."""
        apply = self.use_kernel or bool(ok)
        for group in self.param_groups:
            s = adam_scalars(group, step)
            for p in group["params"]:
                state, grad = self.state[p], self._grad(p)
                if grad is None:
                    continue
                tensors = (p.data, grad, state.get("master_lo"), state["exp_avg"],
                           state["exp_avg_sq"], coef)
                if self.use_kernel:  # zeroes the fp32 buffer in the same pass
                    adamw_fused(*tensors, ok, s, zero_grad="main_grad" in state)
                    continue
                update(*tensors, ok, s, use_kernel=False, apply=apply)
                if "main_grad" in state:
                    state["main_grad"].zero_()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for p in self._params():
            if "main_grad" in self.state[p]:
                self.state[p]["main_grad"].zero_()

    # ---- checkpoint access (the same interface for every layout: nothing is partitioned) -----
    def full_state(self, p: nn.Parameter, key: str) -> torch.Tensor:
        """``fp32`` (master weight), ``exp_avg`` or ``exp_avg_sq`` of ``p``, as an fp32 tensor."""
        if key == "fp32":
            lo = self.state[p].get("master_lo")
            return p.data.float() if lo is None else join_fp32(p.data, lo)
        return self.state[p][key]

    @torch.no_grad()
    def set_full_state(self, p: nn.Parameter, key: str, value: torch.Tensor) -> None:
        if key != "fp32":
            self.state[p][key].copy_(value)
        elif "master_lo" in self.state[p]:
            hi, lo = split_fp32(value.to(p.device, torch.float32))
            p.data.copy_(hi)
            self.state[p]["master_lo"].copy_(lo)
        else:
            p.data.copy_(value)
