"""Every collective the model issues, as named autograd functions (and, at the end, the two
plain reductions the fused optimizer issues on gradients).

This module holds the collectives issued inside forward or backward, with one exception:
:mod:`megallama.parallel.sequence_linears` (SP column linears), whose backward launches an async
all-gather and reduce-scatter to overlap them with its gemms. Activations
are laid out [batch, seq, hidden]: "sequence" collectives act on dim 1, tensor-parallel
scatter/gather on the last dim. Each function is the identity when the group is None or has one
rank, so the same model code runs unchanged at tp=1.

| function                     | forward                  | backward                 |
|------------------------------|--------------------------|--------------------------|
| copy_to_tp                   | identity                 | all-reduce               |
| reduce_from_tp               | all-reduce               | identity                 |
| scatter_to_tp                | split last dim           | all-gather last dim      |
| gather_from_tp               | all-gather last dim      | split last dim           |
| scatter_to_sequence          | split seq dim            | all-gather seq dim       |
| gather_from_sequence         | all-gather seq dim       | reduce-scatter seq dim   |
| reduce_scatter_to_sequence   | reduce-scatter seq dim   | all-gather seq dim       |
| all_reduce_max (no grad)     | all-reduce MAX           | --                       |

Inside a region ``torch.compile`` traces (``parallel.compile_blocks``), the collectives are
torch's functional collectives (``torch.distributed._functional_collectives``): traceable, so a
compiled block is one graph at tp > 1 too, forward and backward (Inductor can then overlap them
with compute), where the in-place ``dist.*`` list collectives would break the graph at every
one. Eager code keeps the ``dist.*`` calls. Both compute the same sums and concatenations
(tests/distributed/test_compiled_paths.py compares a fullgraph-compiled block with eager).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

Group = dist.ProcessGroup | None

SEQ_DIM = 1


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ---- raw collectives (no autograd) ------------------------------------------------------------
def _traced() -> bool:
    """Whether torch.compile is tracing this call: use the functional (traceable) collectives."""
    return torch.compiler.is_compiling()


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    if _traced():
        return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.size(dim) % n:
        raise ValueError(f"dimension {dim} of size {x.size(dim)} is not divisible by {n} ranks")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if _traced():
        return funcol.wait_tensor(funcol.all_gather_tensor(x.contiguous(), dim % x.dim(), group))
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.size(dim) % n:
        raise ValueError(f"dimension {dim} of size {x.size(dim)} is not divisible by {n} ranks")
    if _traced():
        return funcol.wait_tensor(funcol.reduce_scatter_tensor(x.contiguous(), "sum",
                                                               dim % x.dim(), group))
    chunks = [c.contiguous() for c in x.chunk(n, dim=dim)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


# ---- autograd functions -----------------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, SEQ_DIM, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        # The gathered activation feeds tensor-parallel matmuls, so each rank holds a partial
        # gradient of the full sequence: sum them and keep this rank's chunk.
        return _reduce_scatter(grad, SEQ_DIM, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, SEQ_DIM, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a tensor-parallel region with a replicated input: gradients are summed over ranks.

    Also used on parameters that are replicated but see only part of the data on each rank
    (norm weights under sequence parallelism, KV weights replicated when tp > n_kv_heads)."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Leave a tensor-parallel region: sum the partial results of all ranks."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Keep this rank's slice of the last dimension."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate every rank's slice of the last dimension."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Keep this rank's chunk of the sequence (entering sequence parallelism)."""
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-gather the sequence before a column-parallel matmul (sequence parallelism)."""
    return x if group_size(group) == 1 else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum partial results and keep this rank's sequence chunk (after a row-parallel matmul)."""
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, group)


@torch.no_grad()
def all_reduce_max(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Element-wise maximum over ranks; not differentiable (used for softmax stabilisation)."""
    if group_size(group) == 1:
        return x
    if _traced():
        return funcol.wait_tensor(funcol.all_reduce(x, "max", group))
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


@torch.no_grad()
def all_gather_tensor(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenate every rank's tensor along ``dim``; not differentiable (checkpoints, tests)."""
    return _all_gather(x, dim, group)


# ---- optimizer-side reductions (no autograd; called from MasterWeightAdamW.step) -----------------
@torch.no_grad()
def all_reduce_sum_(x: torch.Tensor, group: Group) -> torch.Tensor:
    """In-place sum over ranks (partial squared gradient norms over TP and PP)."""
    if group_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


@torch.no_grad()
def all_reduce_mean_(tensors: list[torch.Tensor], group: Group,
                     bucket_bytes: int = 256 << 20) -> None:
    """In-place mean over data-parallel ranks of gradients, flattened into buckets of one dtype so
    that a few large collectives replace one per tensor."""
    n = group_size(group)
    if n == 1:
        return
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not buckets or t.dtype != buckets[-1][0].dtype or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += nbytes
    for bucket in buckets:
        flat = torch._utils._flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        flat.div_(n)
        for dst, src in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket),
                            strict=True):
            dst.copy_(src)
