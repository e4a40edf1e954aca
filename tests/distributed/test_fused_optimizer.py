"""optim.impl=fused in bf16 trains like DeepSpeed's bf16 optimizer (ZeRO-1) at every layout, and
skips a non-finite step the same way.

Both keep fp32 master weights and moments, accumulate bf16 gradients in fp32, reduce them over DP
in fp32 and clip by the TP/PP-aware global norm; they differ only in rounding order (and in the
fused path's tie rule when the master is rounded to bf16), so over a few steps losses and norms
agree to well within bf16 resolution. The exact fp32 comparison with plain torch is in
test_engine_parity.py.
"""

from __future__ import annotations

import pytest
import torch

from megallama.engine import Engine
from megallama.parallel.runtime import init_distributed
from megallama.parallel.topology import Grid, build_topology, kv_replicas_for
from tests.distributed.engine_cases import STEPS, make_config, rank_micro_batches
from tests.distributed.faults import poisoned_output
from tests.distributed.harness import run_world

LOSS_TOL, NORM_TOL = 2e-3, 2e-2  # relative; bf16 resolution is 2**-8 = 3.9e-3


def _run(world: int, tp: int, pp: int, zero: int) -> list[tuple[float, float]]:
    cfg = make_config(tp=tp, pp=pp, zero=zero)
    cfg.trainer.precision = "bf16"
    grid = Grid.from_world(world, tp=tp, pp=pp)
    topo = build_topology(grid, kv_replicas_for(cfg.model.n_kv_heads, tp))
    engine = Engine(cfg, topo, torch.device("cpu"))
    out = []
    for step in range(STEPS):
        r = engine.train_step(rank_micro_batches(step, cfg, topo.dp_rank, grid.dp))
        out.append((r.loss, r.grad_norm))
    # a NaN loss: the step is skipped on every rank, weights and LR untouched, then training goes on
    weights = [p.detach().clone() for p in engine.module.parameters()]
    lr = engine.optimizer.param_groups[0]["lr"]
    with poisoned_output(engine):
        r = engine.train_step(rank_micro_batches(STEPS, cfg, topo.dp_rank, grid.dp))
    assert r.skipped and engine.skipped_steps == 1, f"zero={zero}: NaN step not skipped"
    assert all(torch.equal(p, w) for p, w in zip(engine.module.parameters(), weights, strict=True))
    assert engine.optimizer.param_groups[0]["lr"] == lr
    r = engine.train_step(rank_micro_batches(STEPS, cfg, topo.dp_rank, grid.dp))
    assert not r.skipped and r.grad_norm is not None and r.grad_norm < float("inf")
    return out


def _worker(rank: int, world: int, layouts) -> None:
    init_distributed(torch.device("cpu"))
    for tp, pp in layouts:
        ds, fused = _run(world, tp, pp, zero=1), _run(world, tp, pp, zero=0)
        for step, ((l0, n0), (l1, n1)) in enumerate(zip(ds, fused, strict=True)):
            what = f"tp={tp} pp={pp} world={world} step {step}"
            assert abs(l1 - l0) <= LOSS_TOL * l0, f"{what}: loss fused {l1} vs deepspeed {l0}"
            assert abs(n1 - n0) <= NORM_TOL * n0, f"{what}: norm fused {n1} vs deepspeed {n0}"


@pytest.mark.slow
def test_fused_bf16_matches_deepspeed_bf16():
    run_world(2, _worker, [(1, 1), (2, 1), (1, 2)])  # dp=2, tp=2, pp=2
