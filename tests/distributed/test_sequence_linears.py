"""Under sequence parallelism the column-parallel linears keep only this rank's sequence shard
and re-gather it in backward (megallama/parallel/sequence_linears.py), in one gloo launch at tp 2:

* saved bytes per block drop by the gathered inputs of wq/wk/wv and w1/w3 (``2 e (T - T/t) h``,
  measured with tests/saved_bytes.py against the old path, which kept the gathered input),
  bf16/fp32 and FP8 tensorwise (whose fp8 copies of the gathered input become one fp8 shard per
  group);
* a block's output, input gradient and every weight gradient equal one rank's within fp32
  round-off (and FP8 equals the old FP8 path within round-off);
* in backward the all-gather of the shard is launched before the grad-input gemms and waited
  after them, and the reduce-scatter of the input gradient is launched before the grad-weight
  gemms (a dispatch mode records every gemm between the collectives' launches and waits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megallama.config import preset
from megallama.model.llama import TransformerBlock
from megallama.parallel import sequence_linears
from megallama.parallel.fp8 import convert_to_float8
from megallama.parallel.layers import TensorParallel, full_tensor
from megallama.parallel.mappings import all_gather_tensor
from megallama.parallel.topology import Grid, build_topology, kv_replicas_for
from megallama.training.planner import block_activation_bytes
from tests.distributed.harness import run_world
from tests.saved_bytes import saved_block_bytes

pytestmark = pytest.mark.slow

TOL = 1e-5  # fp32 round-off: tp 2 + SP vs one rank (measured below 1e-6)
MICRO, SEQ = 2, 64


@contextlib.contextmanager
def _old_path() -> Iterator[None]:
    """The path before: all-gather with TensorParallel.enter and keep the gathered input."""
    real = sequence_linears.keeps_shard
    sequence_linears.keeps_shard = lambda tp: False
    try:
        yield
    finally:
        sequence_linears.keeps_shard = real


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _block_grads(cfg, tp: TensorParallel, x_full: torch.Tensor, fp8: str = "none"):
    """Output (full sequence), input gradient (full) and full weight gradients of block 0."""
    block = TransformerBlock(0, cfg, tp, 3)
    if fp8 != "none":
        convert_to_float8(block, fp8, tp, emulate=True)
    part = x_full.chunk(tp.size, 1)[tp.rank] if tp.sequence_parallel else x_full
    x = part.clone().requires_grad_(True)
    out = block(x)
    g = torch.Generator().manual_seed(1)
    go = torch.randn(out.shape[0], out.shape[1] * (tp.size if tp.sequence_parallel else 1),
                     out.shape[2], generator=g)
    go = go.chunk(tp.size, 1)[tp.rank] if tp.sequence_parallel else go
    (out * go).sum().backward()
    gather = (lambda t: all_gather_tensor(t, 1, tp.group)) if tp.sequence_parallel else \
        (lambda t: t)
    grads = {n: full_tensor(p.grad, p, tp) for n, p in block.named_parameters()}
    return gather(out.detach()), gather(x.grad), grads


def _check_parity(cfg, tp: TensorParallel, what: str) -> None:
    x = torch.randn(MICRO, SEQ, cfg.dim, generator=torch.Generator().manual_seed(2))
    one = _block_grads(cfg, TensorParallel(), x)
    two = _block_grads(cfg, tp, x)
    assert _rel(two[0], one[0]) < TOL, f"{what}: output {_rel(two[0], one[0]):.2e}"
    assert _rel(two[1], one[1]) < TOL, f"{what}: input grad {_rel(two[1], one[1]):.2e}"
    for name, g in one[2].items():
        err = _rel(two[2][name], g)
        assert err < TOL, f"{what}: grad of {name} rel err {err:.2e}"
    # FP8 tensorwise: the re-gathered fp8 bytes are the forward's; equal to the old FP8 path
    new = _block_grads(cfg, tp, x, "tensorwise")
    with _old_path():
        old = _block_grads(cfg, tp, x, "tensorwise")
    for i, name in enumerate(("output", "input grad")):
        assert _rel(new[i], old[i]) < TOL, f"{what} fp8: {name} {_rel(new[i], old[i]):.2e}"
    for name, g in old[2].items():
        assert _rel(new[2][name], g) < TOL, f"{what} fp8: grad of {name}"


def _saved(cfg, tp: TensorParallel, mode: str, dtype: torch.dtype, fp8: str = "none") -> int:
    block = TransformerBlock(0, cfg, tp, 3, mode)
    for p in block.parameters():  # as training casts: parameters only, buffers stay fp32
        p.data = p.data.to(dtype)
    if fp8 != "none":
        convert_to_float8(block, fp8, tp, emulate=True)
    x = torch.randn(MICRO, SEQ // tp.size, cfg.dim, dtype=dtype, requires_grad=True)
    return saved_block_bytes(block, x)


def _check_saved_bytes(cfg, tp: TensorParallel, name: str) -> None:
    """The drop is exactly the two gathered inputs less the two shards, in every mode but full
    (which keeps only the block's input); FP8 tensorwise: five full fp8 copies become two fp8
    shards (all figures printed for the report); the planner's formula is the new figure exactly."""
    t, tokens, h = tp.size, MICRO * SEQ, cfg.dim
    for dtype, fp8 in ((torch.float32, "none"), (torch.bfloat16, "none"),
                       (torch.bfloat16, "tensorwise")):
        e = dtype.itemsize
        for mode in ("none", "selective", "full"):
            if fp8 != "none" and mode != "none":
                continue
            with _old_path():
                before = _saved(cfg, tp, mode, dtype, fp8)
            after = _saved(cfg, tp, mode, dtype, fp8)
            if fp8 == "none":
                want = 0 if mode == "full" else 2 * e * (tokens - tokens // t) * h
            else:  # 5 fp8 copies of the whole input -> 2 fp8 shards; 5 input scales -> 2
                want = (5 * tokens - 2 * tokens // t) * h + 3 * 4
            if tp.rank == 0:
                print(f"saved bytes/block {name} t={t}+SP {dtype} fp8={fp8} {mode}: "
                      f"{before:,} -> {after:,}")
            assert before - after == want, (name, dtype, fp8, mode, before, after, want)
            planned = block_activation_bytes(cfg, tokens=tokens, seq_len=SEQ, tp=t, element=e,
                                             sequence_parallel=True, recompute=mode, fp8=fp8)
            assert after == planned, (name, dtype, fp8, mode, after, planned)


class _Gemms(TorchDispatchMode):
    """Records every matmul (with its output shape) into the shared event list."""

    def __init__(self, events: list) -> None:
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
            self.events.append(("gemm", tuple(out.shape)))
        return out


class _Work:
    def __init__(self, work, events: list, name: str) -> None:  # noqa: ANN001
        self.work, self.events, self.name = work, events, name

    def wait(self) -> bool:
        self.events.append((f"{self.name}_wait", None))
        return self.work.wait()


@contextlib.contextmanager
def _collectives_recorded(events: list) -> Iterator[None]:
    real = sequence_linears._all_gather_into, sequence_linears._reduce_scatter_from

    def launch(fn, name):  # noqa: ANN001, ANN202
        def wrapped(*args, **kwargs):  # noqa: ANN202
            events.append((f"{name}_launch", None))
            return _Work(fn(*args, **kwargs), events, name)
        return wrapped

    sequence_linears._all_gather_into = launch(real[0], "gather")
    sequence_linears._reduce_scatter_from = launch(real[1], "scatter")
    try:
        yield
    finally:
        sequence_linears._all_gather_into, sequence_linears._reduce_scatter_from = real


def _check_event_order(cfg, tp: TensorParallel) -> None:
    """In one block's backward, per group (SwiGLU's, then attention's): gather launched, the
    grad-input gemms ([T, h] outputs), reduce-scatter launched, gather waited, the grad-weight
    gemms ([n, h] outputs), reduce-scatter waited."""
    block = TransformerBlock(0, cfg, tp, 3)
    x = torch.randn(MICRO, SEQ // tp.size, cfg.dim, requires_grad=True)
    out = block(x)
    events: list = []
    with _collectives_recorded(events), _Gemms(events):
        out.square().sum().backward()
    tokens = MICRO * SEQ
    kinds = []
    for kind, shape in events:
        if kind == "gemm":
            shape = (shape[0] * shape[1], shape[2]) if len(shape) == 3 else shape
            if shape == (tokens, cfg.dim):
                kinds.append("grad_input")
            elif shape[1] == cfg.dim and shape[0] != tokens:
                kinds.append("grad_weight")
            else:
                kinds.append("other")
        else:
            kinds.append(kind)
    kinds = [k for k in kinds if k != "other"]
    groups = []
    while "gather_launch" in kinds:
        start = kinds.index("gather_launch")
        end = kinds.index("scatter_wait", start)
        groups.append(kinds[start:end + 1])
        kinds = kinds[end + 1:]
    pattern = [["gather_launch", *["grad_input"] * n, "scatter_launch", "gather_wait",
                *["grad_weight"] * n, "scatter_wait"] for n in (2, 3)]
    if tp.rank == 0:
        print("backward order:", groups)
    assert groups == pattern, f"backward order: {groups}"


def _worker(rank: int, world: int) -> None:
    torch.manual_seed(0)
    for name in ("tiny", "tiny_gqa"):
        cfg = preset(name, vocab_size=128)
        topo = build_topology(Grid(tp=2, dp=1), kv_replicas=kv_replicas_for(cfg.n_kv_heads, 2))
        tp = topo.tensor_parallel(cfg.n_kv_heads, sequence_parallel=True)
        _check_parity(cfg, tp, f"{name} t=2+SP")
        _check_saved_bytes(cfg, tp, name)
    _check_event_order(preset("tiny_gqa", vocab_size=128), tp)


def test_sequence_parallel_linears_keep_their_shard():
    run_world(2, _worker)
