"""The TP all-reduces of ONE training step, counted, against the formula; and the same steps' parity
with the one-rank run (issue 24, deliverable 4).

Counted by wrapping ``torch.distributed.all_reduce`` and the functional ``all_reduce`` in the
spawned processes, each call classified by who issued it:

* ``partial``: the sum over a TP (or KV-replica) group of a gradient each rank holds in part --
  SP norm weights, wk/wv when tp > n_kv_heads (megallama.parallel.partial_grads) -- issued by
  ``partial_grads.sum_partial`` (once per step) or by ``copy_to_tp``'s backward on a weight
  gradient (a tensor of < 3 dims; activations are [b, s, h]), which is the per-micro-batch path;
* ``amax``: an FP8 amax MAX-reduction over TP (megallama.parallel.fp8_matmul).

Formula, per step, on one rank of a stage with L blocks (tiny_gqa: L = 4, 2 KV heads), gas
micro-batches: per micro-batch (ZeRO-2/3 of DeepSpeed) ``gas * (SP (2L + 1) + KV 2L)``; once per
step (fused, distributed, DeepSpeed ZeRO-1 fp32 and bf16) one all-reduce per group used: SP -> the
TP group, KV replicas -> the KV group. FP8 tensorwise at tp + SP, per micro-batch: one per column
group in forward (the sequence shard's input amax, cast before the fp8 all-gather; the group's
weight amaxes join it in the first micro-batch, their casts are kept for the step), one per row
linear in forward (input amax; the weight's joins the first) and one per column linear in
backward (grad output): ``gas (2L + 2L + 5L)``, where every micro-batch used to pay ``12L``.

Parity: after 2 fp32 steps (clipping active) loss and grad norm equal the plain one-rank torch run
(engine_cases.reference_train) within 1e-5 relative, every weight within 1e-4 of max |w| (the
tolerance test_updated_weights.py measured for summation order). FP8: gradients of gas micro-batches
inside ``weights_fixed`` (cached casts) are bit-identical to the uncached ones, at tp 2 + SP
(tensorwise; rowwise under full recomputation), and the casts hold ``fp8.weight_cache_bytes``.
Compiled blocks (Inductor, tp 2 + SP, gas 2): the engine casts each weight once per step outside
the graphs (``fp8.step_casts``, one amax all-reduce), 3 steps equal to casting at every use.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from megallama.config import preset
from megallama.engine import Engine
from megallama.model.llama import Transformer
from megallama.parallel import fp8
from megallama.parallel.fp8 import convert_to_float8, load_torchao, weights_fixed
from megallama.parallel.runtime import init_distributed
from megallama.parallel.topology import Grid, build_topology, kv_replicas_for
from tests.distributed.engine_cases import make_config, rank_micro_batches, reference_train
from tests.distributed.harness import run_world
from tests.distributed.test_updated_weights import _full_weights

L = 4  # tiny_gqa blocks
# relative; measured in correct runs (MEGALLAMA_PRINT_DIFFS=1): loss and norm <= 8.8e-7 (fp32 sums
# in another order), weights <= 3.1e-5 (AdamW's 1/sqrt(v) amplifies round-off near zero, see
# test_updated_weights.py). The per-step TP sum left out moves the norm by 1.4e-5.
TOL, WEIGHT_TOL = 3e-6, 1e-4


def _issuer(tensor: torch.Tensor) -> str | None:
    """Which kind of TP reduction this all-reduce is (module docstring), from the call stack."""
    f = sys._getframe(2)
    while f is not None:
        code = f.f_code
        if code.co_name == "sum_partial" and code.co_filename.endswith("partial_grads.py"):
            return "partial"
        if code.co_qualname == "_CopyToTP.backward":
            return "partial" if tensor.dim() < 3 else None
        if code.co_filename.endswith("fp8_matmul.py"):
            return "amax"
        f = f.f_back
    return None


class Count:
    """Wraps the all-reduces; ``counts`` holds (kind, group size) -> calls since ``reset``."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        plain, functional = dist.all_reduce, funcol.all_reduce

        def all_reduce(tensor, *args, **kwargs):
            self._note(tensor, kwargs.get("group", args[1] if len(args) > 1 else None))
            return plain(tensor, *args, **kwargs)

        def all_reduce_functional(tensor, op, group, *args, **kwargs):
            if not torch.compiler.is_compiling():  # run eagerly (a graph's are not seen)
                self._note(tensor, group)
            return functional(tensor, op, group, *args, **kwargs)
        dist.all_reduce, funcol.all_reduce = all_reduce, all_reduce_functional

    def _note(self, tensor: torch.Tensor, group) -> None:
        kind = _issuer(tensor)
        if kind is not None:
            self.counts[kind, dist.get_world_size(group)] += 1

    def reset(self) -> Counter:
        out, self.counts = self.counts, Counter()
        return out


