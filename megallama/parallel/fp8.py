"""FP8 training of the tensor-parallel linears (``trainer.fp8``), through torchao's float8 recipes.

:func:`convert_to_float8` gives every :class:`ColumnParallelLinear` (wq, wk, wv, w1, w3) and
:class:`RowParallelLinear` (wo, w2) of a stage module an FP8 matmul: the three gemms of forward and
backward run on e4m3/e5m2 operands scaled dynamically as torchao's ``Float8LinearConfig`` recipe
says (``tensorwise``: one scale per tensor, e5m2 gradients; ``rowwise``: one scale per row, e4m3
throughout, power-of-two scales). The output head (an ``OutputHead``, a subclass, skipped on
purpose) and the embedding stay bf16, as in torchao's and torchtitan's recipes. Parameters are
untouched -- names, shapes, dtype (the bf16 weight and the fp32 master), TP tags -- so optimizers,
DeepSpeed and checkpoints see exactly what they see without FP8; checkpoints stay bf16/fp32.
On a CPU ``emulate=True`` runs the same casts with fp32 gemms (config validation refuses GPUs
without FP8 gemms, compute capability < 8.9).

**Which scales must agree across TP ranks.** At tp = 1 each scale comes from the amax of the whole
operand (or of a whole row / column). A TP rank holds a shard of some operands, and its local
amax is then not tp = 1's; if ranks scaled with different amaxes, the sum over ranks of the partial
products (row-parallel) or the concatenated output columns (column-parallel) would be quantized
differently from tp = 1. So: *an amax is MAX-reduced over the TP group exactly when the set of
elements it covers crosses the sharded dimension* -- always for a tensorwise scale of a sharded
operand, and for a rowwise scale when its reduced axis is the sharded one. In the gemms' 2-D frame
(input [T, K], weight [N, K], grad output [T, N]):

| layer | operand | split | tensorwise | rowwise: forward gemm | rowwise: backward gemm |
|---|---|---|---|---|---|
| column (N split) | input | no (full on every rank after ``enter``) | local | local | local |
| column | weight | N | MAX | local (per row, over K) | MAX (per k, over N) for grad input |
| column | grad output | N | MAX | -- | MAX (per token, over N) for grad input; local (per column, over T) for grad weight |
| row (K split) | input | K | MAX | MAX (per token, over K) | local (per k, over T) for grad weight |
| row | weight | K | MAX | MAX (per row, over K) | local (per k, over N) for grad input |
| row | grad output | no (identical on every rank) | local | -- | local |

Sequence parallelism adds one reduction: the linears always see the whole sequence (``enter``
all-gathers it before the column-parallel matmuls; the row-parallel output is reduce-scattered and
its gradient all-gathered), but tensorwise casts a column group's input shard before gathering
it (:mod:`megallama.parallel.sequence_linears`), so that input's amax is MAX-reduced over T. Data and pipeline parallelism add nothing either
(each DP rank scales its own micro-batch, as a tp = 1 replica would; each stage converts its own
layers). The amaxes a pass needs reduced go in one all-reduce (a scalar or a row per operand):
tensorwise issues one per column-parallel linear in forward (weight) and one in backward (grad
output; the weight's forward scale is reused), one per row-parallel linear in forward (input and
weight); rowwise one per column-parallel linear in backward and one per row-parallel in forward.
Within a training step (:func:`weights_fixed`, entered by the engine) a weight does not change,
so its cast and the MAX-reduction of its amax happen once, in the first micro-batch (a row
linear's weight amax rides in its input's all-reduce): per step, tensorwise issues ``5 L`` weight
reductions (column) plus, per micro-batch, ``2 L`` (row inputs) and ``5 L`` (column grad outputs)
for ``L`` blocks, where each micro-batch used to issue ``12 L``; weight casts drop from
``14 L`` per micro-batch to ``7 L`` per step (tests/distributed/test_step_collectives.py). Under
SP (eager) a column group's input amax is reduced in every forward, the group's weight amaxes
riding in it: ``2 L + 2 L`` per forward and ``5 L`` per backward, ``9 L`` per micro-batch.
Compiled blocks (``parallel.compile_blocks``) cannot fill a cache from inside a graph, so the
engine casts every weight of the stage before the step's first forward (:func:`step_casts`),
eagerly, with ONE all-reduce for all the weight amaxes that cross a shard, into buffers of each
linear that the graphs take as inputs; the graphs then cast only inputs and gradients
(tests/distributed/test_fp8_step_casts.py: bit-identical to casting at every use).

With these reductions every scale at tp = 2 is bit for bit tp = 1's, and a linear on identical
inputs equals tp = 1 to fp32 round-off (2e-7; without the reductions tensorwise is 2.5e-2 off).
The whole model still is not bit-faithful: tp reorders fp32 sums, and an element within that
round-off of an fp8 rounding midpoint rounds the other way (in fp32 rarely, in bf16 often), so
there tp = 2 and tp = 1 agree within fp8 tolerance (tests/distributed/test_fp8_tp.py).
Rowwise scales are powers of two, so a different scale barely
changes e4m3 values (only in its subnormal range): for rowwise the reductions matter little. One
exception: when tp > n_kv_heads (KV heads replicated over TP ranks), each replica of a wk/wv slice
quantizes its own partial gradient of the slice's output, while tp = 1 quantizes their sum;
quantization does not commute with the sum, so the forward still equals tp = 1 (2e-7 in fp32 at
tp = 4, 2 KV heads) but the gradients agree only within fp8 tolerance (0.04-0.10 relative, the
size of FP8's own error).

The recipe's choice (tensorwise vs rowwise) and the speed-up are GPU measurements
(docs/PERFORMANCE.md, "FP8"); on CPU both only emulate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch import nn

from megallama.config import ModelConfig
from megallama.config.validate import FP8_RECIPES
from megallama.parallel.layers import ColumnParallelLinear, RowParallelLinear, TensorParallel

RECIPES = tuple(r for r in FP8_RECIPES if r != "none")  # ("tensorwise", "rowwise")
# torchao's import warns through these loggers that its CUDA extension libraries do not load
# (always so with a CPU torch): noise for a CPU run, and FP8 does not use those kernels.
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def load_torchao() -> ModuleType:
    """:mod:`megallama.parallel.fp8_matmul` (which imports torchao, the optional extra
    ``megallama[fp8]``), imported here only when FP8 is asked for, without torchao's
    import-time warnings."""
    with _quiet(_NOISY_LOGGERS):
        return importlib.import_module("megallama.parallel.fp8_matmul")


def load_weight_casts() -> ModuleType:
    """:mod:`megallama.parallel.fp8_weight_casts` (the per-step weight casts of compiled blocks;
    torchao, as :func:`load_torchao`)."""
    load_torchao()
    return importlib.import_module("megallama.parallel.fp8_weight_casts")


def float8_config(recipe: str, *, emulate: bool):  # -> torchao.float8.Float8LinearConfig
    """torchao's ``Float8LinearConfig`` of a recipe name (``tensorwise`` or ``rowwise``)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown FP8 recipe {recipe!r}: choose one of {list(RECIPES)}")
    load_torchao()
    from torchao.float8 import Float8LinearConfig  # optional dependency, loaded quietly above
    return dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)


