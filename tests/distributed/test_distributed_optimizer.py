"""optim.impl=distributed (DistributedAdamW: fused AdamW, state sharded over DP, gradient
reduce-scatter started from the backward) at every layout, against independent oracles:

* fp32: 5 steps with clipping active give the losses and global gradient norms of plain
  single-process torch AdamW (engine_cases.reference_run) within 1e-5 relative, at (tp, pp, dp) =
  (1,1,2), (1,1,4), (2,1,2), (1,2,2) (activation checkpointing on) and (2,2,2) with SP, each with
  1 and 4 micro-batches per step; buckets of 0.1 MiB so that every rank holds several and
  parameters straddle DP shards; after 2 steps at (2,1,2) every parameter equals torch's;
* bf16: tracks impl=fused within the bf16 tolerances of test_fused_optimizer at dp 2 and at
  tp2 x pp2 x dp2, and a non-finite step is skipped identically on every rank;
* resume: each rank writes only the state it owns (no gather; every DP rank writes a file) and
  reads back only the pieces overlapping its shard (bytes counted: 1/dp of its slice's state, at
  the same layout and at (1,1,4) and (2,2,1) from (2,2,2)); same layout bit-exact; a (2,2,2) checkpoint resumes as (1,1,4) and (2,2,1) within 1e-5 of the
  uninterrupted run; impl=deepspeed and impl=fused checkpoints resume under impl=distributed and
  back, within 1e-5 of plain torch;
* memory: the bytes each rank holds (weights, gradient buffers, sharded state) at dp 1, 2 and 4
  are the planner's (megallama.training.state_bytes.optimizer_states) within 10%, and 6 + 10/dp
  per bf16 parameter within 0.01 (in-place reduce-scatter: no separate reduced shard);
* overlap: the reduce-scatter of the bucket holding the output head starts in the last
  micro-batch's backward, before any gradient of the first transformer block is computed; the
  parameter all-gathers of a step are started in forward order and none is waited for in that
  step: each is waited for at the next step's first forward of a layer holding one of its
  parameters, the head's after the first block's forward has begun; reading weights
  (Engine.local_layers, eval_loss) first waits for every gather in flight;
* the real entry point: a bf16 dp-2 run resumed through the Trainer gives identical losses;
* the global gradient norm of impl=distributed and impl=fused equals a float64 recomputation
  from the layout's gradients within 1e-7 at six layouts (grad_norm_cases.py, in the dp-4 launch).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megallama.checkpoint import pieces_index
from megallama.checkpoint.pieces_index import PieceReader
from megallama.checkpoint.stateful import load_pieces, save_pieces
from megallama.engine import Engine
from megallama.parallel.runtime import init_distributed
from megallama.parallel.topology import Grid, build_topology, kv_replicas_for
from megallama.training.state_bytes import optimizer_states
from megallama.training.train_state import TrainingState
from tests.distributed.engine_cases import (
    STEPS,
    make_config,
    rank_micro_batches,
    reference_run,
    reference_weights,
)
from tests.distributed.grad_norm_cases import check_every_layout
from tests.distributed.harness import run_world
from tests.distributed.test_fused_optimizer import LOSS_TOL, NORM_TOL, _skip_step
from tests.distributed.test_resume import losses, run
from tests.distributed.test_updated_weights import TOL as WEIGHT_TOL
from tests.distributed.test_updated_weights import _full_weights

pytestmark = pytest.mark.slow
TOL = 1e-5  # fp32 against torch: only the summation order differs
MEM_TOL = 0.10
SAVED_AT = 2  # the resume tests save after this many steps


def _engine(world: int, tp: int, pp: int, gas: int, *, sp: bool = False, precision: str = "fp32",
            impl: str = "distributed", global_batch: int | None = None, bucket_mb: float = 0.1,
            ckpt: bool | str = False):
    """An engine at (tp, pp, world / (tp pp)) with ``gas`` micro-batches per step (global batch
    4 * dp unless given)."""
    dp = world // (tp * pp)
    global_batch = global_batch or 4 * dp
    cfg = make_config(tp=tp, pp=pp, zero=1 if impl == "deepspeed" else 0, sp=sp,
                      micro=global_batch // (dp * gas), global_batch=global_batch)
    cfg.optim.impl, cfg.optim.bucket_mb, cfg.trainer.precision = impl, bucket_mb, precision
    cfg.parallel.activation_checkpointing = ckpt
    grid = Grid.from_world(world, tp=tp, pp=pp)
    topo = build_topology(grid, kv_replicas_for(cfg.model.n_kv_heads, tp))
    return Engine(cfg, topo, torch.device("cpu")), cfg, topo


def _train(engine, cfg, topo, steps: range) -> list[tuple[float, float]]:
    return [(r.loss, r.grad_norm) for r in
            (engine.train_step(rank_micro_batches(s, cfg, topo.dp_rank, topo.grid.dp))
             for s in steps)]


def _close(got: list[float], want: list[float], tol: float, what: str) -> None:
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) <= tol * abs(w), f"{what} step {step}: {g} != {w} (rel tol {tol})"


def _fp32(world: int, tp: int, pp: int, refs: dict, sp: bool = False,
          ckpt: bool | str = False) -> None:
    """5 fp32 steps equal plain torch AdamW, with 1 and with 4 micro-batches per step."""
    for gas in (1, 4):
        engine, cfg, topo = _engine(world, tp, pp, gas, sp=sp, ckpt=ckpt)
        assert len(engine.optimizer.buckets) >= 3, "several buckets expected"
        losses, norms = refs[(cfg.parallel.global_batch_size, cfg.parallel.micro_batch_size)]
        assert max(norms) > cfg.optim.grad_clip, "clipping must be active in this test"
        out = _train(engine, cfg, topo, range(STEPS))
        what = f"fp32 (tp, pp, dp)=({tp}, {pp}, {topo.grid.dp}) sp={sp} ckpt={ckpt} gas={gas}"
        _close([x[0] for x in out], losses, TOL, f"{what} loss")
        _close([x[1] for x in out], norms, TOL, f"{what} grad norm")


def _weights(world: int, tp: int, pp: int) -> None:
    """After 2 fp32 steps every parameter equals plain torch's, parameter by parameter (sees a
    wrong last update, which losses cannot), within test_updated_weights' tolerance."""
    engine, cfg, topo = _engine(world, tp, pp, 1)
    _train(engine, cfg, topo, range(2))
    got, want = _full_weights(engine, cfg), reference_weights(cfg, 2)
    for name, value in got.items():
        err = (value - want[name]).abs().max().item() / want[name].abs().max().item()
        assert err <= WEIGHT_TOL, f"({tp}, {pp}, {topo.grid.dp}) {name}: {err:.2e}"


