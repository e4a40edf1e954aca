"""FP8 tensorwise under sequence parallelism all-gathers fp8 bytes in forward
(megallama/parallel/sequence_linears.py, ``fp8_matmul.sharded_input_forward``), at tp 2 + SP
(``tiny`` and ``tiny_gqa`` blocks in bf16) and at tp 4 + SP (``tiny_gqa``: its 2 KV heads
replicated, wk/wv cast at every use), one gloo launch each:

* bit-identical to the path before (``sequence_linears.fp8_gather = False``: all-gather the bf16
  shard, cast the gathered input): ``torch.equal`` of the output, the input gradient and every
  weight gradient of 2 micro-batches, with and without the per-step weight casts
  (``fp8.weights_fixed``), without recomputation, selective and full;
* the bytes a rank sends in the forward all-gathers of a block (``_all_gather_into`` and
  ``dist.all_gather`` wrapped): ``2 e (T/t) h`` before, ``2 (T/t) h`` after (1 byte per element);
  under full recomputation backward's gathers drop by the same ``2 (e - 1) (T/t) h`` (the
  recomputed forward's), otherwise they are unchanged;
* the amax all-reduces one block's forward issues (functional ``all_reduce`` wrapped): before
  ``5 + 2`` with the weights not yet cast this step (one per column weight, one per row linear)
  and ``2`` with them cast (``4`` with replicated KV heads); after ``2 + 2`` either way (one
  per column group: the shard's amax, with the weights' amaxes when they are not yet cast);
* rowwise and bf16 keep the bf16 gather (their bytes unchanged); evaluation (no autograd)
  gathers fp8 too, with the same output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from megallama.config import preset
from megallama.model.llama import TransformerBlock
from megallama.parallel import sequence_linears
from megallama.parallel.fp8 import convert_to_float8, weights_fixed
from megallama.parallel.layers import TensorParallel
from megallama.parallel.topology import Grid, build_topology, kv_replicas_for
from tests.distributed.harness import run_world

pytestmark = pytest.mark.slow

MICRO, SEQ = 2, 64


class _Counted:
    """Bytes this rank sends in all-gathers and the number of functional all-reduces (the FP8
    amax reductions; eager TP collectives use ``dist.*``), while ``on``."""

    def __init__(self) -> None:
        self.on, self.gather_bytes, self.amax = False, 0, 0

    @contextlib.contextmanager
    def wrapped(self) -> Iterator[None]:
        into, listed, reduce = sequence_linears._all_gather_into, dist.all_gather, funcol.all_reduce

        def gather_into(out, shard, *args, **kwargs):  # noqa: ANN001, ANN202
            self.gather_bytes += self.on * shard.numel() * shard.element_size()
            return into(out, shard, *args, **kwargs)

        def gather_list(parts, x, *args, **kwargs):  # noqa: ANN001, ANN202
            self.gather_bytes += self.on * x.numel() * x.element_size()
            return listed(parts, x, *args, **kwargs)

        def all_reduce(*args, **kwargs):  # noqa: ANN202
            self.amax += self.on
            return reduce(*args, **kwargs)
        sequence_linears._all_gather_into, dist.all_gather, funcol.all_reduce = \
            gather_into, gather_list, all_reduce
        try:
            yield
        finally:
            sequence_linears._all_gather_into, dist.all_gather, funcol.all_reduce = \
                into, listed, reduce

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        self.on, self.gather_bytes, self.amax = True, 0, 0
        try:
            yield
        finally:
            self.on = False

    def take(self) -> tuple[int, int]:
        return self.gather_bytes, self.amax


@contextlib.contextmanager
def _fp8_gather(on: bool) -> Iterator[None]:
    real = sequence_linears.fp8_gather
    sequence_linears.fp8_gather = on
    try:
        yield
    finally:
        sequence_linears.fp8_gather = real


def _run(cfg, tp: TensorParallel, mode: str, recipe: str, cached: bool, count: _Counted):
    """Two micro-batches through block 0 (bf16): outputs, input gradients, accumulated weight
    gradients, and per micro-batch (forward gather bytes, forward amax all-reduces, backward
    gather bytes)."""
    block = TransformerBlock(0, cfg, tp, 3, mode).to(torch.bfloat16)
    if recipe != "none":
        convert_to_float8(block, recipe, tp, emulate=True)
    g = torch.Generator().manual_seed(11 + tp.rank)
    outs, figures = [], []
    with weights_fixed() if cached else contextlib.nullcontext():
        for _ in range(2):
            x = torch.randn(MICRO, SEQ // tp.size, cfg.dim, generator=g).bfloat16()
            x.requires_grad_(True)
            with count.counting():
                out = block(x)
            fwd = count.take()
            with count.counting():
                (out.float() * torch.randn(out.shape, generator=g)).sum().backward()
            figures.append((*fwd, count.take()[0]))
            outs += [out.detach(), x.grad]
    return outs, [p.grad for p in block.parameters()], figures


def _same(new, old, what: str) -> None:
    for i, (a, b) in enumerate(zip(new, old, strict=True)):
        diff = (a.float() - b.float()).abs().max().item()
        assert torch.equal(a, b), f"{what}: tensor {i} differs, max |diff| {diff:.3e}, " \
            f"relative {(a.float() - b.float()).norm() / b.float().norm():.2e}"


def _check(cfg, tp: TensorParallel, name: str, count: _Counted, modes: tuple[str, ...]) -> None:
    t, e, shard = tp.size, 2, MICRO * SEQ // tp.size * cfg.dim
    # KV heads replicated over TP ranks (tp > n_kv_heads): wk/wv reach the matmul through
    # copy_to_tp, not as the parameter the step's casts are keyed on, so they are cast every time
    uncached = 2 if tp.kv_group is not None else 0
    for mode in modes:
        for cached in (False, True):
            what = f"{name} t={t}+SP tensorwise {mode} cached={cached}"
            with _fp8_gather(False):
                old = _run(cfg, tp, mode, "tensorwise", cached, count)
            new = _run(cfg, tp, mode, "tensorwise", cached, count)
            _same(new[0], old[0], f"{what}: outputs / input grads")
            _same(new[1], old[1], f"{what}: weight grads")
            for mb, (before, after) in enumerate(zip(old[2], new[2], strict=True)):
                if tp.rank == 0 and mode != "selective":
                    print(f"{what} micro-batch {mb}: forward gather bytes {before[0]:,} -> "
                          f"{after[0]:,}, amax all-reduces {before[1]} -> {after[1]}, "
                          f"backward gather bytes {before[2]:,} -> {after[2]:,}")
                assert (before[0], after[0]) == (2 * e * shard, 2 * shard), (what, before, after)
                weights_cast = cached and mb > 0  # the step's casts, made in micro-batch 0
                assert before[1] == (2 + uncached if weights_cast else 7), (what, mb, before)
                assert after[1] == 4, (what, mb, after)
                saved = 2 * (e - 1) * shard if mode == "full" else 0
                assert before[2] - after[2] == saved, (what, mb, before, after)
    block = TransformerBlock(0, cfg, tp, 3).to(torch.bfloat16)  # evaluation: no autograd
    convert_to_float8(block, "tensorwise", tp, emulate=True)
    x = torch.randn(MICRO, SEQ // t, cfg.dim, generator=torch.Generator().manual_seed(5)).bfloat16()
    with torch.no_grad():
        with _fp8_gather(False):
            old_eval = block(x)
        _same([block(x)], [old_eval], f"{name} tensorwise under no_grad")
    for recipe in ("rowwise", "none"):  # the bf16 gather, as before
        new = _run(cfg, tp, "none", recipe, False, count)
        with _fp8_gather(False):
            old = _run(cfg, tp, "none", recipe, False, count)
        _same(new[0] + new[1], old[0] + old[1], f"{name} {recipe}")
        assert [f[0] for f in new[2]] == [2 * e * shard] * 2, (name, recipe, new[2])


def _worker(rank: int, world: int, names: tuple[str, ...], modes: tuple[str, ...]) -> None:
    count = _Counted()
    with count.wrapped():
        for name in names:
            cfg = preset(name, vocab_size=128)
            topo = build_topology(Grid(tp=world, dp=1),
                                  kv_replicas=kv_replicas_for(cfg.n_kv_heads, world))
            _check(cfg, topo.tensor_parallel(cfg.n_kv_heads, sequence_parallel=True), name,
                   count, modes)


@pytest.mark.parametrize("world,names,modes", [
    (2, ("tiny", "tiny_gqa"), ("none", "selective", "full")),
    (4, ("tiny_gqa",), ("none", "full")),  # 2 KV heads over 4 ranks: wk/wv replicated
], ids=["tp2", "tp4-kv"])
def test_fp8_tensorwise_gathers_fp8_bytes_in_forward(world, names, modes):
    run_world(world, _worker, names, modes)