def convert_to_float8(module: nn.Module, recipe: str, tp: TensorParallel, *,
                      emulate: bool) -> int:
    """Give this stage's column- and row-parallel linears FP8 matmuls with TP-reduced scales
    (``recipe`` ``none`` changes nothing); returns how many were converted. ``emulate`` runs the
    gemms in fp32 (CPU, or GPUs without FP8). Call before ``torch.compile`` and before the
    optimizer is built; works with activation checkpointing (the recomputed forward issues the
    same reductions on every rank) and inside a pipeline stage."""
    if recipe == "none":
        return 0
    config = float8_config(recipe, emulate=emulate)
    kernels = load_torchao()
    column = kernels.Float8Matmul(config, kernels.COLUMN, tp.group)
    row = kernels.Float8Matmul(config, kernels.ROW, tp.group)
    converted = 0
    for layer in module.modules():
        # exact types: the output head subclasses ColumnParallelLinear and stays bf16
        if type(layer) is ColumnParallelLinear:
            layer.fp8_matmul = column
        elif type(layer) is RowParallelLinear:
            layer.fp8_matmul = row
        else:
            continue
        layer.fp8_casts = load_weight_casts().StepCasts()  # empty until step_casts() fills it
        converted += 1
    return converted


@contextlib.contextmanager
def step_casts(module: nn.Module | None) -> Iterator[None]:
    """One training step of ``module`` (its weights fixed until the optimizer step): every FP8
    weight of it is cast now, outside any compiled region, with one amax MAX-all-reduce per TP
    group for all of them, into each linear's :class:`~megallama.parallel.fp8_weight_casts.StepCasts`
    buffers, which every forward, recomputed forward and backward of the step -- compiled blocks
    included, which read them as graph inputs -- use instead of casting. On leaving, the casts
    are marked stale: evaluation, generation and the next step's update cast afresh (the next
    step recasts into the same buffers). ``None``, or a module without FP8 linears: nothing."""
    layers = [m for m in module.modules() if getattr(m, "fp8_casts", None) is not None] \
        if module is not None else []
    if layers:
        load_weight_casts().cast_weights(layers)
    try:
        yield
    finally:
        for layer in layers:
            layer.fp8_casts.valid = False


