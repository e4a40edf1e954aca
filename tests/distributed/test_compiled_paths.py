"""The GPU's compiled code paths, run on a CPU at tp = 2 over gloo, each against its eager
reference, in one launch (each torch.compile costs seconds per process):

* document attention as CUDA runs it -- compiled FlexAttention with a BlockMask built from the
  segments (``MEGALLAMA_ATTENTION=flex``) -- equals the reference (SDPA under the dense mask)
  through TP, SP, pipeline stages and compiled blocks, forward only (torch 2.13 has no
  FlexAttention backward on CPU; its backward is for the GPU run);
* one transformer block at tp 2 + SP compiles whole (``fullgraph=True``: the TP/SP collectives
  are traceable) and equals eager in output, loss and every gradient; ``compile_blocks`` runs
  the whole model (with document attention, above);
* a column- then a row-parallel FP8 linear (torchao, emulated), amax all-reduces included,
  compiled whole by Inductor, equal eager FP8 (both recipes).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from megallama.config import preset
from megallama.engine.pipeline import carrying
from megallama.model.llama import Transformer, TransformerBlock, compile_blocks, layer_defs
from megallama.parallel import mappings
from megallama.parallel.fp8 import convert_to_float8
from megallama.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
    full_tensor,
)
from megallama.parallel.topology import Grid, build_topology
from tests.distributed.harness import run_world

pytestmark = pytest.mark.slow

VOCAB, SEQ = 97, 256
BACKEND = "aot_eager"  # blocks; FlexAttention itself is compiled with Inductor (its CPU kernel)
TOL = 2e-5


def _segments() -> torch.Tensor:
    """Three rows, one per kind of 128-token block pair below the diagonal: one document (a full
    pair), documents crossing the block edge (a partial pair), documents ending at it (empty)."""
    row = torch.zeros(3, SEQ, dtype=torch.long)
    row[1, 100:] = 1
    row[1, 140:] = 2
    row[2, 128:] = 1
    row[2, 200:] = 2
    return row


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(5))


def _logits(model: torch.nn.Module, tp: TensorParallel, segments: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return mappings.gather_from_tp(model(_tokens(), segments=segments), tp.group)


def _staged(cfg, tp: TensorParallel, segments: torch.Tensor) -> torch.Tensor:
    """The logits of two pipeline stages (the pipeline's carrying layers, cut after block 0):
    stage 1 gets the segments as a pipeline receives them, a new tensor."""
    layers = [carrying(d.cls)(*d.args, **d.kwargs) for d in layer_defs(cfg, tp, seed=3)]
    cut = 2
    with torch.no_grad():
        x = (_tokens(), segments)
        for layer in layers[:cut]:
            x = layer(x)
        x = (x[0].clone(), x[1].clone())
        for layer in layers[cut:]:
            x = layer(x)
        return mappings.gather_from_tp(x, tp.group)


def _attention_checks(cfg, topo) -> None:
    segments = _segments()
    for sp in (False, True):
        tp = topo.tensor_parallel(cfg.n_kv_heads, sequence_parallel=sp)
        model = Transformer(cfg, tp, seed=3)
        runs = {}
        for kernel in ("sdpa", "flex"):
            os.environ["MEGALLAMA_ATTENTION"] = kernel
            runs[kernel] = _logits(model, tp, segments.clone())
            runs[f"{kernel} stages"] = _staged(cfg, tp, segments.clone())
        os.environ["MEGALLAMA_ATTENTION"] = "flex"
        compile_blocks(model, backend=BACKEND)
        runs["flex compiled blocks"] = _logits(model, tp, segments.clone())
        for name, got in runs.items():
            diff = (got - runs["sdpa"]).abs().max().item()
            assert diff <= TOL, f"sp={sp} {name}: logits differ from sdpa by {diff:.2e}"
    os.environ.pop("MEGALLAMA_ATTENTION")


def _grads(module: torch.nn.Module, x: torch.Tensor, tp: TensorParallel):
    x = x.detach().requires_grad_()
    out = module(x)
    loss = out.float().square().mean()
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): full_tensor(p.grad, p, tp)
             for n, p in module.named_parameters()}
    module.zero_grad()
    return loss.detach(), out.detach(), x.grad, grads


def _compare(what: str, got, want, tol: float) -> None:
    names = ["loss", "output", "input grad"]
    for name, a, b in zip(names, got[:3], want[:3], strict=True):
        diff = (a - b).abs().max().item()
        assert diff <= tol * max(1.0, b.abs().max().item()), f"{what} {name}: differs by {diff:.2e}"
    for name, g in got[3].items():
        diff = (g - want[3][name]).abs().max().item()
        assert diff <= tol * max(1.0, want[3][name].abs().max().item()), \
            f"{what} grad {name}: differs by {diff:.2e}"


def _block_checks(cfg, topo) -> None:
    tp = topo.tensor_parallel(cfg.n_kv_heads, sequence_parallel=True)
    block = TransformerBlock(0, cfg, tp, seed=3)
    g = torch.Generator().manual_seed(tp.rank)  # SP: each rank holds its own sequence chunk
    x = torch.randn(2, 64 // tp.size, cfg.dim, generator=g)
    eager = _grads(block, x, tp)
    compiled = torch.compile(block, backend=BACKEND, fullgraph=True)
    _compare("fullgraph block", _grads(compiled, x, tp), eager, TOL)


def _fp8_checks(cfg, topo) -> None:
    """A column- then a row-parallel FP8 linear (tensorwise, emulated), their amax all-reduces
    included, compiled whole by Inductor (torchao's casts are fast only compiled), forward and
    backward, equal eager FP8."""
    tp = topo.tensor_parallel(cfg.n_kv_heads, sequence_parallel=True)
    for recipe in ("tensorwise", "rowwise"):
        layers = torch.nn.Sequential(
            ColumnParallelLinear(64, 96, tp, seed=1, key="a", std=0.5),
            RowParallelLinear(96, 64, tp, seed=1, key="b", std=0.5))
        assert convert_to_float8(layers, recipe, tp, emulate=True) == 2
        x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
        eager = _grads(layers, x, tp)
        compiled = torch.compile(layers, backend="inductor", fullgraph=True)
        _compare(f"fp8 {recipe} compiled", _grads(compiled, x, tp), eager, TOL)


def _worker(rank: int, world: int) -> None:
    cfg = preset("tiny_gqa", vocab_size=VOCAB, n_layers=2)
    topo = build_topology(Grid(tp=2, dp=1))
    for check in (_attention_checks, _block_checks, _fp8_checks):
        start = time.time()
        check(cfg, topo)
        if rank == 0:
            print(f"{check.__name__}: {time.time() - start:.1f} s", flush=True)


def test_compiled_paths_equal_eager_at_tp2():
    run_world(2, _worker)
