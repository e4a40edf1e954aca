"""Bytes of the model states per rank -- weights, gradients, fp32 master weights, Adam moments and
optimizer-step buffers -- on each optimizer path (DeepSpeed's ZeRO stages, megallama's fused and
distributed AdamW), and the bytes each rank sends over data parallelism per step. Used by the
layout planner (:mod:`megallama.training.planner`); every formula is derived and checked against
measurements in docs/PLANNER.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from megallama.optim.fused_adamw import needs_fp32_grad_buffer

DS_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size / MEMORY_OPT_ALLREDUCE_SIZE (elements)
FUSED_BUCKET = 256 << 20  # bytes of the fused optimizer's DP all-reduce bucket (parallel.mappings)
DIST_BUCKET = 25 << 20  # optim.bucket_mb default: gradient bytes per distributed-optimizer bucket
ELEMENT = {"bf16": 2, "fp32": 4}


class States(NamedTuple):
    """Bytes of one optimizer path: ``grads_keep`` lives all step, ``grads_accum`` (the model's
    .grad) from a micro-batch's backward to the optimizer step, ``bucket`` (ZeRO's reduce bucket)
    through backward (``bucket_early``: allocated whole at its start, as on a GPU; else resident
    as it fills); ``step`` is what the optimizer step adds once activations are gone."""

    weights: int
    grads_keep: int
    grads_accum: int
    bucket: int
    bucket_early: bool
    master: int
    adam: int
    step: int


def distributed_states(p: int, dp: int, precision: str, device: str, *, gas: int = 1,
                       bucket_bytes: int = DIST_BUCKET) -> States:
    """``optim.impl=distributed`` (docs/PLANNER.md): the weights and a flat gradient buffer
    (fp32 where gradients are summed) for all ``p`` parameters, which also holds the reduced
    gradient of this rank's shard (the reduce-scatter is in place), plus the master's remainder
    (bf16) and the Adam moments of this rank's 1/dp shard only: 6 + 10/dp bytes per bf16
    parameter. On CPU (Gloo, which cannot reduce in place) each bucket's reduce-scatter writes
    into a staging shard from the last backward to the step: ``4 P / dp`` in all, as ``bucket``;
    and the update (torch reference) makes ~16 bytes of temporaries per element of one bucket's
    shard."""
    e, shard = ELEMENT[precision], -(-p // dp)
    summed = precision == "fp32" or needs_fp32_grad_buffer(torch.bfloat16, gas, dp)
    grads = (4 if summed else e) * p
    staging = 4 * shard if device == "cpu" and dp > 1 else 0
    master = 2 * shard if precision == "bf16" else 0
    run = min(shard, -(-bucket_bytes // (4 * dp)))  # one bucket's shard (bytes of fp32 grads)
    return States(e * p, grads, 0, staging, False, master, 8 * shard,
                  16 * run if device == "cpu" else 0)


def optimizer_states(p: int, dp: int, precision: str, zero: int, device: str, *,
                     largest_layer: int = 0, gas: int = 1, impl: str = "fused") -> States:
    """What DeepSpeed keeps for ``p`` local parameters on the optimizer path it takes for this
    precision and ZeRO stage (docs/PLANNER.md, "Model states"), with ``dp``-way sharding;
    ``zero=0`` is megallama's own optimizer: ``impl`` "fused" (nothing sharded) or
    "distributed" (:func:`distributed_states`)."""
    if zero == 0 and impl == "distributed":
        return distributed_states(p, dp, precision, device, gas=gas)
    shard, cpu = -(-p // dp), device == "cpu"
    touched = min(DS_BUCKET, p)  # CPU: only the pages a bucket copy touches become resident
    adam_tmp = 8 * shard if cpu else 0  # CPU AdamW's sqrt(v) and sqrt(v)/c; fused CUDA has none
    master, adam = 4 * shard, 8 * shard
    if zero == 0:  # megallama's fused optimizer: nothing sharded, updated in place
        bucket = min(FUSED_BUCKET, 4 * p) if dp > 1 else 0  # its DP all-reduce flattens a bucket
        tmp = 8 * largest_layer if cpu else 0  # the torch reference path: fp32 g and denom
        if precision == "bf16":  # master = the bf16 weight + an int16 remainder: 2 more bytes
            summed = needs_fp32_grad_buffer(torch.bfloat16, gas, dp)  # fp32 buffer takes .grad
            return States(2 * p, 4 * p if summed else 0, 0 if summed else 2 * p, 0, False,
                          2 * p, 8 * p, bucket + tmp)
        return States(4 * p, 0, 4 * p, 0, False, 0, 8 * p, bucket + tmp)
    if precision == "bf16" and zero == 1:
        # BF16_Optimizer: full fp32 accumulator; immediate_grad_update frees each bf16 .grad once
        # added; with dp > 1 the all-reduce copies the fp32 grads through a bucket
        step = (4 * touched if dp > 1 else 0) + adam_tmp
        return States(2 * p, 4 * p, 0, 0, False, master, adam, step)
    e = ELEMENT[precision]
    bucket = e * (touched if cpu else DS_BUCKET)  # released before the optimizer step
    if zero == 1:  # fp32 ZeRO-1: .grad, then bucket -> staging -> flat copy of the partition
        step = 4 * shard + max(4 * p, 4 * shard + adam_tmp)
        return States(4 * p, 0, 4 * p, bucket, not cpu, master, adam, step)
    # ZeRO-3 (coarse): the shard twice (measured at dp=1 on CPU) and one layer gathered
    weights = e * p if zero == 2 else 2 * e * shard + e * largest_layer
    return States(weights, 4 * shard, 0, bucket, not cpu, master, adam, 4 * shard + adam_tmp)


def dp_comm_bytes(p: int, dp: int, precision: str, zero: int, impl: str = "fused") -> int:
    """Bytes one rank sends per optimizer step over DP for ``p`` local parameters, ring
    collectives (a reduce-scatter or all-gather of N bytes sends (dp-1)/dp N, an all-reduce twice
    that): ``impl=distributed`` reduce-scatters the fp32 gradients and all-gathers the updated
    weights; ``impl=fused`` all-reduces fp32 gradients (fp32 params: the .grad); DeepSpeed's bf16
    ZeRO-1 all-reduces fp32 gradients and all-gathers bf16 weights, its fp32 ZeRO-1/2
    reduce-scatters and all-gathers, ZeRO-3 also gathers the weights in forward and backward."""
    e, part = ELEMENT[precision], p * (dp - 1) // dp
    if zero == 0:
        return part * (4 + e) if impl == "distributed" else 2 * part * 4
    if precision == "bf16" and zero == 1:
        return 2 * part * 4 + part * e
    return part * (4 + e) if zero < 3 else part * (4 + 2 * e)


def tied_grad_bytes(table: int, dp: int, precision: str, zero: int, impl: str = "fused", *,
                    gas: int = 1) -> int:
    """Bytes the first or the last pipeline stage of a tied model sends per step to sum the
    embedding table's gradient (``table`` local elements) with the other's copy: an all-reduce
    over 2 ranks sends the tensor once. ``impl=distributed`` sums the DP-reduced shard (1/dp;
    fp32 where gradients are summed), ``impl=fused`` its whole gradient buffer (fp32 where
    summed), DeepSpeed an fp32 gradient (bf16: BF16_Optimizer's ``_hp_grad``; fp32: the
    ``.grad``)."""
    e = ELEMENT[precision]
    summed = precision == "fp32" or needs_fp32_grad_buffer(torch.bfloat16, gas, dp)
    if zero == 0 and impl == "distributed":
        return (4 if summed else e) * -(-table // dp)
    if zero == 0:
        return (4 if summed else e) * table
    return 4 * table