def expected(impl: str, tp: int, sp: bool, gas: int) -> Counter:
    """The formula (module docstring) for tiny_gqa on a stage of all L blocks (pp = 1; at pp > 1
    only the once-per-step impls run, which count the same)."""
    kv = tp // 2 if tp > 2 else 1  # replicas of a KV head
    per_step = impl in ("fused", "distributed", "zero1", "zero1-bf16")
    out: Counter = Counter()
    if sp and tp > 1:
        out["partial", tp] += 1 if per_step else gas * (2 * L + 1)
    if kv > 1:
        out["partial", kv] += 1 if per_step else gas * 2 * L
    return out


def _config(impl: str, tp: int, sp: bool, gas: int, dp: int, pp: int):
    zero = {"fused": 0, "distributed": 0, "zero1": 1, "zero1-bf16": 1, "zero2": 2, "zero3": 3}[impl]
    cfg = make_config(tp=tp, pp=pp, zero=zero, sp=sp, micro=2, global_batch=2 * gas * dp)
    if impl == "distributed":
        cfg.optim.impl, cfg.optim.bucket_mb = "distributed", 0.1
    if impl == "zero1-bf16":
        cfg.trainer.precision = "bf16"
    return cfg


def _layout(count: Count, world: int, impl: str, tp: int, sp: bool, gas: int, pp: int = 1) -> str:
    """Two steps at one layout: per-step counts against the formula; fp32: parity."""
    dp = world // (tp * pp)
    cfg = _config(impl, tp, sp, gas, dp, pp)
    grid = Grid.from_world(world, tp=tp, pp=pp)
    topo = build_topology(grid, kv_replicas_for(cfg.model.n_kv_heads, tp))
    engine = Engine(cfg, topo, torch.device("cpu"))
    losses, norms, want = reference_train(cfg, 2)
    what = f"{impl} tp={tp} pp={pp} dp={dp} sp={sp} gas={gas}"
    count.reset()
    norm_errors = []
    for step in range(2):
        out = engine.train_step(rank_micro_batches(step, cfg, topo.dp_rank, dp))
        got = count.reset()
        assert got == expected(impl, tp, sp, gas), \
            f"{what} step {step}: TP all-reduces {dict(got)}, formula {dict(expected(impl, tp, sp, gas))}"
        if impl == "zero1-bf16":
            assert abs(out.loss - losses[step]) < 2e-2 * losses[step], f"{what}: loss {out.loss}"
            continue
        assert abs(out.loss - losses[step]) <= TOL * losses[step], \
            f"{what} step {step}: loss {out.loss} != one rank's {losses[step]}"
        norm_errors.append(abs(out.grad_norm - norms[step]) / norms[step])
        assert abs(out.grad_norm - norms[step]) <= TOL * norms[step], \
            f"{what} step {step}: grad norm {out.grad_norm} != one rank's {norms[step]} " \
            f"({(out.grad_norm - norms[step]) / norms[step]:+.2e})"
    if impl != "zero1-bf16":
        got = _full_weights(engine, cfg)
        worst = max(((got[n] - want[n]).abs().max().item() / want[n].abs().max().item(), n)
                    for n in got)
        if os.environ.get("MEGALLAMA_PRINT_DIFFS"):  # to re-measure the tolerances
            print(f"{what}: norm {max(norm_errors):.1e}, weights {worst[0]:.1e} ({worst[1]})")
        assert worst[0] <= WEIGHT_TOL, f"{what}: {worst[1]} off by {worst[0]:.2e} after 2 steps"
    dict_counts = dict(expected(impl, tp, sp, gas))
    return f"{what}: {dict_counts} per step"


