"""The distributed optimizer's pieces on one process: bucket and shard arithmetic, the boxes a
flat shard is saved as, and DistributedAdamW at dp = 1 against torch's AdamW (the oracle).

Multi-rank behaviour (reduce-scatter, DP shards, TP/PP norm, resume at other layouts, overlap)
is in tests/distributed/test_distributed_optimizer.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from megallama.checkpoint.optim_pieces import flat_boxes
from megallama.config import ConfigError
from megallama.config.train_config import OptimConfig, ParallelConfig
from megallama.config.validate import check_optimizer_impl
from megallama.optim.adamw_kernel import split_fp32
from megallama.optim.distributed_adamw import DistributedAdamW
from megallama.optim.grad_buckets import plan_buckets, shard_segments
from megallama.parallel.topology import Grid, build_topology

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.95), 1e-5, 0.1
SHAPES = [(16, 8), (8,), (33, 5), (7,), (12, 12)]


def test_buckets_and_shards_tile_every_element_once():
    numels = [math.prod(s) for s in SHAPES]
    buckets = plan_buckets(numels, 150)
    assert [i for b in buckets for i in b] == list(range(len(numels)))
    assert all(sum(numels[i] for i in b) <= 150 or len(b) == 1 for b in buckets)
    for dp in (1, 2, 3, 4):
        for b in buckets:
            sizes = [numels[i] for i in b]
            shard = -(-sum(sizes) // dp)
            seen = [torch.zeros(n, dtype=torch.int32) for n in sizes]
            for r in range(dp):
                for seg in shard_segments(sizes, r * shard, shard):
                    assert 0 <= seg.shard_start and seg.shard_start + seg.length <= shard
                    seen[seg.index][seg.start:seg.start + seg.length] += 1
            assert all(bool((s == 1).all()) for s in seen), (dp, b)


@pytest.mark.parametrize("shape", [(10,), (6, 7), (1, 9), (5, 1)])
def test_flat_boxes_hold_exactly_the_range(shape):
    t = torch.arange(math.prod(shape)).view(shape)
    n = t.numel()
    for start in range(n):
        for stop in range(start + 1, n + 1):
            values = t.reshape(-1)[start:stop]
            covered = 0
            for box, lo, hi in flat_boxes(shape, start, stop):
                region = t[tuple(slice(a, b) for a, b in box)]
                assert torch.equal(region, values[lo:hi].view(region.shape)), (start, stop, box)
                covered += hi - lo
            assert covered == stop - start


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _groups(params):
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": WD},
            {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}]


def _backward(params, step: int, micro: int, scale: float = 1.0) -> None:
    """Gradients through autograd (the optimizer's hooks see them): d/dp sum(p * g) = g, with g
    bf16-representable so that bf16 and fp32 parameters get the same values."""
    g = torch.Generator().manual_seed(100 * step + micro)
    loss = sum((p * (torch.randn(p.shape, generator=g) * scale).bfloat16().to(p.dtype)).sum()
               for p in params)
    loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_rank_matches_torch_adamw(dtype):
    """dp = 1, two micro-batches per step, buckets smaller than some parameters and mixing the
    decay / no-decay groups: fp32 params follow torch AdamW (foreach=False) bit for bit; bf16
    params' fp32 master follows torch AdamW on fp32 copies fed the same gradients (the fp32
    buffer sums the two bf16 micro-batch gradients as torch does)."""
    params = _params(dtype)
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    opt = DistributedAdamW(_groups(params), lr=LR, betas=BETAS, eps=EPS, max_grad_norm=0.0,
                           topo=build_topology(Grid.from_world(1)), gas=2, bucket_bytes=300,
                           registration_order=params)
    assert len(opt.buckets) > 2
    ref_opt = torch.optim.AdamW(_groups(ref), lr=LR, betas=BETAS, eps=EPS, foreach=False)
    for step in range(4):
        for micro in range(2):
            _backward(params, step, micro)
            _backward(ref, step, micro)  # same values: the bf16 gradients are exact in fp32
        opt.step()
        ref_opt.step()
        ref_opt.zero_grad()
        for p, r in zip(params, ref, strict=True):
            master = opt.full_state(p, "fp32")
            assert torch.equal(master, r.detach()), f"step {step}: master differs"
            assert torch.equal(opt.full_state(p, "exp_avg"), ref_opt.state[r]["exp_avg"])
            assert p.grad is None


def test_clipping_skip_and_state_access():
    """The norm and clipping of torch's clip_grad_norm_ (1e-6 rel), a non-finite gradient skips
    the step and sets ``overflow``, and owned_pieces / set_full_state round-trip the state."""
    params = _params(torch.float32)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = DistributedAdamW(_groups(params), lr=LR, betas=BETAS, eps=EPS, max_grad_norm=0.5,
                           topo=build_topology(Grid.from_world(1)), gas=1, bucket_bytes=400)
    ref_opt = torch.optim.AdamW(_groups(ref), lr=LR, betas=BETAS, eps=EPS, foreach=False)
    for step in range(3):
        _backward(params, step, 0, scale=3.0)
        _backward(ref, step, 0, scale=3.0)
        norm = torch.nn.utils.clip_grad_norm_(ref, 0.5).item()
        opt.step()
        ref_opt.step()
        ref_opt.zero_grad()
        assert abs(opt._global_grad_norm - norm) <= 1e-6 * norm and not opt.overflow
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in params]
    moments = [opt.full_state(p, "exp_avg_sq").clone() for p in params]
    params[0].grad = None
    loss = sum((p * 1.0).sum() for p in params[1:]) + (params[0] * float("nan")).sum()
    loss.backward()
    opt.step()
    assert opt.overflow and int(opt.step_count) == 3
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(torch.equal(opt.full_state(p, "exp_avg_sq"), m)
               for p, m in zip(params, moments, strict=True))
    for p in params:  # the owned pieces at dp = 1 are the whole tensor
        (start, value), = opt.owned_pieces(p, "fp32")
        assert start == 0 and torch.equal(value.view(p.shape), p.detach())
        opt.set_full_state(p, "exp_avg", torch.full(p.shape, 2.0))
        assert torch.equal(opt.full_state(p, "exp_avg"), torch.full(p.shape, 2.0))


def test_bf16_set_full_state_splits_the_master():
    params = _params(torch.bfloat16)
    opt = DistributedAdamW(_groups(params), lr=LR, betas=BETAS, eps=EPS, max_grad_norm=0.0,
                           topo=build_topology(Grid.from_world(1)), gas=1, bucket_bytes=200)
    value = torch.randn(params[2].shape)
    opt.set_full_state(params[2], "fp32", value)
    assert torch.equal(opt.full_state(params[2], "fp32"), value)
    (_, piece), = opt.owned_pieces(params[2], "fp32")
    assert torch.equal(piece.view(value.shape), value)
    assert torch.equal(params[2].detach(), split_fp32(value)[0])  # the weight: the upper half


@pytest.mark.parametrize("impl,zero,bucket_mb,message", [
    ("distributed", 1, 25.0, "optim.impl=distributed with parallel.zero_stage=1: the distributed "
                             "optimizer shards its state over data parallelism itself"),
    ("distributed", 0, 0.0, "optim.bucket_mb=0.0: must be in (0, 1048576]"),
    ("sharded", 0, 25.0, "optim.impl='sharded': choose one of ['auto', 'deepspeed', 'fused', "
                         "'distributed']"),
])
def test_config_checks(impl, zero, bucket_mb, message):
    o, p = OptimConfig(impl=impl, bucket_mb=bucket_mb), ParallelConfig(zero_stage=zero)
    with pytest.raises(ConfigError) as e:
        check_optimizer_impl(o, p)
    assert str(e.value).startswith(message)
    check_optimizer_impl(OptimConfig(impl="distributed"), ParallelConfig(zero_stage=0))


@pytest.mark.parametrize("gas", [1, 2])
def test_missing_gradient_fails_naming_the_parameter(gas):
    """A parameter that gets fewer gradients than micro-batches leaves its bucket's reduce-scatter
    unlaunched (at dp > 1 the ranks' collectives would then pair in different orders): step()
    fails naming it and changes nothing, instead of reducing the bucket on its own."""
    params = _params(torch.float32)
    names = [f"layers.{i}.weight" for i in range(len(params))]
    opt = DistributedAdamW(_groups(params), lr=LR, betas=BETAS, eps=EPS, max_grad_norm=0.0,
                           topo=build_topology(Grid.from_world(1)), gas=gas, bucket_bytes=300,
                           registration_order=list(zip(names, params, strict=True)))
    before = [p.detach().clone() for p in params]
    for micro in range(gas):  # params[2] gets a gradient in no micro-batch, params[3] in one
        used = [p for i, p in enumerate(params) if i != 2 and (i != 3 or micro == 0)]
        sum((p * 2.0).sum() for p in used).backward()
    with pytest.raises(RuntimeError) as e:
        opt.step()
    counts = "layers.2.weight (0 of 2), layers.3.weight (1 of 2)" if gas == 2 else \
        "layers.2.weight (0 of 1)"
    assert str(e.value).startswith(
        f"DistributedAdamW.step: {gas} parameter(s) got fewer gradients than the {gas} "
        f"micro-batch(es) of the step on DP rank 0: {counts}. optim.impl=distributed needs"), \
        str(e.value)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert int(opt.step_count) == 0
    opt.zero_grad()  # a complete step afterwards trains
    for _ in range(gas):
        _backward(params, 0, 0)
    opt.step()
    assert int(opt.step_count) == 1 and not opt.overflow