# ---- the weights' casts, once per step -----------------------------------------------------
class _WeightCasts:
    """Per parameter and role, the FP8 weight cast (scale, fp8 copy) made in this step; None
    outside :func:`weights_fixed`. Entries hold the parameter (so its id is not reused) and its
    ``_version`` at the cast (an in-place change invalidates the entry)."""

    entries: dict[int, tuple[nn.Parameter, int, dict[str, Any]]] | None = None


_CASTS = _WeightCasts()


@contextlib.contextmanager
def weights_fixed() -> Iterator[None]:
    """Within this block the weights do not change (one training step's forwards and backwards,
    before its optimizer step): each FP8 weight is cast, and its amax MAX-reduced over TP, once
    -- in the first micro-batch -- and the (bit-identical) cast reused by every later forward,
    recomputed forward and backward, as TransformerEngine's per-step weight cache. Leaving the
    block drops the casts (the optimizer step then changes the weights). Outside it every use
    casts afresh; inside ``torch.compile`` (``parallel.compile_blocks``) the cache is bypassed
    and the casts :func:`step_casts` made before the step are used, else every use casts."""
    if _CASTS.entries is not None:  # nested: the outer block owns the cache
        yield
        return
    _CASTS.entries = {}
    try:
        yield
    finally:
        _CASTS.entries = None


def _caching(weight: torch.Tensor) -> bool:
    return (_CASTS.entries is not None and isinstance(weight, nn.Parameter)
            and not torch.compiler.is_compiling())


def cached_cast(weight: torch.Tensor, role: str) -> Any:
    """The cast of ``weight`` stored for ``role`` in this step (:func:`weights_fixed`), or None."""
    if not _caching(weight):
        return None
    entry = _CASTS.entries.get(id(weight))
    if entry is None or entry[0] is not weight or entry[1] != weight._version:
        return None
    return entry[2].get(role)


def store_cast(weight: torch.Tensor, role: str, cast: Any) -> None:
    """Keep ``weight``'s cast for ``role`` until the end of the step (nothing outside
    :func:`weights_fixed`, or for a tensor that is not the parameter itself)."""
    if not _caching(weight):
        return
    entry = _CASTS.entries.get(id(weight))
    if entry is None or entry[0] is not weight or entry[1] != weight._version:
        entry = _CASTS.entries[id(weight)] = (weight, weight._version, {})
    entry[2][role] = cast