def _fp8_counts(count: Count, tp: int, gas: int) -> None:
    """FP8 tensorwise at tp + SP, bf16, fused optimizer: amax all-reduces and weight casts of
    one step against the formula; cached casts give bit-identical gradients."""
    cfg = make_config(tp=tp, zero=0, sp=True, micro=2, global_batch=2 * gas)
    cfg.trainer.precision, cfg.trainer.fp8 = "bf16", "tensorwise"
    topo = build_topology(Grid.from_world(tp, tp=tp, pp=1), kv_replicas_for(2, tp))
    engine = Engine(cfg, topo, torch.device("cpu"))
    kernels = load_torchao()
    casts: Counter = Counter()
    cast = kernels._cast

    def counted_cast(t, scale, c, mm, role, axis):
        casts[role.name] += scale is not None
        return cast(t, scale, c, mm, role, axis)
    kernels._cast = counted_cast
    batches = rank_micro_batches(0, cfg, 0, 1)
    count.reset()
    engine.train_step(batches)
    got = count.reset()
    want = gas * 9 * L  # was 5L + 7L gas before the forward gathered fp8 bytes
    what = f"fp8 tensorwise tp={tp} + SP gas={gas}"
    assert got["amax", tp] == want, f"{what}: {got['amax', tp]} amax all-reduces, formula {want}"
    assert casts["WEIGHT"] == 7 * L, f"{what}: {casts['WEIGHT']} weight casts, want {7 * L}"
    kernels._cast = cast
    for recipe, ckpt in (("tensorwise", "none"), ("rowwise", "full")):
        _cached_equals_uncached(cfg.model, engine.tp, recipe, ckpt, batches, f"{what} {recipe}")


def _cached_equals_uncached(model_cfg, tp, recipe: str, ckpt: str, batches, what: str) -> None:
    """The micro-batches' gradients with the per-step weight casts equal (torch.equal) those cast
    afresh at every use, and the casts hold ``fp8.weight_cache_bytes`` per block exactly (a
    model of its own: no optimizer hook takes its gradients). Rowwise also caches the grad-input
    cast; full recomputation reruns the forward in backward."""
    model = Transformer(model_cfg, tp, seed=5, activation_checkpointing=ckpt).to(torch.bfloat16)
    convert_to_float8(model, recipe, tp, emulate=True)
    grads = []
    for cached in (False, True):
        model.zero_grad(set_to_none=True)
        with weights_fixed() if cached else _nothing():
            for tokens, labels in batches:
                model.loss(model(tokens), labels).backward()
            if cached:
                held = sum(w8._data.numel() + 4 * scale.numel()
                           for _, _, roles in fp8._CASTS.entries.values()
                           for scale, w8 in roles.values())
                want = L * fp8.weight_cache_bytes(model_cfg, tp=tp.size, recipe=recipe)
                assert held == want, f"{what}: the weight casts hold {held} B, formula {want}"
        grads.append([p.grad.clone() for p in model.parameters()])
    same = all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert same, f"{what}: gradients with cached weight casts differ from uncached ones"