def _bf16(world: int, tp: int, pp: int) -> None:
    """bf16 distributed tracks bf16 fused; non-finite steps are skipped on every rank alike."""
    runs = {}
    for impl in ("fused", "distributed"):
        engine, cfg, topo = _engine(world, tp, pp, 2, precision="bf16", impl=impl)
        runs[impl] = _train(engine, cfg, topo, range(STEPS))
    what = f"bf16 (tp, pp, dp)=({tp}, {pp}, {topo.grid.dp})"
    for step, ((l0, n0), (l1, n1)) in enumerate(zip(runs["fused"], runs["distributed"],
                                                    strict=True)):
        assert abs(l1 - l0) <= LOSS_TOL[step > 0] * l0, f"{what} step {step}: loss {l1} vs {l0}"
        assert abs(n1 - n0) <= NORM_TOL[step > 0] * n0, f"{what} step {step}: norm {n1} vs {n0}"
    world = dist.get_world_size()
    _skip_step(engine, cfg, topo, topo.grid, poisoned=True, label=f"{what}, NaN everywhere")
    _skip_step(engine, cfg, topo, topo.grid, poisoned=topo.rank == world - 1,
               label=f"{what}, NaN on rank {world - 1} only")
    assert engine.skipped_steps == 2


def _memory(world: int, tp: int, pp: int, precision: str, gas: int) -> None:
    """Bytes held per rank = the planner's model of impl=distributed, within MEM_TOL."""
    engine, cfg, topo = _engine(world, tp, pp, gas, precision=precision)
    local = sum(p.numel() for p in engine.module.parameters())
    want = optimizer_states(local, topo.grid.dp, precision, 0, "cpu", gas=gas,
                            impl="distributed")
    got = engine.optimizer.resident_bytes()
    planned = {"weights": want.weights, "grads": want.grads_keep, "state": want.master + want.adam}
    for k, v in planned.items():
        assert abs(got[k] - v) <= MEM_TOL * v, \
            f"{precision} dp={topo.grid.dp}: {k} {got[k]} bytes, planner {v}"
    if precision == "bf16" and gas > 1:  # summed gradients: an fp32 buffer at every dp
        per_param, dp = sum(got.values()) / local, topo.grid.dp
        assert abs(per_param - (6 + 10 / dp)) <= 0.01, \
            f"dp={dp}: {per_param:.4f} bytes/param of model state, want 6 + 10/dp"


