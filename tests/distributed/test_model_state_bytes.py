"""Model-state bytes per parameter of ``optim.impl=distributed`` (bf16) at dp 1, 2 and 4, counted
from the tensors themselves: every distinct storage the weights, their ``.grad`` and the optimizer
reach (its buckets, shards and state, walked as ``tests/test_plan.py`` walks them at dp 1), after
the last micro-batch's backward and again after the step. In-place reduce-scatter: 6 + 10/dp
bytes per parameter (2 bf16 weight, 4 fp32 gradient buffer that also holds the reduced shard,
2 master remainder and 8 Adam moments of the 1/dp shard), the planner's
(``state_bytes.optimizer_states``) on the buckets' padded length. Gloo cannot reduce-scatter in
place: from the backward to the step each bucket's collective writes into a staging shard
(``Bucket.staging``, 4/dp bytes per parameter), which the planner models on CPU as ``bucket``;
it is counted apart and must be gone after the step.

One 4-rank launch: (tp, pp, dp) = (4, 1, 1), (2, 1, 2) and (1, 1, 4) on the same ranks (TP groups
unused by the plain model; only the DP group matters).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megallama.optim.distributed_adamw import DistributedAdamW
from megallama.parallel.topology import Grid, build_topology
from megallama.training.state_bytes import optimizer_states
from tests.distributed.harness import run_world
from tests.test_plan import _held_bytes

BUCKET_BYTES = 16384  # fp32 gradient bytes per bucket: several buckets, parameters straddle them
GAS = 2
SCALARS = 16  # bytes of 0-d bookkeeping tensors the walk also finds (the step counter: 4)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every rank, as a DP replica
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 80, bias=False),
                                torch.nn.Linear(80, 64))
    return model.to(torch.bfloat16)


def _measure(tp: int, dp: int) -> dict[str, float]:
    """Bytes per parameter held after the last backward (staging apart) and after the step."""
    topo = build_topology(Grid(tp=tp, pp=1, dp=dp))
    model = _model()
    params = list(model.parameters())
    opt = DistributedAdamW([{"params": params, "weight_decay": 0.0}], lr=1e-3,
                           betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0, topo=topo, gas=GAS,
                           bucket_bytes=BUCKET_BYTES, registration_order=params, use_kernel=False)
    torch.manual_seed(1 + dist.get_rank())  # each DP rank its own data
    for _ in range(GAS):
        model(torch.randn(4, 64, dtype=torch.bfloat16)).float().square().sum().backward()
    n = sum(p.numel() for p in params)
    padded = sum(b.weight.numel() for b in opt.buckets)
    staging = sum(b.staging.numel() * b.staging.element_size() for b in opt.buckets
                  if b.staging is not None)
    after_backward = _held_bytes(opt, params) - staging
    want = optimizer_states(padded, dp, "bf16", 0, "cpu", gas=GAS, impl="distributed")
    planned = want.weights + want.grads_keep + want.grads_accum + want.master + want.adam
    what = f"dp {dp}: {after_backward} bytes held for {n} parameters ({padded} padded)"
    # besides: 0-d tensors such as the shared step counter (4 bytes), not model state
    assert planned == 6 * padded + 10 * padded // dp and 0 <= after_backward - planned <= SCALARS, \
        f"{what}, planned {planned}"
    assert padded - n < dp * len(opt.buckets), what  # padding: < dp elements per bucket
    assert staging == (want.bucket if dp > 1 else 0), f"{what}: staging {staging}"
    opt.step()
    opt.wait_param_gathers()
    after_step = _held_bytes(opt, params)
    assert after_step == after_backward and all(b.staging is None for b in opt.buckets), \
        f"{what}: {after_step} after the step"
    return {"per_param": after_backward / n, "staging_per_param": staging / n,
            "bytes": after_backward, "planned": planned}


def _worker(rank: int, world: int) -> None:
    for tp, dp in ((4, 1), (2, 2), (1, 4)):
        got = _measure(tp, dp)
        assert abs(got["per_param"] - (6 + 10 / dp)) < 0.01, (dp, got)
        if rank == 0:
            print(f"dp {dp}: {got['bytes']} bytes held, planned {got['planned']}: "
                  f"{got['per_param']:.4f} bytes/param of model state "
                  f"(6 + 10/dp = {6 + 10 / dp:.4f}); Gloo staging "
                  f"{got['staging_per_param']:.4f}", flush=True)


def test_model_state_bytes_per_param_at_dp_1_2_4() -> None:
    run_world(4, _worker)