def _fp8_compiled(count: Count, tp: int) -> str:
    """FP8 tensorwise at tp + SP in compiled blocks (Inductor), fused optimizer, gas 2: per
    step the engine casts each weight once, outside the graphs, with ONE amax all-reduce
    (``fp8.step_casts``), and no graph is compiled after the first step; 3 steps' losses and
    norms, an evaluation after them and the final weights are torch.equal to compiled blocks
    casting at every use (``_fp8_step_casts`` None)."""
    kernels, runs, graphs = load_torchao(), [], []
    cast = kernels._cast
    casts: Counter = Counter()

    def counted_cast(t, scale, c, mm, role, axis):  # eager only: no side effect in a trace
        if not torch.compiler.is_compiling():
            casts[role.name] += scale is not None
        return cast(t, scale, c, mm, role, axis)
    kernels._cast = counted_cast
    for step_casts in (False, True):
        torch._dynamo.reset()
        cfg = make_config(tp=tp, zero=0, sp=True, micro=2, global_batch=4)
        cfg.trainer.precision, cfg.trainer.fp8 = "bf16", "tensorwise"
        cfg.parallel.compile_blocks = True
        engine = Engine(cfg, build_topology(Grid.from_world(tp, tp=tp, pp=1),
                                            kv_replicas_for(2, tp)), torch.device("cpu"))
        if not step_casts:
            engine._fp8_step_casts = None  # the path before: casts inside the graphs
        out = []
        for step in range(3):
            count.reset()
            casts.clear()
            result = engine.train_step(rank_micro_batches(step, cfg, 0, 1))
            out.append((result.loss, result.grad_norm))
            got = count.reset()["amax", tp], casts["WEIGHT"]
            want = (1, 7 * L) if step_casts else (0, 0)
            assert got == want, f"fp8 compiled step_casts={step_casts} step {step}: amax " \
                                f"all-reduces, weight casts outside the graphs {got}, want {want}"
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        assert graphs[-1] == graphs[-3], f"fp8 compiled: graphs per step {graphs[-3:]}"
        out.append(engine.eval_loss(rank_micro_batches(5, cfg, 0, 1)))
        runs.append((out, [p.detach().clone() for p in engine.module.parameters()]))
    kernels._cast = cast
    assert runs[0][0] == runs[1][0], f"fp8 compiled: losses, norms, eval {runs[0][0]} {runs[1][0]}"
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    return f"fp8 compiled tp={tp} + SP: 1 amax all-reduce and {7 * L} weight casts per step " \
           f"outside the graphs; graphs {graphs[-3:]} after steps 1-3; 3 steps equal casting " \
           f"every use: {runs[1][0]}"


@contextmanager
def _nothing():
    yield


def _worker(rank: int, world: int, layouts, fp8_gas) -> None:
    init_distributed(torch.device("cpu"))
    assert preset("tiny_gqa").n_layers == L
    count = Count()
    rows = [_layout(count, world, *layout) for layout in layouts]
    for gas in fp8_gas:
        _fp8_counts(count, world, gas)
    if fp8_gas:
        rows.append(_fp8_compiled(count, world))
    if rank == 0:
        print("\n".join(rows))


@pytest.mark.slow
@pytest.mark.parametrize("world,layouts,fp8_gas", [
    (2, [(impl, 2, True, gas) for impl in ("fused", "distributed", "zero1", "zero2")
         for gas in (1, 2, 4)] + [("zero1-bf16", 2, True, 2), ("zero3", 2, True, 2)], (1, 2)),
    (4, [(impl, 4, False, gas) for impl in ("fused", "distributed", "zero1", "zero2")
         for gas in (1, 2)] + [("fused", 4, True, 2), ("distributed", 2, True, 2),
                               ("zero1", 2, True, 2), ("zero1-bf16", 2, True, 2),
                               ("fused", 2, True, 2, 2), ("zero1", 2, True, 2, 2)], ()),
], ids=["tp2-sp", "tp4-kv"])
def test_step_collectives(world, layouts, fp8_gas):
    run_world(world, _worker, layouts, fp8_gas)