# ---- memory: what the FP8 matmul keeps (the planner's terms, docs/PLANNER.md "FP8") ------------
SCALES_PER_BLOCK = 7 * 2 * 4  # tensorwise: an fp32 input scale and weight scale per linear


def activation_delta_bytes(cfg: ModelConfig, *, tokens: int, tp: int, element: int,
                           recipe: str, sequence_parallel: bool = False) -> int:
    """What FP8 linears change in one block's saved activations (one micro-batch of ``tokens`` on
    one TP rank, ``element`` bytes per bf16 value). Tensorwise keeps each linear's input as its
    own fp8 copy (the forward cast, reused by the grad-weight gemm) instead of a reference to the
    bf16 input it shares with other consumers; rowwise keeps the bf16 input (its grad-weight cast
    scales along the other axis), so it changes nothing. Under ``sequence_parallel`` each group
    (wq/wk/wv, w1/w3) keeps one fp8 copy of its sequence shard instead of the bf16 shard, and
    one input scale, which it cast the shard with before gathering it
    (:mod:`megallama.parallel.sequence_linears`)."""
    if recipe != "tensorwise":
        return 0
    h, e = cfg.dim, element
    hq, ffn = cfg.n_heads * cfg.head_dim // tp, cfg.ffn_hidden_dim // tp
    sp = sequence_parallel and tp > 1
    inputs = (2 - 2 * e) * (tokens // tp) * h if sp else \
        (5 - 2 * e) * tokens * h  # wq/wk/wv, w1/w3: 5 fp8 copies replace 2 bf16 inputs
    return (inputs
            + tokens * hq             # wo: an fp8 copy beside SDPA's output (SDPA keeps that)
            + (1 - e) * tokens * ffn  # w2: an fp8 copy replaces the SwiGLU product
            + SCALES_PER_BLOCK - (3 * 4 if sp else 0))  # SP: 2 input scales for the 5 linears


def cast_workspace_bytes(cfg: ModelConfig, *, tokens: int, tp: int, recipe: str) -> int:
    """Transient bytes of one eager fp8 cast of the largest linear operand (an input, a gradient
    or a weight shard): torchao's cast holds an fp32 copy, then its scaled and its clamped fp32
    copies beside the fp8 result (9 bytes per element at the peak). The per-step weight casts
    that training keeps (:func:`weights_fixed`, :func:`step_casts`) are
    :func:`weight_cache_bytes`."""
    if recipe == "none":
        return 0
    h, ffn, hq = cfg.dim, cfg.ffn_hidden_dim // tp, cfg.n_heads * cfg.head_dim // tp
    return 9 * max(tokens * h, tokens * ffn, tokens * hq, h * ffn)


def weight_cache_bytes(cfg: ModelConfig, *, tp: int, recipe: str) -> int:
    """Bytes one block's FP8 weight casts hold during a training step (eager blocks:
    :func:`weights_fixed`'s cache, freed after the step; compiled blocks: the
    :func:`step_casts` buffers, kept between steps): an fp8 copy of each linear weight shard
    (tensorwise: the forward's,
    reused by backward; rowwise: also the grad-input cast along the other axis, 2 bytes per
    parameter) and its scales (a scalar, or a row / column of fp32 amaxes)."""
    if recipe == "none":
        return 0
    h, hq, f = cfg.dim, cfg.n_heads * cfg.head_dim // tp, cfg.ffn_hidden_dim // tp
    kv = max(1, cfg.n_kv_heads // tp) * cfg.head_dim
    params = h * (2 * hq + 2 * kv + 3 * f)  # wq, wo; wk, wv; w1, w3, w2
    if recipe == "tensorwise":
        return params + 7 * 4
    # rowwise: the forward copy scales each output row (N), the grad-input copy each input column
    # (K); summed over the 7 linears, N + K = 2 hq + 2 kv + 7 h + 3 f
    return 2 * params + 4 * (2 * hq + 2 * kv + 7 * h + 3 * f)
