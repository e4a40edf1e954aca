"""Contiguous gradient buckets of the distributed optimizer (``optim.impl=distributed``), each
sharded over data-parallel ranks, with the reduce-scatter of a bucket started from the backward.

A bucket is a run of consecutive parameters in *reverse* registration order (the order autograd
produces their gradients: the last layers first), up to ``bucket_bytes`` of weights. Its
parameters' storage is one flat buffer (their ``.data`` become views into it, so the all-gather of
the updated weights writes into the model directly), and their gradients are added into a second
flat buffer (fp32 whenever gradients are summed, :func:`needs_fp32_grad_buffer`). Both are padded
to a multiple of ``dp``: DP rank r owns elements ``[r * shard, (r + 1) * shard)`` of every bucket.

A parameter may straddle two ranks' shards; :class:`Segment` is one parameter's piece of one
rank's shard, the unit the update, the norm and the checkpoint work on.

The reduce-scatter is in place: its output is this rank's own shard of the gradient buffer, so no
separate reduced-gradient buffer exists (4 bytes/param/dp less than a separate fp32 shard). NCCL
reduces in place when the output is the input's rank-th chunk, as here; Gloo does not (measured:
it overwrote chunks other ranks still had to read), so over Gloo (CPU tests) the collective writes
into a staging shard allocated at its launch and copied into the buffer at :meth:`Bucket.wait`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

Group = dist.ProcessGroup | None

# torch 2.13 renamed the tensor collectives (the old names warn); older torch has only those
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def reduces_in_place(group: Group) -> bool:
    """Whether a reduce-scatter over ``group`` may write into its own input (NCCL)."""
    return dist.get_backend(group) == "nccl"


def gather_flat(out: torch.Tensor, shard: torch.Tensor, group: Group) -> None:
    """Every rank's equal-sized ``shard`` concatenated into ``out`` (blocking)."""
    _all_gather(out, shard, group=group)


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, start + length)`` of parameter ``index`` (flattened) of a bucket, held at
    ``[shard_start, shard_start + length)`` of a rank's shard of that bucket."""
    index: int
    start: int
    shard_start: int
    length: int


def plan_buckets(numels: list[int], bucket_elems: int,
                 alone: list[bool] | None = None) -> list[list[int]]:
    """Indices of consecutive tensors grouped into buckets of at most ``bucket_elems`` elements
    (a tensor larger than that, or flagged in ``alone``, is a bucket of its own)."""
    buckets: list[list[int]] = []
    size = 0
    alone = alone or [False] * len(numels)
    for i, n in enumerate(numels):
        if not buckets or size + n > bucket_elems or alone[i] or alone[i - 1]:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += n
    return buckets


def shard_segments(numels: list[int], shard_start: int, shard_size: int) -> list[Segment]:
    """The pieces of the tensors (laid out back to back from 0) that fall into
    ``[shard_start, shard_start + shard_size)``."""
    out, offset = [], 0
    end = shard_start + shard_size
    for i, n in enumerate(numels):
        lo, hi = max(offset, shard_start), min(offset + n, end)
        if lo < hi:
            out.append(Segment(i, lo - offset, lo - shard_start, hi - lo))
        offset += n
    return out


class Bucket:
    """One bucket: flat weights (the parameters' storage), flat gradients, this rank's shard."""

    def __init__(self, params: list[nn.Parameter], grad_dtype: torch.dtype, dp: int,
                 dp_rank: int, group: Group) -> None:
        self.params, self.dp, self.group = params, dp, group
        numels = [p.numel() for p in params]
        self.offsets = [sum(numels[:i]) for i in range(len(params))]
        total = sum(numels)
        self.shard_size = -(-total // dp)
        self.shard_start = dp_rank * self.shard_size
        padded, device = self.shard_size * dp, params[0].device
        if len({p.dtype for p in params}) != 1:
            raise TypeError("a gradient bucket needs parameters of one dtype")
        self.weight = torch.zeros(padded, dtype=params[0].dtype, device=device)
        for p, o, n in zip(params, self.offsets, numels, strict=True):
            self.weight[o:o + n].copy_(p.data.reshape(-1))
            p.data = self.weight[o:o + n].view(p.shape)
        self.grad = torch.zeros(padded, dtype=grad_dtype, device=device)
        self.segments = shard_segments(numels, self.shard_start, self.shard_size)
        # the reduce-scatter's output: this rank's chunk of the buffer itself (module docstring)
        self.shard_grad = self._shard(self.grad)
        self.in_place = dp == 1 or reduces_in_place(group)
        self.staging: torch.Tensor | None = None  # Gloo: the collective's output until wait()
        self.pending = 0  # gradients still to come this step (parameters x micro-batches)
        self.received = [0] * len(params)  # gradients of each parameter so far this step
        self.work: dist.Work | None = None
        self.launched = False

    def _shard(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.shard_start:self.shard_start + self.shard_size]

    def weight_shard(self) -> torch.Tensor:
        """This rank's piece of the flat weights (bf16: the upper half of the fp32 master)."""
        return self._shard(self.weight)

    def grad_of(self, index: int) -> torch.Tensor:
        p, o = self.params[index], self.offsets[index]
        return self.grad[o:o + p.numel()].view(p.shape)

    def add_grad(self, index: int, grad: torch.Tensor) -> bool:
        """Add one gradient of parameter ``index``; True when the bucket just became complete."""
        if self.launched:
            raise RuntimeError("a gradient arrived after its bucket's reduce-scatter started "
                               "(more backward passes per step than gradient_accumulation_steps?)")
        self.grad_of(index).add_(grad)
        self.received[index] += 1
        self.pending -= 1
        return self.pending == 0

    def start(self, expected: int) -> None:
        """A new step: ``expected`` gradients (parameters x micro-batches) complete the bucket."""
        self.pending, self.launched, self.work = expected, False, None
        self.received = [0] * len(self.params)

    def reduce_scatter(self, on_launch: Callable[[Bucket], None] | None = None) -> None:
        """Start the asynchronous sum of this bucket's gradients over DP into this rank's shard."""
        self.launched = True
        if on_launch is not None:
            on_launch(self)
        if self.dp > 1:
            out = self.shard_grad
            if not self.in_place:
                out = self.staging = torch.empty_like(self.shard_grad)
            self.work = _reduce_scatter(out, self.grad, group=self.group, async_op=True)

    @torch.no_grad()
    def wait(self) -> None:
        """Wait for the reduce-scatter; this rank's shard of the buffer then holds the DP mean
        (the rest of the buffer, this rank's own sums, is stale until :meth:`zero_grad`)."""
        if self.work is not None:
            self.work.wait()
            self.work = None
            if self.staging is not None:
                self.shard_grad.copy_(self.staging)
                self.staging = None
            self.shard_grad.div_(self.dp)

    def all_gather(self) -> dist.Work | None:
        """Start gathering every rank's updated weight shard into the flat weights (in place)."""
        if self.dp == 1:
            return None
        return _all_gather(self.weight, self.weight_shard(), group=self.group, async_op=True)

    def zero_grad(self) -> None:
        self.grad.zero_()
