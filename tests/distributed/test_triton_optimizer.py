"""The distributed optimizer's Triton path (the GPU's code) sharded over DP on gloo, against its
torch reference path: one 4-rank launch runs dp 4 (tp 1) and dp 2 (tp 2), the kernels on CPU
tensors under Triton's interpreter (tests/conftest.py turns it on where there is no GPU; spawned
ranks inherit it). Single-process kernel cases: tests/test_optim_kernels.py. The same launch
checks that ``optim.impl=auto`` resolved inside a process group (as the engine does) follows its
dp: fused at dp 1, distributed above.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from megallama.config.train_config import TrainConfig
from megallama.config.validate import resolve_optimizer
from megallama.optim.distributed_adamw import DistributedAdamW
from megallama.optim.kernels import interpreting
from megallama.parallel.topology import Grid, build_topology
from tests.distributed.harness import run_world
from tests.test_optim_kernels import ATOL, RTOL, SHAPES, B, _groups, _params

pytestmark = pytest.mark.slow
pytest.importorskip("triton", reason="the kernels' tests need triton (pip install triton)")
STEPS, NAN_STEP = 3, 1
# SHAPES of the single-process tests and a matrix whose 1/dp shard spans several blocks
DP_SHAPES = [*SHAPES, (9, 1000)]


def _backward(params, dp_rank: int, step: int, micro: int, nan: bool) -> None:
    """Gradients that differ between DP ranks (equal on the TP ranks of one DP rank, as the
    gradients of replicated parameters are), through autograd so the bucket hooks see them."""
    g = torch.Generator().manual_seed(1000 * dp_rank + 10 * step + micro)
    gs = [(torch.randn(p.shape, generator=g) * 3).bfloat16().to(p.dtype) for p in params]
    if nan:
        gs[1].view(-1)[-1] = float("nan")
    sum((p * x).sum() for p, x in zip(params, gs, strict=True)).backward()


def _train(mode: str, topo, dtype: torch.dtype, gas: int):
    """STEPS steps with clipping active; at NAN_STEP the last DP rank alone has a NaN gradient,
    and every rank must skip the step."""
    os.environ["MEGALLAMA_KERNELS"] = mode
    params = _params(dtype, DP_SHAPES)
    opt = DistributedAdamW(_groups(params), lr=1e-2, betas=(0.9, 0.95), eps=1e-5,
                           max_grad_norm=0.5, topo=topo, gas=gas, bucket_bytes=5000,
                           registration_order=params)
    assert opt.use_kernel is (mode == "triton")
    last = topo.dp_rank == topo.grid.dp - 1
    for step in range(STEPS):
        before = [p.detach().clone() for p in params]
        for micro in range(gas):
            _backward(params, topo.dp_rank, step, micro, step == NAN_STEP and last)
        opt.step()
        assert opt.overflow is (step == NAN_STEP), (mode, step)
        if step == NAN_STEP:
            assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
        else:
            assert opt._global_grad_norm > 0.5  # clipping is active
    return opt, params


def _compare(topo, dtype: torch.dtype, gas: int) -> None:
    what = f"dp={topo.grid.dp} tp={topo.grid.tp} {dtype} gas={gas}"
    opt_k, pk = _train("triton", topo, dtype, gas)
    opt_r, pr = _train("reference", topo, dtype, gas)
    # each run is one launch, at offset shard_start + start of the flat weights and at start of
    # the shard's moments and gradients: some of those must fall inside a block
    odd = torch.tensor(sum(bool((b.shard_start + start) % B and start % B)
                           for b, runs in zip(opt_k.buckets, opt_k.runs, strict=True)
                           for start, _, _ in runs))
    dist.all_reduce(odd)
    assert odd > 0, f"{what}: every launch starts on a block"
    assert max(n for runs in opt_k.runs for _, n, _ in runs) > B, f"{what}: no multi-block run"
    assert opt_k._global_grad_norm == pytest.approx(opt_r._global_grad_norm, rel=1e-6), what
    for i, (a, b) in enumerate(zip(pk, pr, strict=True)):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):  # all-gathered over DP
            torch.testing.assert_close(opt_k.full_state(a, key), opt_r.full_state(b, key),
                                       rtol=RTOL, atol=ATOL, msg=f"{what} param {i} {key}")
        master = opt_k.full_state(a, "fp32")
        want = master if dtype == torch.float32 else master.to(torch.bfloat16)
        torch.testing.assert_close(a.detach(), want, rtol=0, atol=0 if dtype == torch.float32
                                   else 2 ** -7 * master.abs().max().item(), msg=what)
        every = [torch.empty_like(a) for _ in range(dist.get_world_size())]
        dist.all_gather(every, a.detach().contiguous())
        assert all(torch.equal(e, every[0]) for e in every), f"{what}: weights differ by rank"


def _worker(rank: int, world: int) -> None:
    assert interpreting() or torch.cuda.is_available()
    # optim.impl=auto without a world size (as the engine resolves it): the process group's
    for tp, pp, want in ((1, 1, "distributed"), (2, 2, "fused"), (1, 2, "distributed")):
        cfg = TrainConfig()
        cfg.trainer.precision, cfg.parallel.tp, cfg.parallel.pp = "bf16", tp, pp
        resolve_optimizer(cfg)
        assert (cfg.optim.impl, cfg.parallel.zero_stage) == (want, 0), (tp, pp)
    for tp in (1, 2):
        topo = build_topology(Grid.from_world(world, tp=tp))
        for dtype, gas in ((torch.float32, 1), (torch.bfloat16, 2)):
            _compare(topo, dtype, gas)


def test_sharded_triton_path_matches_reference_dp4_dp2():
    if not interpreting():
        pytest.skip("Triton's interpreter is off in this process (TRITON_INTERPRET unset)")
    run_world(4, _worker)
