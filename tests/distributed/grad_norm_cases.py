"""The global gradient norm that megallama's optimizers log and clip with is the exact norm of the
layout's gradients, rounded once to fp32, at every layout (as DeepSpeed's, which sums per-tensor
norms in float64).

Oracle: at the first step, just before the optimizer takes its norm, every rank reassembles the
full (DP-reduced, TP-gathered, unpadded) gradient of every parameter it holds and squares it in
float64; the ranks pool these by global name, so each parameter of the model counts exactly once
whatever the layout. The optimizer's norm must equal the root of the sum within 1e-7 relative (an
fp32 rounding is <= 6e-8). Taking each tensor's norm in fp32 (CPU sums a whole tensor's squares
in fp32 lanes, so small squares of the 512,000-element output head vanish) was measured 2.2e-6
relative too low here at (1,1,4); counting a replicated weight twice moves the norm by far more than the
tolerance: the weight of least gradient, counted twice, moves it by 6e-7 relative at (2,1,2)
(asserted from the oracle's own numbers at every tp > 1 layout; most move it by far more).

On 4 ranks (called from the dp-4 launch of test_distributed_optimizer.py, to share its start-up):
optim.impl=distributed at (tp, pp, dp) = (1,1,4), (2,1,2) + SP, (1,2,2), (4,1,1) (KV heads
replicated over TP) and optim.impl=fused at (1,1,4), (2,2,1) + SP.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megallama.config import preset
from megallama.engine import Engine
from megallama.model.layout import shard_spec
from megallama.model.llama import Transformer
from megallama.optim.grad_buckets import gather_flat
from megallama.parallel.layers import full_tensor
from megallama.parallel.topology import Grid, build_topology, kv_replicas_for
from tests.distributed.engine_cases import make_config, rank_micro_batches

TOL = 1e-7  # relative: one fp32 rounding of the exact norm
VOCAB = 4000  # a 4000 x 128 output head: 512,000 squares, most far below the largest
LAYOUTS = (("distributed", 1, 1, False), ("distributed", 2, 1, True), ("distributed", 1, 2, False),
           ("distributed", 4, 1, False), ("fused", 1, 1, False), ("fused", 2, 2, True))


def _grads(opt) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Each parameter's DP-reduced gradient as the optimizer is about to take the norm: the
    fused optimizer's reduced buffers; the distributed optimizer's shards all-gathered over DP."""
    if not hasattr(opt, "buckets"):
        return {p: opt._grad(p) for g in opt.param_groups for p in g["params"]}
    out = {}
    for bucket in opt.buckets:
        full = torch.empty(bucket.shard_size * bucket.dp, dtype=torch.float32)
        shard = bucket.shard_grad.float().contiguous()
        if bucket.dp > 1:
            gather_flat(full, shard, bucket.group)
        else:
            full.copy_(shard)
        for i, p in enumerate(bucket.params):
            out[p] = full[bucket.offsets[i]:bucket.offsets[i] + p.numel()].view(p.shape)
    return out


@torch.no_grad()
def _squares(engine: Engine, cfg) -> dict[str, tuple[float, bool]]:
    """Global name -> (float64 squared norm of its full gradient, replicated over TP), pooled
    from every rank."""
    grads, tp = _grads(engine.optimizer), cfg.parallel.tp
    mine = {}
    for prefix, module in engine.local_layers():
        for local, p in module.named_parameters():
            name = f"{prefix}.{local}"
            full = full_tensor(grads[p], p, engine.tp)
            spec = shard_spec(cfg.model, name, tp)
            if spec.split_dim is not None:
                full = full.narrow(spec.split_dim, 0, spec.shape[spec.split_dim])
            mine[name] = (full.double().square().sum().item(), spec.split_dim is None)
    pooled: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(pooled, mine)
    return {k: v for d in pooled for k, v in d.items()}


def _check(world: int, impl: str, tp: int, pp: int, sp: bool, names: set[str]) -> None:
    dp = world // (tp * pp)
    cfg = make_config(tp=tp, pp=pp, zero=0, sp=sp, micro=2, global_batch=4 * dp)
    cfg.model = preset("tiny_gqa", vocab_size=VOCAB)
    cfg.optim.impl, cfg.optim.bucket_mb = impl, 0.1
    grid = Grid.from_world(world, tp=tp, pp=pp)
    topo = build_topology(grid, kv_replicas_for(cfg.model.n_kv_heads, tp))
    engine = Engine(cfg, topo, torch.device("cpu"))
    opt, seen = engine.optimizer, {}
    norm_of = opt.grad_norm

    def grad_norm(*args):
        seen["squares"] = _squares(engine, cfg)
        return norm_of(*args)
    opt.grad_norm = grad_norm
    got = engine.train_step(rank_micro_batches(0, cfg, topo.dp_rank, dp)).grad_norm
    squares = seen["squares"]
    total = sum(s for s, _ in squares.values())
    want = math.sqrt(total)
    what = f"{impl} (tp, pp, dp)=({tp}, {pp}, {dp}) sp={sp}"
    assert set(squares) == names, f"{what}: the ranks hold {sorted(set(squares) ^ names)}"
    assert abs(got - want) <= TOL * want, \
        f"{what}: norm {got!r}, exact {want!r} ({(got - want) / want:+.2e} relative)"
    if tp > 1:  # the oracle can tell a replicated weight counted twice from round-off
        least = min(s for s, replicated in squares.values() if replicated)
        move = math.sqrt(total + least) / want - 1
        assert move > 3 * TOL, f"{what}: the least replicated weight moves the norm {move:.1e}"


def check_every_layout(world: int) -> None:
    """The logged norm against the float64 oracle at every layout of LAYOUTS (4 ranks)."""
    model = preset("tiny_gqa", vocab_size=VOCAB)
    names = {n for n, _ in Transformer(model, seed=0).named_parameters()}
    for impl, tp, pp, sp in LAYOUTS:
        _check(world, impl, tp, pp, sp, names)