def _overlap(world: int) -> None:
    """The output head's bucket is reduce-scattered during the last micro-batch's backward,
    before the first transformer block's backward runs."""
    gas = 4
    engine, cfg, topo = _engine(world, 1, 1, gas)
    opt, layers = engine.optimizer, dict(engine.local_layers())
    head = layers["output"].weight
    first = next(i for i, b in enumerate(opt.buckets) if any(p is head for p in b.params))
    events: list[tuple[str, int]] = []
    opt.on_launch = lambda b: events.append(("reduce_scatter", opt.buckets.index(b)))
    hooks = [layers["tok_embeddings"].register_forward_pre_hook(
        lambda m, a: events.append(("forward", 0)))]
    hooks += [p.register_hook(lambda g: events.append(("backward", 0)))
              for p in layers["layers.0"].parameters()]
    engine.train_step(rank_micro_batches(0, cfg, topo.dp_rank, topo.grid.dp))
    for h in hooks:
        h.remove()
    forwards = [i for i, (kind, _) in enumerate(events) if kind == "forward"]
    launches = [i for i, (kind, _) in enumerate(events) if kind == "reduce_scatter"]
    assert len(forwards) == gas and len(launches) == len(opt.buckets), events
    assert min(launches) > forwards[-1], f"a reduce-scatter before the last micro-batch: {events}"
    block0 = min(i for i, (kind, _) in enumerate(events) if kind == "backward" and i > forwards[-1])
    assert events.index(("reduce_scatter", first)) < block0, \
        f"the head's bucket was reduced only after layers.0's backward began: {events}"


def _gather_overlap(world: int) -> None:
    """Step n starts every bucket's parameter all-gather, in forward order, and waits for none;
    step n+1 waits for each at the forward pre-hook of the first layer holding one of its
    parameters, so the head's gather is waited for after layers.0's forward began. Reading the
    weights outside a forward (local_layers, eval_loss) waits for whatever is still in flight."""
    engine, cfg, topo = _engine(world, 1, 1, 2)
    opt, layers = engine.optimizer, engine.local_layers()
    events: list[tuple[str, object]] = []
    opt.on_gather = lambda kind, b: events.append((kind, b))
    hooks = [m.register_forward_pre_hook(lambda m, a, n=name: events.append(("forward", n)))
             for name, m in layers]  # after the optimizer's own hooks: they run first
    first_use = {}
    for name, m in layers:
        for p in m.parameters():
            first_use.setdefault(opt.where[p][0], name)
    for step in range(2):
        events.append(("step", step))
        engine.train_step(rank_micro_batches(step, cfg, topo.dp_rank, topo.grid.dp))
    for h in hooks:
        h.remove()
    n, second = len(opt.buckets), events.index(("step", 1))
    starts = [b for kind, b in events[:second] if kind == "start"]
    assert starts == list(reversed(range(n))), f"gathers not started in forward order: {events}"
    assert not any(kind == "wait" for kind, _ in events[:second]), f"waited in step 0: {events}"
    order = [x for x in events[second:] if x[0] in ("wait", "forward")]
    for b in range(n):  # waited for in the pre-hooks of its first layer's first forward
        at, use = order.index(("wait", b)), order.index(("forward", first_use[b]))
        assert at < use and all(k == "wait" for k, _ in order[at:use]), \
            f"bucket {b} not waited for at {first_use[b]}'s first forward: {order}"
    head = opt.where[dict(layers)["output"].weight][0]
    assert order.index(("forward", "layers.0")) < order.index(("wait", head)), order
    assert opt.pending_gathers() == list(range(n)), "step 1 left no gathers in flight"
    engine.local_layers()
    assert opt.pending_gathers() == [], "local_layers() left gathers in flight"
    engine.train_step(rank_micro_batches(2, cfg, topo.dp_rank, topo.grid.dp))
    engine.eval_loss(rank_micro_batches(3, cfg, topo.dp_rank, topo.grid.dp))
    assert opt.pending_gathers() == [], "eval_loss left gathers in flight"


