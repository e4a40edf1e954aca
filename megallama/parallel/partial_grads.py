"""Parameters whose gradient each rank of a tensor-parallel group computes only in part -- the one
place that states where their sum over the group is taken.

Two kinds of parameter are replicated over TP ranks that each see part of the data:

* RMSNorm weights under sequence parallelism: each TP rank normalises its own chunk of the
  sequence, so its weight gradient covers only those tokens (group: the TP group);
* wk / wv slices when tp > n_kv_heads: the ``tp / n_kv_heads`` ranks that hold one KV head each
  compute its gradient from their own query heads (group: the KV-replica group).

Their true gradient is the sum over the group. :func:`mark` tags such a parameter with
``tp_partial_grad_group``; :func:`use` is what forward multiplies by. Where the sum happens:

* by default, inside autograd: :func:`use` wraps the weight in ``copy_to_tp`` (identity forward,
  all-reduce backward), so every micro-batch's backward all-reduces every such weight's gradient
  on its own -- what a caller running backward by hand (tests, benchmarks) gets;
* once per step, coalesced, after an optimizer has taken the job (:func:`defer`, before the
  first forward): the model then leaves the gradient partial and the optimizer calls
  :func:`sum_partial` once per step on the accumulated gradients, one flat all-reduce per group
  (``optim.impl=fused``: after the DP mean; ``optim.impl=distributed``: on each rank's DP-reduced
  shards, 1/dp of the bytes; DeepSpeed ZeRO 0/1: just before its DP reduction; see
  docs/PERFORMANCE.md for the table). Summing over TP and averaging over DP commute, and both
  come before the gradient norm, so the clipped norm and the update are those of one rank (up to
  fp32 round-off in the order of the sums), as in Megatron-LM's ``finalize_model_grads``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from megallama.parallel import mappings
from megallama.parallel.mappings import Group

GROUP_ATTR = "tp_partial_grad_group"
DEFERRED_ATTR = "tp_partial_grad_deferred"


def mark(param: nn.Parameter, group: Group) -> None:
    """Tag ``param`` as computed in part on each rank of ``group`` (nothing for one rank)."""
    if mappings.group_size(group) > 1:
        setattr(param, GROUP_ATTR, group)


def group_of(param: nn.Parameter) -> Group:
    """The group ``param``'s gradient must be summed over, or None."""
    return getattr(param, GROUP_ATTR, None)


def use(param: nn.Parameter) -> torch.Tensor:
    """The weight as forward multiplies by it: the parameter itself when its sum is deferred to
    the optimizer (or it needs none), else ``copy_to_tp`` (summed in every backward)."""
    group = group_of(param)
    if group is None or getattr(param, DEFERRED_ATTR, False):
        return param
    return mappings.copy_to_tp(param, group)


def defer(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Leave the gradients of the marked parameters among ``params`` partial: the caller (an
    optimizer) sums them once per step with :func:`sum_partial`. Returns those parameters."""
    out = [p for p in params if group_of(p) is not None]
    for p in out:
        setattr(p, DEFERRED_ATTR, True)
    return out


def deferred(param: nn.Parameter) -> bool:
    return group_of(param) is not None and getattr(param, DEFERRED_ATTR, False)


@torch.no_grad()
def sum_partial(grads: Iterable[tuple[torch.Tensor, Group]]) -> int:
    """Sum each gradient (or piece of one) in place over its group: one flat fp32 all-reduce
    per group, every rank of a group passing its pieces in the same order and sizes. Returns
    the number of all-reduces issued."""
    by_group: dict[int, tuple[Group, list[torch.Tensor]]] = {}
    for grad, group in grads:
        by_group.setdefault(id(group), (group, []))[1].append(grad)
    issued = 0
    for group, tensors in by_group.values():
        if mappings.group_size(group) == 1 or not tensors:
            continue
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat, group=group)
        issued += 1
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(part.view_as(t))
    return issued
