"""Every (tp, pp, dp) layout and ZeRO stage trains exactly like the single-process reference.

Over 5 fp32 steps the DeepSpeed-driven run (1F1B PipelineEngine when pp > 1) must give the same
losses and global gradient norms as plain torch (AdamW, clipping active), within 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

from megallama.engine import Engine
from megallama.parallel.runtime import init_distributed
from megallama.parallel.topology import Grid, build_topology, kv_replicas_for
from tests.distributed.engine_cases import make_config, rank_micro_batches, reference_run
from tests.distributed.harness import run_world

TOL = 1e-5


def _worker(rank: int, world: int, layouts) -> None:
    init_distributed(torch.device("cpu"))
    for tp, pp, zero, sp, *extra in layouts:  # extra: micro-batch size, activation checkpointing
        cfg = make_config(tp=tp, pp=pp, zero=zero, sp=sp, micro=extra[0] if extra else 2)
        cfg.parallel.activation_checkpointing = extra[1] if len(extra) > 1 else "none"
        grid = Grid.from_world(world, tp=tp, pp=pp)
        topo = build_topology(grid, kv_replicas_for(cfg.model.n_kv_heads, tp))
        engine = Engine(cfg, topo, torch.device("cpu"))
        ref_losses, ref_norms = reference_run(cfg)
        assert max(ref_norms) > cfg.optim.grad_clip, "clipping must be active in this test"
        what = (f"tp={tp} pp={pp} dp={grid.dp} zero={zero} sp={sp} micro={cfg.parallel.micro_batch_size}"
                f" ckpt={cfg.parallel.activation_checkpointing}")
        for step in range(cfg.trainer.steps):
            batches = rank_micro_batches(step, cfg, topo.dp_rank, grid.dp)
            out = engine.train_step(batches)
            assert abs(out.loss - ref_losses[step]) <= TOL * ref_losses[step], (
                f"{what} step {step}: loss {out.loss} != reference {ref_losses[step]}")
            assert abs(out.grad_norm - ref_norms[step]) <= TOL * ref_norms[step], (
                f"{what} step {step}: grad norm {out.grad_norm} != reference {ref_norms[step]}")


@pytest.mark.slow
@pytest.mark.parametrize("world,layouts", [
    # micro-batch size 1, 2 and 4 (8, 4 and 2 micro-batches per step) give the same losses
    # zero=0 is megallama's fused optimizer (its own clipping, norm and DP reduction)
    (1, [(1, 1, 1, False), (1, 1, 1, False, 4), (1, 1, 1, False, 1), (1, 1, 0, False),
         (1, 1, 0, False, 8)]),
    (2, [(2, 1, 1, False), (1, 2, 1, False), (1, 2, 1, False, 1), (1, 1, 1, False), (1, 1, 2, False), (1, 1, 3, False),
         (2, 1, 0, False), (1, 2, 0, False), (1, 1, 0, False)]),
    (4, [(2, 2, 1, False), (2, 2, 1, True), (1, 4, 1, False), (2, 1, 2, False), (2, 1, 3, False),
         (2, 2, 0, True), (2, 1, 0, False),
         (2, 2, 1, True, 2, "selective")]),  # selective recomputation through TP + SP + pipeline
    (8, [(2, 2, 1, True), (2, 2, 0, True)]),
], ids=["world1", "world2", "world4", "world8"])
def test_engine_matches_reference(world, layouts):
    run_world(world, _worker, layouts)