def _worker_dp2(rank: int, world: int, refs: dict, tmp: Path) -> None:
    init_distributed(torch.device("cpu"))
    _fp32(world, 1, 1, refs)
    _overlap(world)
    _gather_overlap(world)
    _memory(world, 1, 1, "bf16", 2)
    _bf16(world, 1, 1)
    # impl=fused -> impl=distributed -> impl=fused, each resumed run against plain torch
    want = refs[(8, 4)][0][SAVED_AT:]
    for src, dst in (("fused", "distributed"), ("distributed", "fused")):
        engine, cfg, topo = _engine(world, 1, 1, 1, impl=src, global_batch=8)
        _train(engine, cfg, topo, range(SAVED_AT))
        _save(engine, cfg, topo, tmp / src)
        _close(_resumed(tmp / src, world, 1, 1, 1, impl=dst), want, TOL, f"{src} -> {dst}")


@pytest.fixture(scope="module")
def refs() -> dict:
    """Plain torch runs of every (global batch, micro-batch) the tests use (one thread: two
    threads on a shared, loaded CPU made these tiny runs up to 50x slower)."""
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for gb, micro in ((8, 4), (8, 1), (16, 4), (16, 1), (8, 2)):
            out[(gb, micro)] = reference_run(make_config(micro=micro, global_batch=gb))
    finally:
        torch.set_num_threads(threads)
    return out


def test_dp2_fp32_bf16_overlap_memory_fused_resume(refs, tmp_path):
    run_world(2, _worker_dp2, refs, tmp_path)


class _NoSampler:
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _state(engine, cfg, topo) -> TrainingState:
    return TrainingState(engine, cfg, topo, _NoSampler())  # type: ignore[arg-type]


def _save(engine, cfg, topo, path: Path) -> None:
    """Save the training state; impl=distributed must write only what each rank owns (its
    full_state, which all-gathers a bucket over DP, is made to fail) from every DP rank."""
    state = _state(engine, cfg, topo)
    state.step = SAVED_AT
    distributed = cfg.optim.impl == "distributed"
    if distributed:
        def gather(*_):
            raise AssertionError("the distributed optimizer's save gathered state")
        engine.optimizer.full_state = gather
    save_pieces(state.pieces, path, write_json=topo.rank == 0)
    dist.barrier()
    if distributed:
        del engine.optimizer.full_state
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            index = json.loads((path / "optim" / key / "pieces.index.json").read_text())
            writers = {f.rsplit("-dp", 1)[1] for f in index["files"]}
            assert len(writers) == topo.grid.dp, f"{key}: files of DP ranks {writers}"


def _resumed(path: Path, world: int, tp: int, pp: int, gas: int, impl: str = "distributed",
             sp: bool = False, bytes_read: bool = False) -> list[float]:
    """Losses of the steps after SAVED_AT of a run resumed from ``path`` (global batch 8);
    ``bytes_read``: check that the optimizer pieces read are this rank's 1/dp of the state."""
    engine, cfg, topo = _engine(world, tp, pp, gas, impl=impl, global_batch=8, sp=sp)
    with _counting_reads() as got:
        load_pieces(_state(engine, cfg, topo).pieces, path)
    if bytes_read:
        _check_bytes_read(got, engine, topo, f"{path.name} -> ({tp}, {pp}, {topo.grid.dp})")
    return [x[0] for x in _train(engine, cfg, topo, range(SAVED_AT, STEPS))]


@contextmanager
def _counting_reads():
    """Bytes of optimizer state read out of piece files ("data") and of piece files opened
    (each is checksummed whole before its first read: "files")."""
    got = {"data": 0, "files": 0}
    read, verify = PieceReader.read, pieces_index.verify_file

    def counted_read(self, name, box):
        out = read(self, name, box)
        got["data"] += out.numel() * out.element_size()
        return out

    def counted_verify(path, *args, **kwargs):
        got["files"] += Path(path).stat().st_size
        return verify(path, *args, **kwargs)
    PieceReader.read, pieces_index.verify_file = counted_read, counted_verify
    try:
        yield got
    finally:
        PieceReader.read, pieces_index.verify_file = read, verify


def _check_bytes_read(got: dict[str, int], engine, topo, what: str) -> None:
    """A distributed resume reads this rank's 1/dp of its (tp, pp) slice's state (3 fp32
    tensors per parameter), not the whole slice; the bytes go to the report on rank 0."""
    share = 3 * 4 * sum(p.numel() for p in engine.module.parameters()) / topo.grid.dp
    ratio = got["data"] / share
    if topo.rank == 0:
        print(f"{what}: read {got['data']} bytes of state, {ratio:.3f} x the 1/dp share; "
              f"opened {got['files']} bytes of piece files", flush=True)
    assert 0.95 <= ratio <= 1.01, f"{what}: read {got['data']} bytes, 1/dp share {share:.0f}"


