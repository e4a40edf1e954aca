"""``optim.impl=distributed``: megallama's fused master-weight AdamW with its state sharded over
data-parallel ranks (Megatron-LM's distributed optimizer), the gradient reduce-scatter overlapped
with the backward.

Memory: every rank keeps the (bf16 or fp32) weights and a flat gradient buffer for all of its
parameters, but the fp32 master (for bf16 weights: a 16-bit remainder beside the weight, see
:mod:`megallama.optim.adamw_kernel`) and both Adam moments only for its 1/dp shard of every
gradient bucket (:mod:`megallama.optim.grad_buckets`): 2 + 4 + (2 + 8) / dp bytes per bf16
parameter (the reduce-scatter writes the reduced gradient into the buffer's own shard) instead of
the fused optimizer's 2 + 4 + 4 + 8 at any dp.

One step:
1. backward: each gradient is added into its bucket's flat buffer by a post-accumulate-grad hook
   and freed; when a bucket has all of its gradients of the step (parameters x ``gas``
   micro-batches, so only in the last micro-batch's backward) its asynchronous reduce-scatter over
   DP starts, while autograd goes on with earlier layers;
2. :meth:`step`: wait for the reduce-scatters (mean over DP; a tied embedding, in a bucket of its
   own on its first and last pipeline stage, then summed over the two; the shard pieces of SP
   norm weights and KV replicas summed over their TP group, one flat all-reduce per group), the
   global gradient norm from the
   shards (sharded parameters on every TP rank, replicated ones on TP rank 0, summed over DP, TP
   and PP: the same number as the fused optimizer's), clip, one fused AdamW update per run of the
   shard (the Triton kernel or the torch reference, :mod:`megallama.optim.kernels`), and an
   all-gather of each bucket's updated weights, started as soon as that bucket is updated
   (buckets updated in forward order, the embedding's first, so the gathers finish in that order);
3. the next forward: with ``modules`` given (the layers of the stage), each bucket's gather is
   waited for in a forward pre-hook of the first of those layers that holds one of its
   parameters, so the gathers of later layers run behind the forward of the first ones
   (Megatron's ``overlap_param_gather``). Without ``modules``, or for a bucket holding a parameter
   no module covers, :meth:`step` waits itself. Whoever reads or writes weights outside a forward
   (checkpoints, evaluation, the state accessors below, which do it themselves) calls
   :meth:`wait_param_gathers` first.
A non-finite norm changes nothing on any rank and sets ``overflow`` (DeepSpeed counts the skip).

Every parameter must get one gradient per micro-batch in every step: a bucket's reduce-scatter is
started by the hook that completes it, so a bucket that some rank never completes would be reduced
in another order on that rank than on the others, and the collectives would pair wrongly (wrong
sums, or a hang). :meth:`step` therefore fails, naming the parameters short of gradients, instead
of reducing such a bucket itself (a step with no gradient at all does nothing, as torch's AdamW).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from megallama.optim.grad_buckets import Bucket, plan_buckets
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
from megallama.optim.shard_state import ShardStateAccess
from megallama.parallel import partial_grads
from megallama.parallel.mappings import all_reduce_sum_
from megallama.parallel.topology import Topology

Run = tuple[int, int, int]  # (shard start, length, parameter group) of a piece of a shard


class DistributedAdamW(ShardStateAccess, torch.optim.Optimizer):
    """AdamW over fp32 or bf16 parameters, fp32 master and moments sharded over DP."""

    def __init__(self, groups: Iterable[dict[str, Any]], *, lr: float, betas: tuple[float, float],
                 eps: float, max_grad_norm: float, topo: Topology, gas: int, bucket_bytes: int,
                 registration_order: Iterable[nn.Parameter | tuple[str, nn.Parameter]] | None = None,
                 use_kernel: bool | None = None, modules: Sequence[nn.Module] = ()) -> None:
        """``registration_order``: the module's ``parameters()`` or ``named_parameters()`` (the
        names then appear in errors). ``use_kernel``: None follows :func:`use_triton`.
        ``modules``: the layers whose forward first uses the parameters (the parameter all-gather
        is then waited for in their forward pre-hooks, see the module docstring)."""
        super().__init__(list(groups), {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.max_grad_norm, self.topo, self.gas = max_grad_norm, topo, gas
        self.step_count = torch.zeros(())  # shared as every parameter's state["step"]
        self.overflow = False
        self._global_grad_norm: float | None = None
        self.on_launch: Callable[[Bucket], None] | None = None  # tests record launches here
        self.on_gather: Callable[[str, int], None] | None = None  # ("start"/"wait", bucket)
        self._gathers: dict[int, Any] = {}  # bucket -> its all-gather still in flight
        params = self._params()
        _check_dtypes(params)
        self.names: dict[nn.Parameter, str] = {}
        if registration_order is not None:  # the module's order (groups sort by weight decay)
            ours = set(params)
            named = [x if isinstance(x, tuple) else (None, x) for x in registration_order]
            self.names = {p: n for n, p in named if n is not None and p in ours}
            params = [p for _, p in named if p in ours]
            if len(params) != len(ours):
                raise ValueError("registration_order must list every optimized parameter once")
        self.buckets = self._make_buckets(params, bucket_bytes)
        self.where = {p: (b, i) for b, bucket in enumerate(self.buckets)
                      for i, p in enumerate(bucket.params)}
        self.shards = [self._shard_state(bucket) for bucket in self.buckets]
        self.runs, self.counted = self._runs()
        self.partial = self._partial_pieces(params)
        for p in params:
            self.state[p]["step"] = self.step_count
            p.register_post_accumulate_grad_hook(self._on_grad)
        if use_kernel is None:
            use_kernel = use_triton(params[0].device)
        self.use_kernel = use_kernel
        self._gathered: tuple[tuple[int, str], torch.Tensor] | None = None
        self.deferred = self._hook_modules(modules)
        self._begin_step()

    def _params(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    def _make_buckets(self, params: list[nn.Parameter], bucket_bytes: int) -> list[Bucket]:
        """Buckets over ``params`` (registration order) reversed: the order autograd produces
        the gradients, so the first bucket completes first."""
        order = list(reversed(params))
        dtype, dp = params[0].dtype, self.topo.grid.dp
        summed = dtype == torch.float32 or needs_fp32_grad_buffer(dtype, self.gas, dp)
        grad_dtype = torch.float32 if summed else dtype
        elems = max(1, bucket_bytes // grad_dtype.itemsize)  # bucket_bytes: of gradients
        # a tied embedding's copy gets a bucket of its own on both of its pipeline stages, so
        # both shard it alike over DP and its reduced shards can be summed over the two stages
        alone = [getattr(p, "tied_group", None) is not None for p in order]
        return [Bucket([order[i] for i in idx], grad_dtype, dp, self.topo.dp_rank,
                       self.topo.dp_group)
                for idx in plan_buckets([p.numel() for p in order], elems, alone)]

    def _shard_state(self, bucket: Bucket) -> dict[str, torch.Tensor]:
        """Adam moments (and the master's remainder for bf16 weights) of this rank's shard."""
        n, device = bucket.shard_size, bucket.weight.device
        state = {"exp_avg": torch.zeros(n, device=device),
                 "exp_avg_sq": torch.zeros(n, device=device)}
        if bucket.weight.dtype != torch.float32:
            state["master_lo"] = torch.zeros(n, dtype=torch.int16, device=device)
        return state

    def _runs(self) -> tuple[list[list[Run]], list[list[torch.Tensor]]]:
        """Per bucket: the shard cut into runs of one parameter group (one update each), and the
        views of the shard's gradient that the global norm counts on this TP rank."""
        group_of = {p: g for g, group in enumerate(self.param_groups) for p in group["params"]}
        tp_rank = self.topo.tp_rank
        runs, counted = [], []
        for bucket in self.buckets:
            r: list[Run] = []
            c: list[torch.Tensor] = []
            for seg in bucket.segments:
                p = bucket.params[seg.index]
                g = group_of[p]
                if r and r[-1][2] == g and r[-1][0] + r[-1][1] == seg.shard_start:
                    r[-1] = (r[-1][0], r[-1][1] + seg.length, g)
                else:
                    r.append((seg.shard_start, seg.length, g))
                if counts_in_norm(p, tp_rank):
                    c.append(bucket.shard_grad[seg.shard_start:seg.shard_start + seg.length])
            runs.append(r)
            counted.append(c)
        return runs, counted

    def _partial_pieces(self, params: list[nn.Parameter]) -> list[tuple[torch.Tensor, Any]]:
        """The pieces of this rank's shards that hold gradients each TP rank computes in part
        (SP norm weights, KV replicas; :mod:`megallama.parallel.partial_grads`), with their
        group. Every rank of such a group has the same buckets and DP rank, hence the same
        pieces: :meth:`step` sums them over the group, on the DP-reduced shards (1/dp of the
        bytes), one flat all-reduce per group per step."""
        deferred = set(partial_grads.defer(params))
        return [(bucket.shard_grad[seg.shard_start:seg.shard_start + seg.length],
                 partial_grads.group_of(bucket.params[seg.index]))
                for bucket in self.buckets for seg in bucket.segments
                if bucket.params[seg.index] in deferred]

    def _hook_modules(self, modules: Sequence[nn.Module]) -> set[int]:
        """Register the forward pre-hooks that wait for the gathers of the buckets holding each
        module's parameters; the buckets whose every parameter some module holds (their gathers
        are left to the hooks)."""
        holders: dict[int, set[nn.Parameter]] = {}
        for module in modules:
            buckets = sorted({self.where[p][0] for p in module.parameters() if p in self.where})
            if buckets:
                module.register_forward_pre_hook(self._waiter(buckets))
            for p in module.parameters():
                if p in self.where:
                    holders.setdefault(self.where[p][0], set()).add(p)
        return {b for b, ps in holders.items() if len(ps) == len(self.buckets[b].params)}

    def _waiter(self, buckets: list[int]) -> Callable[..., None]:
        @torch.compiler.disable  # a wait on a collective: eager, also before a compiled block
        def hook(module: nn.Module, args: Any) -> None:
            if self._gathers:
                for b in buckets:
                    self._wait_gather(b)
        return hook

    def _wait_gather(self, b: int) -> None:
        work = self._gathers.pop(b, None)
        if work is not None:
            if self.on_gather is not None:
                self.on_gather("wait", b)
            work.wait()

    def wait_param_gathers(self) -> None:
        """Wait for every parameter all-gather still in flight: call before reading or writing
        weights outside a forward (a checkpoint, evaluation, the weights' checks)."""
        for b in list(self._gathers):
            self._wait_gather(b)

    def pending_gathers(self) -> list[int]:
        """The buckets whose updated weights are still being gathered."""
        return sorted(self._gathers)

    # ---- backward ----------------------------------------------------------------------------
    def _begin_step(self) -> None:
        for bucket in self.buckets:
            bucket.start(len(bucket.params) * self.gas)

    def _on_grad(self, p: nn.Parameter) -> None:
        b, i = self.where[p]
        bucket = self.buckets[b]
        if bucket.add_grad(i, p.grad):
            bucket.reduce_scatter(self.on_launch)  # overlaps the rest of the backward
        p.grad = None

    # ---- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the (DP-mean) gradients over the whole model, from the shards."""
        tensors = [t for c in self.counted for t in c]
        sq = local_sum_of_squares(tensors, self.buckets[0].weight.device, self.use_kernel)
        all_reduce_sum_(sq, self.topo.dp_group)
        all_reduce_sum_(sq, self.topo.tp_group)
        all_reduce_sum_(sq, self.topo.pp_group)
        return global_norm(sq)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        if closure is not None:
            raise ValueError("DistributedAdamW does not take a closure")
        self.wait_param_gathers()  # a step without a forward since the last one
        if all(b.pending == len(b.params) * self.gas for b in self.buckets):
            return  # no gradient at all this step (as torch's AdamW: nothing to do)
        self._check_complete()
        for bucket in self.buckets:
            bucket.wait()
            sum_tied_grad(bucket.params[0], bucket.shard_grad)  # a tied bucket holds one param
        partial_grads.sum_partial(self.partial)  # TP sums of SP norms / KV replicas, once
        norm = self.grad_norm()
        ok = torch.isfinite(norm).float()
        coef = clip_coefficient(norm, self.max_grad_norm)
        norm_host = copy_to_host(norm)
        self.step_count += 1
        self._update(coef, ok, int(self.step_count))
        self._global_grad_norm = float(norm_host())
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            self.step_count -= 1
        self._gathered = None
        self._begin_step()

    def _check_complete(self) -> None:
        """Raise, naming them, when parameters got fewer gradients than micro-batches (see the
        module docstring: their buckets' reduce-scatters were never started)."""
        short = [(self._name(bucket, i), n)  # in registration order (buckets run reversed)
                 for bucket in reversed(self.buckets) if not bucket.launched
                 for i, n in reversed(list(enumerate(bucket.received))) if n < self.gas]
        if not short:
            return
        listed = ", ".join(f"{name} ({n} of {self.gas})" for name, n in short[:6])
        more = f" and {len(short) - 6} more" if len(short) > 6 else ""
        raise RuntimeError(
            f"DistributedAdamW.step: {len(short)} parameter(s) got fewer gradients than the "
            f"{self.gas} micro-batch(es) of the step on DP rank {self.topo.dp_rank}: {listed}"
            f"{more}. optim.impl=distributed needs a gradient for every parameter in every "
            "micro-batch on every rank (freeze unused parameters with requires_grad=False, or "
            "use optim.impl=deepspeed)")

    def _name(self, bucket: Bucket, index: int) -> str:
        p = bucket.params[index]
        return self.names.get(p) or f"parameter of shape {list(p.shape)}"

    def _update(self, coef: torch.Tensor, ok: torch.Tensor, step: int) -> None:
        """Update every run of this rank's shards, bucket by bucket in forward order (buckets
        are in backward order), each bucket's all-gather started as soon as it is done (it
        overlaps the next bucket's update). The gathers of :attr:`deferred` buckets are waited
        for by the next forward's hooks, the others here."""
        apply = self.use_kernel or bool(ok)
        scalars = [adam_scalars(g, step) for g in self.param_groups]
        for b in reversed(range(len(self.buckets))):
            bucket, state = self.buckets[b], self.shards[b]
            weight, grad, lo = bucket.weight_shard(), bucket.shard_grad, state.get("master_lo")
            for start, length, g in self.runs[b]:
                cut = slice(start, start + length)
                update(weight[cut], grad[cut], None if lo is None else lo[cut],
                       state["exp_avg"][cut], state["exp_avg_sq"][cut], coef, ok, scalars[g],
                       use_kernel=self.use_kernel, apply=apply)
            bucket.zero_grad()
            work = bucket.all_gather() if apply else None
            if work is not None:
                self._gathers[b] = work
                if self.on_gather is not None:
                    self.on_gather("start", b)
        for b in list(self._gathers):
            if b not in self.deferred:
                self._wait_gather(b)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for bucket in self.buckets:
            bucket.zero_grad()
        self._begin_step()

    # ---- memory ------------------------------------------------------------------------------
    def resident_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: ``weights`` (flat, all parameters), ``grads`` (the flat
        buffers, which also hold the reduced shard) and ``state`` (master remainder and Adam
        moments of the shard only): what the planner models for ``optim.impl=distributed``."""
        def size(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()
        return {"weights": sum(size(b.weight) for b in self.buckets),
                "grads": sum(size(b.grad) for b in self.buckets),
                "state": sum(size(t) for s in self.shards for t in s.values())}


def _check_dtypes(params: list[nn.Parameter]) -> None:
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or dtypes.pop() not in (torch.float32, torch.bfloat16):
        raise TypeError(f"DistributedAdamW takes parameters of one dtype, fp32 or bf16; got "
                        f"{sorted(str(p.dtype) for p in params)[:3]}")
