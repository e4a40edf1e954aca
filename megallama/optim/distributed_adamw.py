"""``optim.impl=distributed``: megallama's fused master-weight AdamW with its state sharded over
data-parallel ranks (Megatron-LM's distributed optimizer), the gradient reduce-scatter overlapped
with the backward.

Memory: every rank keeps the (bf16 or fp32) weights and a flat gradient buffer for all of its
parameters, but the fp32 master (for bf16 weights: a 16-bit remainder beside the weight, see
:mod:`megallama.optim.adamw_kernel`) and both Adam moments only for its 1/dp shard of every
gradient bucket (:mod:`megallama.optim.grad_buckets`): 2 + 4 + (2 + 8 + 4) / dp bytes per bf16
parameter (the last 4: the shard's reduced fp32 gradient, when dp > 1) instead of the fused
optimizer's 2 + 4 + 4 + 8 at any dp.

One step:
1. backward: each gradient is added into its bucket's flat buffer by a post-accumulate-grad hook
   and freed; when a bucket has all of its gradients of the step (parameters x ``gas``
   micro-batches, so only in the last micro-batch's backward) its asynchronous reduce-scatter over
   DP starts, while autograd goes on with earlier layers;
2. :meth:`step`: wait for the reduce-scatters (mean over DP), the global gradient norm from the
   shards (sharded parameters on every TP rank, replicated ones on TP rank 0, summed over DP, TP
   and PP: the same number as the fused optimizer's), clip, one fused AdamW update per run of the
   shard (the Triton kernel or the torch reference, :mod:`megallama.optim.kernels`), and an
   all-gather of each bucket's updated weights, started as soon as that bucket is updated.
A non-finite norm changes nothing on any rank and sets ``overflow`` (DeepSpeed counts the skip).

Every parameter must get one gradient per micro-batch in every step: a bucket's reduce-scatter is
started by the hook that completes it, so a bucket that some rank never completes would be reduced
in another order on that rank than on the others, and the collectives would pair wrongly (wrong
sums, or a hang). :meth:`step` therefore fails, naming the parameters short of gradients, instead
of reducing such a bucket itself (a step with no gradient at all does nothing, as torch's AdamW).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from megallama.optim.adamw_kernel import join_fp32, split_fp32
from megallama.optim.grad_buckets import Bucket, gather_flat, plan_buckets
from megallama.optim.kernels import use_triton
from megallama.optim.master_step import (
    adam_scalars,
    clip_coefficient,
    copy_to_host,
    global_norm,
    local_sum_of_squares,
    needs_fp32_grad_buffer,
    update,
)
from megallama.parallel.mappings import all_reduce_sum_
from megallama.parallel.topology import Topology

Run = tuple[int, int, int]  # (shard start, length, parameter group) of a piece of a shard


class DistributedAdamW(torch.optim.Optimizer):
    """AdamW over fp32 or bf16 parameters, fp32 master and moments sharded over DP."""

    def __init__(self, groups: Iterable[dict[str, Any]], *, lr: float, betas: tuple[float, float],
                 eps: float, max_grad_norm: float, topo: Topology, gas: int, bucket_bytes: int,
                 registration_order: Iterable[nn.Parameter | tuple[str, nn.Parameter]] | None = None,
                 use_kernel: bool | None = None) -> None:
        """``registration_order``: the module's ``parameters()`` or ``named_parameters()`` (the
        names then appear in errors). ``use_kernel``: None follows :func:`use_triton`."""
        super().__init__(list(groups), {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.max_grad_norm, self.topo, self.gas = max_grad_norm, topo, gas
        self.step_count = torch.zeros(())  # shared as every parameter's state["step"]
        self.overflow = False
        self._global_grad_norm: float | None = None
        self.on_launch: Callable[[Bucket], None] | None = None  # tests record launches here
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
        for p in params:
            self.state[p]["step"] = self.step_count
            p.register_post_accumulate_grad_hook(self._on_grad)
        if use_kernel is None:
            use_kernel = use_triton(params[0].device)
        self.use_kernel = use_kernel
        self._gathered: tuple[tuple[int, str], torch.Tensor] | None = None
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
        return [Bucket([order[i] for i in idx], grad_dtype, dp, self.topo.dp_rank,
                       self.topo.dp_group)
                for idx in plan_buckets([p.numel() for p in order], elems)]

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
                if getattr(p, "model_parallel", False) or tp_rank == 0:
                    c.append(bucket.shard_grad[seg.shard_start:seg.shard_start + seg.length])
            runs.append(r)
            counted.append(c)
        return runs, counted

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
        if all(b.pending == len(b.params) * self.gas for b in self.buckets):
            return  # no gradient at all this step (as torch's AdamW: nothing to do)
        self._check_complete()
        for bucket in self.buckets:
            bucket.wait()
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
        """Update every run of this rank's shards, then all-gather each bucket's weights (started
        as soon as the bucket is done, so it overlaps the next bucket's update)."""
        apply = self.use_kernel or bool(ok)
        scalars = [adam_scalars(g, step) for g in self.param_groups]
        works = []
        for bucket, state, runs in zip(self.buckets, self.shards, self.runs, strict=True):
            weight, grad, lo = bucket.weight_shard(), bucket.shard_grad, state.get("master_lo")
            for start, length, g in runs:
                cut = slice(start, start + length)
                update(weight[cut], grad[cut], None if lo is None else lo[cut],
                       state["exp_avg"][cut], state["exp_avg_sq"][cut], coef, ok, scalars[g],
                       use_kernel=self.use_kernel, apply=apply)
            if apply:
                works.append(bucket.all_gather())
            bucket.zero_grad()
        for work in works:
            if work is not None:
                work.wait()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for bucket in self.buckets:
            bucket.zero_grad()
        self._begin_step()

    # ---- memory ------------------------------------------------------------------------------
    def resident_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: ``weights`` (flat, all parameters), ``grads`` (the flat
        buffers, plus the reduced shard when dp > 1) and ``state`` (master remainder and Adam
        moments of the shard only): what the planner models for ``optim.impl=distributed``."""
        def size(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()
        return {"weights": sum(size(b.weight) for b in self.buckets),
                "grads": sum(size(b.grad) + (size(b.shard_grad) if b.dp > 1 else 0)
                             for b in self.buckets),
                "state": sum(size(t) for s in self.shards for t in s.values())}

    # ---- checkpoint access (OptimizerStateAccess) --------------------------------------------
    def _shard_value(self, b: int, key: str) -> torch.Tensor:
        """This rank's shard of ``key`` of bucket ``b``, as fp32."""
        state = self.shards[b]
        if key != "fp32":
            return state[key]
        weight = self.buckets[b].weight_shard()
        lo = state.get("master_lo")
        return weight.float() if lo is None else join_fp32(weight, lo)

    def owned_pieces(self, p: nn.Parameter, key: str) -> list[tuple[int, torch.Tensor]]:
        """The state of ``p`` this rank owns, with no communication: (first element in ``p``
        flattened, fp32 values) per piece of ``p`` in this rank's shard (what a checkpoint
        writes, :mod:`megallama.checkpoint.optim_pieces`)."""
        b, i = self.where[p]
        bucket, state = self.buckets[b], self.shards[b]
        out = []
        for seg in bucket.segments:
            if seg.index != i:
                continue
            cut = slice(seg.shard_start, seg.shard_start + seg.length)
            if key != "fp32":
                value = state[key][cut]
            elif "master_lo" in state:
                value = join_fp32(bucket.weight_shard()[cut], state["master_lo"][cut])
            else:
                value = bucket.weight_shard()[cut].float()
            out.append((seg.start, value))
        return out

    def full_state(self, p: nn.Parameter, key: str) -> torch.Tensor:
        """``fp32`` (master weight), ``exp_avg`` or ``exp_avg_sq`` of ``p`` as a full fp32 tensor.
        Collective over DP (every DP rank asks for the same parameters in the same order): the
        bucket's shards are all-gathered once and kept until another bucket or key is asked."""
        b, i = self.where[p]
        bucket = self.buckets[b]
        if self._gathered is None or self._gathered[0] != (b, key):
            shard = self._shard_value(b, key).contiguous()
            full = torch.empty(bucket.shard_size * bucket.dp, dtype=torch.float32,
                               device=shard.device)
            if bucket.dp > 1:
                gather_flat(full, shard, bucket.group)
            else:
                full.copy_(shard)
            self._gathered = ((b, key), full)
        o = bucket.offsets[i]
        return self._gathered[1][o:o + p.numel()].view(p.shape)

    @torch.no_grad()
    def set_full_state(self, p: nn.Parameter, key: str, value: torch.Tensor) -> None:
        """Set ``key`` of ``p`` from its full value: each rank keeps the part its shard holds (no
        communication); ``fp32`` also sets the (replicated) weight itself."""
        b, i = self.where[p]
        bucket, state = self.buckets[b], self.shards[b]
        flat = value.to(p.device, torch.float32).reshape(-1)
        lo_full = None
        if key == "fp32":
            if "master_lo" in state:
                hi, lo_full = split_fp32(flat)
                p.data.copy_(hi.view(p.shape))
            else:
                p.data.copy_(flat.view(p.shape))
        for seg in bucket.segments:
            if seg.index != i:
                continue
            src = slice(seg.start, seg.start + seg.length)
            dst = slice(seg.shard_start, seg.shard_start + seg.length)
            if key != "fp32":
                state[key][dst].copy_(flat[src])
            elif lo_full is not None:
                state["master_lo"][dst].copy_(lo_full[src])
        self._gathered = None


def _check_dtypes(params: list[nn.Parameter]) -> None:
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or dtypes.pop() not in (torch.float32, torch.bfloat16):
        raise TypeError(f"DistributedAdamW takes parameters of one dtype, fp32 or bf16; got "
                        f"{sorted(str(p.dtype) for p in params)[:3]}")