def _worker_3d(rank: int, world: int, refs: dict, ckpt: Path, out: Path) -> None:
    init_distributed(torch.device("cpu"))
    _fp32(world, 2, 2, refs, sp=True)
    engine, cfg, topo = _engine(world, 2, 2, 1, sp=True)
    _train(engine, cfg, topo, range(SAVED_AT))
    _save(engine, cfg, topo, ckpt)
    cont = [x[0] for x in _train(engine, cfg, topo, range(SAVED_AT, STEPS))]
    again = _resumed(ckpt, world, 2, 2, 1, sp=True, bytes_read=True)
    assert again == cont, f"same-layout resume is not bit-exact: {again} vs {cont}"
    if rank == 0:
        out.write_text(json.dumps(cont))
    _bf16(world, 2, 2)


@pytest.fixture(scope="module")
def saved_3d(refs, tmp_path_factory) -> tuple[Path, list[float]]:
    """The (2,2,2)+SP launch: fp32 parity, a checkpoint after 2 steps, same-layout resume, bf16."""
    root = tmp_path_factory.mktemp("dist3d")
    run_world(8, _worker_3d, refs, root / "ckpt", root / "losses.json")
    return root / "ckpt", json.loads((root / "losses.json").read_text())


def test_3d_fp32_bf16_same_layout_resume(saved_3d):
    assert len(saved_3d[1]) == STEPS - SAVED_AT


def _worker_dp4(rank: int, world: int, refs: dict, ckpt: Path, cont: list[float],
                tmp: Path) -> None:
    init_distributed(torch.device("cpu"))
    check_every_layout(world)  # grad_norm_cases: the norm against a float64 oracle
    for tp, pp, recompute in ((1, 1, False), (2, 1, False), (1, 2, True)):
        _fp32(world, tp, pp, refs, ckpt=recompute)
    # SP shards re-gathered in backward, selective recomputation and the deferred parameter
    # all-gather together (tp 2 x dp 2)
    _fp32(world, 2, 1, refs, sp=True, ckpt="selective")
    _weights(world, 2, 1)
    _memory(world, 1, 1, "bf16", 2)   # dp 4
    _memory(world, 2, 2, "bf16", 2)   # dp 1
    for tp, pp, gas in ((1, 1, 1), (2, 2, 2)):  # (2,2,2) -> (1,1,4) and (2,2,1)
        _close(_resumed(ckpt, world, tp, pp, gas, bytes_read=True), cont, TOL,
               f"(2,2,2) -> ({tp},{pp})")
    # impl=distributed -> impl=deepspeed, and impl=deepspeed -> impl=distributed
    _close(_resumed(ckpt, world, 1, 1, 1, impl="deepspeed"), cont, TOL, "distributed -> ds")
    engine, cfg, topo = _engine(world, 1, 1, 1, impl="deepspeed", global_batch=8)
    _train(engine, cfg, topo, range(SAVED_AT))
    _save(engine, cfg, topo, tmp / "ds")
    _close(_resumed(tmp / "ds", world, 1, 1, 1), refs[(8, 2)][0][SAVED_AT:], TOL,
           "deepspeed -> distributed")


def test_dp4_layouts_resharded_resume_memory(refs, saved_3d, tmp_path):
    ckpt, cont = saved_3d
    run_world(4, _worker_dp4, refs, ckpt, cont, tmp_path)


def test_cli_bf16_resume_is_bit_exact(token_files, tmp_path):
    """Through the real entry point (megallama.train under torchrun, the Trainer's crash-safe
    checkpoint writer): bf16 at dp 2 with optim.impl=distributed, resumed from step 3 of a run,
    gives that run's losses exactly."""
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    common = ("trainer.precision=bf16", "optim.impl=distributed", "parallel.zero_stage=0",
              "optim.bucket_mb=0.05")
    proc = run(token_files, ref, 2, *common, "trainer.save_interval=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = ref / "checkpoints" / "step_00000003"
    assert (saved / "optim" / "fp32" / "pieces.index.json").is_file()
    proc = run(token_files, out, 2, *common, f"trainer.resume={saved}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(out) == losses(ref)[3:]
