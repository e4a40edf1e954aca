"""The gradients each TP rank holds in part (SP norm weights, KV replicas when tp > n_kv_heads;
:mod:`megallama.parallel.partial_grads` states the rule) under DeepSpeed's optimizers
(``optim.impl=deepspeed``): summed over their TP group once per step, one flat all-reduce per
group, just before DeepSpeed's DP reduction at the gradient-accumulation boundary.

Where DeepSpeed keeps a parameter's accumulated gradient just before that reduction:

* ZeRO-0 (torch AdamW, fp32) and ZeRO-1 fp32 (DeepSpeed's ZeRO optimizer without gradient
  partitioning or ``overlap_comm``, as our config sets it): ``p.grad``, summed by autograd over
  the micro-batches and read by the engine's boundary reduction (``allreduce_gradients``, which
  calls the ZeRO-1 optimizer's ``reduce_gradients``);
* ZeRO-1 bf16 (DeepSpeed's ``BF16_Optimizer`` with ``immediate_grad_update``): the parameter's
  full fp32 accumulation buffer ``p._hp_grad`` (what DeepSpeed's own ``safe_get_full_grad``
  reads), all-reduced over DP by ``allreduce_gradients`` at pp = 1 and by the PipelineEngine's
  ``_bf16_reduce_grads`` at pp > 1.

So the sum is taken by a wrapper around those two engine methods (instance attributes: the
PipelineEngine's ``ReduceGrads`` instruction calls them through ``self``), on the boundary only.
Where the engine skips its DP reduction (dp = 1 with the bf16 optimizer, see ``Engine``), the
engine calls :meth:`PartialGradSum.now` after the last backward instead.

ZeRO-2 and ZeRO-3 reduce (and partition) each gradient over DP in backward hooks of every
micro-batch; summing over TP there would mean reaching into their partitions. For those two the
model keeps the per-micro-batch all-reduce inside autograd (``partial_grads.use``); see
docs/PERFORMANCE.md, "Gradients held in part by TP ranks".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from torch import nn

from megallama.parallel import partial_grads


def sums_once_per_step(ds_engine: Any) -> bool:
    """Whether this DeepSpeed engine's optimizer keeps accumulated, not yet DP-reduced gradients
    where :class:`PartialGradSum` can sum them (module docstring)."""
    opt = ds_engine.optimizer
    if isinstance(opt, BF16_Optimizer):
        return bool(getattr(opt, "immediate_grad_update", False))
    stage = ds_engine.zero_optimization_stage()
    if stage == 0:
        return isinstance(opt, torch.optim.Optimizer)
    return stage == 1 and not any(getattr(opt, flag, True) for flag in
                                  ("partition_gradients", "overlap_comm",
                                   "use_grad_accum_attribute"))


def _accumulated(p: nn.Parameter) -> torch.Tensor:
    """The gradient DeepSpeed is about to reduce over DP (zeros for a parameter that got none,
    so every rank of a group passes the same sizes)."""
    if p.grad is not None:
        return p.grad
    hp = getattr(p, "_hp_grad", None)
    return hp if hp is not None else torch.zeros_like(p, dtype=torch.float32)


class PartialGradSum:
    """Sums the partial gradients of a DeepSpeed engine's parameters once per step (module
    docstring); ``issued`` counts the all-reduces (tests)."""

    def __init__(self, ds_engine: Any, params: list[nn.Parameter]) -> None:
        self.engine = ds_engine
        self.params = partial_grads.defer(params)
        self.issued = 0
        if self.params:
            for name in ("allreduce_gradients", "_bf16_reduce_grads"):
                if hasattr(ds_engine, name):
                    setattr(ds_engine, name, self._before(getattr(ds_engine, name)))

    def _before(self, reduce: Callable[..., Any]) -> Callable[..., Any]:
        def reduce_after_tp_sum(*args: Any, **kwargs: Any) -> Any:
            if self.engine.is_gradient_accumulation_boundary():
                self.now()
            return reduce(*args, **kwargs)
        return reduce_after_tp_sum

    def now(self) -> None:
        """Sum every partial gradient over its group (one flat all-reduce per group)."""
        self.issued += partial_grads.sum_partial(
            (_accumulated(p), partial_grads.group_of(p)) for p in self.params)
