"""Sequence-parallel column linears that keep only this rank's sequence shard for backward.

Under sequence parallelism (SP) the column-parallel linears that share an input -- attention's
wq/wk/wv, SwiGLU's w1/w3 -- need the whole sequence: forward all-gathers this rank's shard
[b, s/t, h] once per group and multiplies. Their weight gradients need that gathered input again
in backward; keeping it would cost ``e T h`` bytes per group on every rank, where the shard costs
``e T h / t``. :func:`gathered_linears` keeps the shard and re-gathers it in backward, hidden
behind the grad-input gemms as in Megatron-LM:

1. launch the all-gather of the saved shard (async);
2. grad_input = sum_i go_i W_i (the gemms that need no input);
3. launch the reduce-scatter of grad_input over the sequence (async);
4. wait for the gather; grad W_i = go_i^T x for each linear;
5. wait for the reduce-scatter: this rank's shard of grad_input.

FP8 (``trainer.fp8``, :mod:`megallama.parallel.fp8_matmul`): tensorwise casts a linear's input
with the scale of the whole input and keeps that fp8 copy for its grad-weight gemm -- the same
bytes for every linear of a group (one tensor, one recipe), identical on every rank. So the group
casts before it gathers (``fp8_matmul.sharded_input_forward``): the shard's amax is MAX-reduced
over the TP group (the whole input's amax; one all-reduce, which also carries the amaxes of
weights not yet cast this step), the shard is cast with that scale and the forward all-gather
moves the fp8 bytes, 1 byte per element where bf16 moved 2 -- bit-identical to casting the
gathered input, since the cast is element-wise with one scale. The group keeps its fp8 shard and
re-gathers those bytes, so backward multiplies by exactly the forward's fp8 input. Recipes that
keep the high-precision input (rowwise) gather and keep the bf16 shard as above; their
grad-weight cast reads the whole input, and runs linear by linear (as autograd orders separate
linears), so there the gather hides behind the first grad-input gemm only and the reduce-scatter
behind the last grad-weight gemm.

Inside ``torch.compile`` (``parallel.compile_blocks``) the group takes the plain path
(``TensorParallel.enter``'s traceable all-gather, then each linear), and Inductor's partitioner
decides what to keep. Without SP, or at tp = 1, the plain path too (nothing to re-gather).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megallama.parallel import mappings
from megallama.parallel.layers import ColumnParallelLinear, TensorParallel
from megallama.parallel.mappings import SEQ_DIM, Group, group_size

# the tensor forms (one buffer, no per-rank list); the *_single names from torch 2.13 on
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_from = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# FP8 recipes that cast the input once, tensorwise (fp8_matmul.casts_input_once): cast the shard
# with the whole input's scale and all-gather the fp8 bytes in forward. Tests set it False to run
# the path before (all-gather the bf16 shard, cast the gathered input), which is bit-identical.
fp8_gather = True

# Tests set this to record backward's order: gather_start, grad_input, reduce_scatter_start,
# gather_wait, grad_weight, reduce_scatter_wait (tests/distributed/test_sequence_linears.py).
on_event: Callable[[str], None] | None = None


def _event(name: str) -> None:
    if on_event is not None:
        on_event(name)


def keeps_shard(tp: TensorParallel) -> bool:
    """Whether column linears keep their sequence shard (SP at tp > 1, outside torch.compile)."""
    return tp.sequence_parallel and tp.size > 1 and not torch.compiler.is_compiling()


def gathered_linears(x: torch.Tensor, linears: Sequence[ColumnParallelLinear],
                     tp: TensorParallel) -> list[torch.Tensor]:
    """``[linear(gather(x)) for linear in linears]`` for column-parallel linears that share the
    input ``x`` (this rank's sequence shard under SP, else the full input): one all-gather, and
    under SP only the shard is kept for backward (module docstring)."""
    matmuls = {id(lin.fp8_matmul) for lin in linears}
    if not keeps_shard(tp) or len(matmuls) > 1:
        full = tp.enter(x)
        return [lin(full) for lin in linears]
    weights = [lin.matmul_weight() for lin in linears]
    return list(_GatheredLinears.apply(x, tp.group, linears[0].fp8_matmul, *weights))


class _Gather:
    """An async all-gather of a [b, s/t, ...] shard along the sequence: ``wait()`` -> [b, s, ...]."""

    def __init__(self, shard: torch.Tensor, group: Group) -> None:
        self.n, self.shape, self.dtype = group_size(group), shard.shape, shard.dtype
        shard = _bytes(shard.contiguous())
        self.buffer = shard.new_empty((self.n * shard.shape[0], *shard.shape[1:]))
        self.work = _all_gather_into(self.buffer, shard, group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        b, part, rest = self.shape[0], self.shape[1], self.shape[2:]
        full = self.buffer.view(self.n, b, part, *rest).movedim(0, 1)  # a copy only when b > 1
        return full.reshape(b, self.n * part, *rest).view(self.dtype)


class _ReduceScatter:
    """An async reduce-scatter of [b, s, ...] along the sequence: ``wait()`` -> [b, s/t, ...]."""

    def __init__(self, full: torch.Tensor, group: Group) -> None:
        n, (b, s), rest = group_size(group), full.shape[:2], full.shape[2:]
        stacked = full.view(b, n, s // n, *rest).movedim(1, 0).contiguous()  # rank-major chunks
        self.out = full.new_empty((b, s // n, *rest))
        self.work = _reduce_scatter_from(self.out, stacked.view(n * b, s // n, *rest),
                                         group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 data as bytes (collectives move uint8; the bits are unchanged)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _rows(x2: torch.Tensor, shape: torch.Size, group: Group) -> torch.Tensor:
    """This rank's sequence rows of a gathered [b * s, K] tensor, as [b, s/t, K]."""
    return x2.view(*shape[:2], -1).chunk(group_size(group), SEQ_DIM)[mappings.group_rank(group)] \
        .contiguous()


class _Fp8Ctx:
    """What the FP8 matmul's forward and backward halves read and write of an autograd ctx, so
    one autograd function can run several of them (:class:`_GatheredLinears`); its saved
    tensors are taken over (sharded) after the forward."""

    saved_tensors: tuple = ()
    needs_input_grad: tuple[bool, bool] = (True, True)

    def save_for_backward(self, *tensors: torch.Tensor | None) -> None:
        self.saved_tensors = tensors


def _fp8_kernels():  # -> megallama.parallel.fp8_matmul (torchao: loaded only under FP8)
    from megallama.parallel.fp8 import load_torchao  # fp8 imports layers, as this module does
    return load_torchao()


class _GatheredLinears(torch.autograd.Function):
    """Forward: all-gather x (FP8 tensorwise: its fp8 cast), one matmul per weight; saves x's
    shard (or its fp8 cast) and re-gathers it in backward, overlapped with the grad-input gemms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, fp8, *weights: torch.Tensor):  # noqa: ANN001
        ctx.group, ctx.fp8, ctx.n = group, fp8, len(weights)
        if fp8 is None:
            full = mappings.all_gather_tensor(x, SEQ_DIM, group)
            ctx.save_for_backward(x, *weights)
            return tuple(F.linear(full, w) for w in weights)
        kernels, ctx.fp8_ctxs = _fp8_kernels(), [_Fp8Ctx() for _ in weights]
        if fp8_gather and kernels.casts_input_once(fp8.config):  # tensorwise: gather fp8 bytes
            outs, kept, _ = kernels.sharded_input_forward(ctx.fp8_ctxs, x, list(weights), fp8,
                                                          lambda shard: _Gather(shard, group))
        else:
            full = mappings.all_gather_tensor(x, SEQ_DIM, group)
            outs = [kernels._Float8TPMatmul.forward(c, full, w, fp8)
                    for c, w in zip(ctx.fp8_ctxs, weights, strict=True)]
            first = ctx.fp8_ctxs[0]
            # tensorwise: every linear's fp8 copy is the same bytes; keep this rank's rows of one
            kept = _rows(first.saved_tensors[0], full.shape, group) if first.keep_fp8 else x
        scales = [t for c in ctx.fp8_ctxs for t in (c.saved_tensors[1], c.saved_tensors[3])]
        for c in ctx.fp8_ctxs:
            c.saved_tensors = ()  # drop the full-length copies: only `kept` stays
        ctx.save_for_backward(kept, *weights, *scales)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        kept, *rest = ctx.saved_tensors
        weights, scales = rest[:ctx.n], rest[ctx.n:]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3:]
        half = _Halves(ctx, grads, weights, scales)
        gather = _Gather(kept, ctx.group) if any(need_w) else None
        _event("gather_start")
        order = list(reversed(range(ctx.n)))  # as autograd runs separate linears: latest first
        grad_w: list[torch.Tensor | None] = [None] * ctx.n
        if half.interleaved:  # the grad-weight cast reads x: linear by linear, as autograd does
            grad_x, full = None, None
            for i in order:
                grad_x = _add(grad_x, half.grad_input(i, need_x, need_w[i]))
                _event("grad_input")
                if need_w[i]:
                    full = full if full is not None else _wait(gather)
                    grad_w[i] = half.grad_weight(i, full)
                    _event("grad_weight")
            scatter = _ReduceScatter(grad_x, ctx.group) if need_x else None
            _event("reduce_scatter_start")
        else:
            grad_x = None
            for i in order:
                grad_x = _add(grad_x, half.grad_input(i, need_x, need_w[i]))
            _event("grad_input")
            scatter = _ReduceScatter(grad_x, ctx.group) if need_x else None
            _event("reduce_scatter_start")
            if gather is not None:
                full = _wait(gather)
                for i in order:
                    if need_w[i]:
                        grad_w[i] = half.grad_weight(i, full)
                _event("grad_weight")
        grad_in = scatter.wait() if scatter is not None else None
        _event("reduce_scatter_wait")
        return (grad_in, None, None, *grad_w)


def _wait(gather: _Gather) -> torch.Tensor:
    full = gather.wait()
    _event("gather_wait")
    return full


def _add(total: torch.Tensor | None, part: torch.Tensor | None) -> torch.Tensor | None:
    return part if total is None else total if part is None else total + part


class _Halves:
    """The two halves of one linear's backward: grad input (no saved input needed) and grad
    weight (on the re-gathered input), in bf16/fp32 or through the FP8 matmul."""

    def __init__(self, ctx, grads, weights, scales) -> None:  # noqa: ANN001
        self.ctx, self.grads, self.weights, self.scales = ctx, grads, weights, scales
        self.kernel = _fp8_kernels()._Float8TPMatmul if ctx.fp8 is not None else None
        self.interleaved = self.kernel is not None and not ctx.fp8_ctxs[0].keep_fp8
        self.go8: dict[int, torch.Tensor] = {}

    def grad_input(self, i: int, need_x: bool, need_w: bool) -> torch.Tensor | None:
        go, w = self.grads[i], self.weights[i]
        if self.kernel is None:
            return go.matmul(w) if need_x else None
        c = self.ctx.fp8_ctxs[i]
        c.needs_input_grad = (need_x, need_w)
        if not (need_x or need_w):
            return None
        grad_x, self.go8[i] = self.kernel.grad_input(c, go, w, self.scales[2 * i + 1])
        return grad_x

    def grad_weight(self, i: int, full: torch.Tensor) -> torch.Tensor:
        x2 = full.reshape(-1, full.shape[-1])
        if self.kernel is None:
            go = self.grads[i]
            return go.reshape(-1, go.shape[-1]).t().mm(x2)
        c = self.ctx.fp8_ctxs[i]
        return self.kernel.grad_weight(c, self.go8.pop(i), x2, self.scales[2 * i])
