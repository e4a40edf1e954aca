"""Layout planner: per-GPU memory of every TP x PP x DP layout, and its pipeline bubble.

``megallama-plan model=llama2_70b gpus=512`` lists each candidate layout with the memory of its
worst pipeline stage split into weights, gradients, fp32 master weights, Adam moments, activations,
logits, optimizer-step buffers and a fixed overhead, so that a layout is chosen before a job is
queued rather than by trial and OOM. Layout rules, stage cuts, per-rank parameter slices and the
cross-entropy chunk size are imported from the trainer itself (validate.check_parallel,
model.layout.stage_cuts and shard_specs, ...), so the planner cannot accept a layout the trainer
refuses, cut stages differently or size a slice differently. Every formula, and
what DeepSpeed keeps on each optimizer path, is derived (and checked against measurements) in
docs/PLANNER.md. Activations are those of eager blocks (parallel.compile_blocks=false).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from megallama.config import ConfigError, ModelConfig, check_tp_layout
from megallama.config.train_config import ParallelConfig, TrainConfig, checkpointing_mode
from megallama.config.validate import FP8_RECIPES, check_parallel, resolve_optimizer
from megallama.model import layout as model_layout
from megallama.parallel import cross_entropy
from megallama.parallel import fp8 as fp8_linears
from megallama.parallel.layers import padded_vocab_size
from megallama.training import plan_ranking
from megallama.training.state_bytes import (
    ELEMENT,
    dp_comm_bytes,
    optimizer_states,
    tied_grad_bytes,
)

GIB = 1024**3
DEFAULT_OVERHEAD_GIB = {"cuda": 3.0, "cpu": 0.0}


@dataclass(frozen=True)
class Layout:
    """A parallel layout: ``tp * pp * dp`` GPUs, ``micro_batch`` sequences per micro-batch."""

    tp: int
    pp: int
    dp: int
    micro_batch: int = 1


@dataclass
class MemoryEstimate:
    """Bytes per GPU of one pipeline stage. ``total`` is the peak over a training step (see
    :func:`estimate_stages`), so it is not the plain sum of the components; ``bubble`` is the idle
    fraction of 1F1B and ``tp_comm`` / ``dp_comm`` / ``pp_comm`` the bytes a GPU sends per
    optimizer step in TP collectives, DP gradient and weight collectives and pipeline sends."""

    layout: Layout
    activation_checkpointing: bool
    sequence_parallel: bool
    gas: int
    stage: int
    blocks: int
    params: int
    in_flight: int
    weights: int
    gradients: int
    master: int
    optimizer: int
    activations: int
    logits: int
    step: int
    overhead: int
    total: int
    peak_phase: str
    bubble: float
    tp_comm: int
    capacity: int
    dp_comm: int = 0  # bytes a GPU sends per optimizer step in DP gradient / weight collectives
    pp_comm: int = 0  # bytes a GPU sends per optimizer step to its pipeline neighbours
    recompute: str = "none"  # parallel.activation_checkpointing: none | selective | full
    recomputed: float = 0.0  # recomputed FLOPs / useful FLOPs of a step
    extra_compute: float = 0.0  # (1 + recomputed) / (1 - bubble) - 1: the ranking's first key
    exposed_comm: int = 0  # bytes per step of TP + PP + DP sends no computation hides

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(out.pop("layout"), fits=self.fits)
        return out


# ---- parameters and stages ---------------------------------------------------------------------
def layer_names(cfg: ModelConfig) -> list[str]:
    """The trainer's layer list (:func:`megallama.model.layout.layer_names`): stages cut it."""
    return model_layout.layer_names(cfg)


def layer_params(cfg: ModelConfig, tp: int) -> dict[str, int]:
    """Parameters one TP rank holds per layer kind (KV heads replicated when tp > n_kv_heads,
    vocabulary padded to a multiple of tp), summed from the layout's slices."""
    one_block = dataclasses.replace(cfg, n_layers=1)
    out = {"tok_embeddings": 0, "block": 0, "norm": 0, "output": 0}
    for spec in model_layout.shard_specs(one_block, tp):
        kind = model_layout.layer_of(spec.name)
        out["block" if model_layout.is_block(kind) else kind] += math.prod(spec.local_shape())
    return out


def stage_bounds(cfg: ModelConfig, pp: int, *, seq_len: int, method: str = "balanced") -> list[int]:
    """Index in :func:`layer_names` where each stage starts, plus the end: LlamaPipeline's cuts
    (:func:`megallama.model.layout.stage_cuts`)."""
    return model_layout.stage_cuts(cfg, pp, seq_len, method)


# ---- activations -------------------------------------------------------------------------------
def block_activation_bytes(cfg: ModelConfig, *, tokens: int, seq_len: int, tp: int,
                           sequence_parallel: bool, element: int, fp8: str = "none",
                           recompute: str = "none") -> int:
    """Bytes one transformer block's autograd graph keeps for one micro-batch of ``tokens``
    (= micro_batch * seq_len) on one TP rank, term by term as docs/PLANNER.md derives them
    (``fp8``: trainer.fp8, see :func:`megallama.parallel.fp8.activation_delta_bytes`;
    ``recompute``: parallel.activation_checkpointing, none / selective / full)."""
    h, e = cfg.dim, element
    hq, heads, ffn = cfg.n_heads * cfg.head_dim // tp, cfg.n_heads // tp, cfg.ffn_hidden_dim // tp
    hkv = max(1, cfg.n_kv_heads // tp) * cfg.head_dim  # local K/V width (replicated past n_kv)
    ts = tokens // tp if sequence_parallel else tokens  # tokens of the sequence-split region
    if recompute == "full":  # the block's input only, held by the checkpoint
        return e * ts * h
    if recompute == "selective":  # the recomputed regions' inputs, not their insides
        norms = 2 * e * ts * h  # the 2 RMSNorms' inputs
        core = 2 * e * tokens * hq + 2 * e * tokens * hkv  # wq/wk/wv outputs, attention output
        swiglu = 3 * e * tokens * ffn  # w1 out, w3 out, product
    else:
        norms = 2 * (4 + e) * ts * h + 2 * 4 * ts  # 2 RMSNorms: fp32 input, normalised, rsqrt
        # SDPA q, out (query width), k, v (K/V width: GQA in the kernel, no copy); fp32 lse
        core = 2 * e * tokens * (hq + hkv) + 4 * tokens * heads
        swiglu = 4 * e * tokens * ffn  # w1 out, silu out, w3 out, product
    return (norms
            + 2 * e * ts * h  # inputs of wq/wk/wv and w1/w3: under SP the shard (re-gathered)
            + core + swiglu
            + fp8_linears.activation_delta_bytes(cfg, tokens=tokens, tp=tp, element=e, recipe=fp8,
                                                 sequence_parallel=sequence_parallel))
    # (RoPE cos/sin are slices of a per-block fp32 buffer, 4 * max_seq_len * head_dim bytes: not
    # activations, and < 0.1% of a block's weights)


def logits_bytes(cfg: ModelConfig, *, tokens: int, tp: int, element: int, pipeline: bool) -> int:
    """Peak of the output head's logits and the chunked vocab-parallel cross-entropy: the logits
    (saved for backward), their gradient (backward), one or two fp32 chunks in flight, and under
    the PipelineEngine the previous
    micro-batch's logits, which its output buffer still holds."""
    vocab = padded_vocab_size(cfg.vocab_size, tp) // tp
    padded = padded_vocab_size(cfg.vocab_size, tp) > cfg.vocab_size  # the last rank masks a copy
    rows = max(hi - lo for lo, hi in cross_entropy._chunks(tokens, vocab))
    chunk = 4 * rows * vocab
    held = element * tokens * vocab
    forward = (1 + pipeline) * held + 2 * chunk
    backward = (2 + pipeline) * held + (1 + (element != 4 or padded)) * chunk
    return max(forward, backward)


def bubble_fraction(pp: int, micro_batches: int) -> float:
    """Idle fraction of a 1F1B pipeline: (p - 1) / (m + p - 1)."""
    return (pp - 1) / (micro_batches + pp - 1)


# ---- the estimate ------------------------------------------------------------------------------
def estimate(model_cfg: ModelConfig, layout: Layout, **kwargs: Any) -> MemoryEstimate:
    """The worst stage of :func:`estimate_stages` (same arguments), with the busiest stage's
    ``tp_comm``, ``dp_comm``, ``pp_comm`` and ``exposed_comm`` (each its own maximum)."""
    stages = estimate_stages(model_cfg, layout, **kwargs)
    worst = max(stages, key=lambda r: r.total)
    return dataclasses.replace(worst, tp_comm=max(r.tp_comm for r in stages),
                               dp_comm=max(r.dp_comm for r in stages),
                               pp_comm=max(r.pp_comm for r in stages),
                               exposed_comm=max(r.exposed_comm for r in stages))


def resolved_optimizer(precision: str, zero_stage: int | None, optim_impl: str,
                       layout: Layout) -> tuple[int, str]:
    """(ZeRO stage, optim.impl) that the trainer runs at ``layout``, resolved by the trainer's own
    rule (:func:`megallama.config.validate.resolve_optimizer`): ``auto`` with bf16 or ZeRO off is
    ``fused`` at dp = 1 and ``distributed`` at dp > 1, else DeepSpeed's (``deepspeed``); an
    unset ``zero_stage`` is 0 for megallama's optimizers, else 1."""
    cfg = TrainConfig()
    cfg.trainer.precision, cfg.optim.impl = precision, optim_impl
    cfg.parallel = ParallelConfig(tp=layout.tp, pp=layout.pp, dp=layout.dp, zero_stage=zero_stage)
    resolve_optimizer(cfg)
    return cfg.parallel.zero_stage, cfg.optim.impl


def estimate_stages(model_cfg: ModelConfig, layout: Layout, *, seq_len: int, global_batch: int,
                    precision: str = "bf16", zero_stage: int | None = 1,
                    activation_checkpointing: bool | str = False, sequence_parallel: bool = False,
                    overhead_bytes: int | None = None, device: str = "cuda",
                    capacity_bytes: int = 80 * GIB,
                    partition_method: str = "balanced",
                    optim_impl: str = "fused", fp8: str = "none") -> list[MemoryEstimate]:
    """Peak bytes per GPU of every pipeline stage of ``layout`` training ``model_cfg``.

    total = weights + master + Adam + persistent grads + overhead + the largest of: the start of a
    backward (activations of the min(pp - s, gas) micro-batches in flight on stage s under 1F1B,
    logits on the last stage, a backward workspace, and the accumulated grads when an earlier
    micro-batch already ran backward), the end of a backward (all grads, one block's activations)
    and the optimizer step. Raises ConfigError, with the trainer's message, for any layout that
    megallama.config.validate would refuse. ``optim_impl`` ("fused" or "distributed") picks
    megallama's optimizer where ``zero_stage`` is 0; "auto" (and ``zero_stage`` None) plan what
    the trainer's ``optim.impl=auto`` picks at this layout (:func:`resolved_optimizer`). ``fp8``
    (trainer.fp8) changes the blocks' activations and adds an fp8 cast's transient to the workspace.
    ``activation_checkpointing``: none / selective / full (true = full, false = none).
    """
    mode = checkpointing_mode(activation_checkpointing)
    cfg, lay, e = model_cfg, layout, ELEMENT.get(precision, 0)
    zero_stage, optim_impl = resolved_optimizer(precision, zero_stage, optim_impl, lay)
    if not e or device not in DEFAULT_OVERHEAD_GIB:
        raise ConfigError(f"precision={precision!r} / device={device!r}: choose "
                          f"{' or '.join(ELEMENT)} / {' or '.join(DEFAULT_OVERHEAD_GIB)}")
    par = ParallelConfig(tp=lay.tp, pp=lay.pp, dp=lay.dp, sequence_parallel=sequence_parallel,
                         zero_stage=zero_stage, micro_batch_size=lay.micro_batch,
                         global_batch_size=global_batch, partition_method=partition_method,
                         activation_checkpointing=mode)
    check_parallel(par, cfg, seq_len, lay.tp * lay.pp * lay.dp)
    if fp8 not in FP8_RECIPES:
        raise ConfigError(f"fp8={fp8!r}: choose one of {list(FP8_RECIPES)}")
    if fp8 != "none" and precision != "bf16":
        raise ConfigError(f"fp8={fp8} needs precision=bf16 (as trainer.fp8 does), not {precision}")
    if overhead_bytes is None:
        overhead_bytes = int(DEFAULT_OVERHEAD_GIB[device] * GIB)
    t, h, tokens = lay.tp, cfg.dim, lay.micro_batch * seq_len
    ts = tokens // t if sequence_parallel else tokens
    block = block_activation_bytes(cfg, tokens=tokens, seq_len=seq_len, tp=t,
                                   sequence_parallel=sequence_parallel, element=e, fp8=fp8)
    stored = block_activation_bytes(cfg, tokens=tokens, seq_len=seq_len, tp=t, recompute=mode,
                                    sequence_parallel=sequence_parallel, element=e, fp8=fp8)
    boundary = e * ts * h  # one [micro, seq(/tp), dim] activation crossing a stage boundary
    shape = _StepShape(
        cfg=cfg, layout=lay, element=e, gas=global_batch // (lay.micro_batch * lay.dp),
        tokens=tokens, ts=ts, sizes=layer_params(cfg, t), block=block,
        stored=stored,  # per block per micro-batch
        workspace=max(2 * e * tokens * cfg.ffn_hidden_dim // t + e * ts * h, 16 * ts * h)
        + fp8_linears.cast_workspace_bytes(cfg, tokens=tokens, tp=t, recipe=fp8),
        boundary=boundary,
        sent=boundary // t if t > 1 and not sequence_parallel else boundary,  # pipe_partitioned
        ckpt=mode, sp=sequence_parallel, precision=precision,
        zero_stage=zero_stage, device=device, overhead=overhead_bytes, capacity=capacity_bytes,
        optim_impl=optim_impl, recomputed=plan_ranking.recomputed_fraction(cfg, seq_len, mode),
        regather_element=1 if fp8 == "tensorwise" else e,
        weight_casts=fp8_linears.weight_cache_bytes(cfg, tp=t, recipe=fp8))
    bounds = stage_bounds(cfg, lay.pp, seq_len=seq_len, method=partition_method)
    names = layer_names(cfg)
    return [_stage_estimate(shape, s, names[bounds[s]:bounds[s + 1]]) for s in range(lay.pp)]


@dataclass(frozen=True)
class _StepShape:
    """What every stage of one layout shares: the model, sizes per micro-batch, options."""

    cfg: ModelConfig
    layout: Layout
    element: int
    gas: int
    tokens: int
    ts: int  # tokens per rank between TP regions (tokens / tp under SP)
    sizes: dict[str, int]
    block: int
    stored: int
    workspace: int
    boundary: int
    sent: int
    ckpt: str  # none | selective | full
    sp: bool
    precision: str
    zero_stage: int
    device: str
    overhead: int
    capacity: int
    optim_impl: str = "fused"
    recomputed: float = 0.0  # recomputed FLOPs / useful FLOPs (plan_ranking)
    regather_element: int = 2  # bytes per element SP's backward re-gathers (fp8 tensorwise: 1)
    weight_casts: int = 0  # per block: FP8's per-step weight casts (fp8.weight_cache_bytes)


def _stage_estimate(x: _StepShape, s: int, mine: list[str]) -> MemoryEstimate:
    """Peak bytes of pipeline stage ``s`` holding layers ``mine`` (see :func:`estimate_stages`)."""
    cfg, lay, e, sizes = x.cfg, x.layout, x.element, x.sizes
    t, h, ts, tokens = lay.tp, cfg.dim, x.ts, x.tokens
    first, last = s == 0, s == lay.pp - 1
    blocks = sum(model_layout.is_block(n) for n in mine)
    params = sum(sizes.get(n, sizes["block"]) for n in mine)
    tied_copy = cfg.tie_embeddings and lay.pp > 1 and last  # the last stage's embedding copy
    params += sizes["tok_embeddings"] if tied_copy else 0
    st = optimizer_states(params, lay.dp, x.precision, x.zero_stage, x.device, gas=x.gas,
                          largest_layer=max(sizes.get(n, sizes["block"]) for n in mine),
                          impl=x.optim_impl)
    # a weight's new gradient before it is added to .grad / the fp32 buffer: the head's comes
    # early in backward, the embedding's last, a w1/w2/w3 shard's anywhere
    # the head's table (tied: the embedding's, whose gradient the head's matmul also makes)
    table, w1 = sizes["output"] or sizes["tok_embeddings"], h * cfg.ffn_hidden_dim // t
    fresh_early, fresh = e * max(w1, table * last), e * max(w1, table * (first or last))
    k = min(lay.pp - s, x.gas)
    per_mb = blocks * x.stored + (0 if first else x.boundary) + (0 if last else x.sent)
    if last:  # final RMSNorm and the head's (gathered) input
        per_mb += (4 + e) * ts * h + 4 * ts + e * tokens * h
    # backward of one block recomputes what it did not keep: the whole block under full
    acts = k * per_mb + (x.block if x.ckpt == "full" else x.block - x.stored) \
        + (0 if first else x.sent) \
        + (0 if last else x.sent)
    logits = logits_bytes(cfg, tokens=tokens, tp=t, element=e, pipeline=lay.pp > 1) \
        if last else 0
    start = acts + max(logits, fresh_early) + x.workspace \
        + (st.grads_accum if x.gas > k else 0) + (st.bucket if st.bucket_early else 0)
    end = st.grads_accum + st.bucket + (k - 1) * per_mb + x.block + x.workspace + fresh
    fixed = st.weights + st.master + st.adam + st.grads_keep + x.overhead + blocks * x.weight_casts
    tp_comm, tp_exposed = plan_ranking.tp_comm_bytes(
        gas=x.gas, blocks=blocks, ends=first + last, full=x.ckpt == "full", sp=x.sp,
        tokens=tokens, h=h, tp=t, element=e, regather_element=x.regather_element,
        gather_element=x.regather_element)  # FP8 tensorwise gathers fp8 bytes both ways
    dp_comm = dp_comm_bytes(params, lay.dp, x.precision, x.zero_stage, x.optim_impl)
    pp_comm = x.gas * x.sent * ((not first) + (not last))  # activations out, gradients back
    if cfg.tie_embeddings and lay.pp > 1 and (first or last):  # the tied gradient's sum
        pp_comm += tied_grad_bytes(sizes["tok_embeddings"], lay.dp, x.precision, x.zero_stage,
                                   x.optim_impl, gas=x.gas)
    bubble = bubble_fraction(lay.pp, x.gas)
    exposed = tp_exposed + pp_comm + plan_ranking.exposed_dp_bytes(
        dp_comm, impl=x.optim_impl, zero_stage=x.zero_stage, dp=lay.dp, element=e,
        first_bucket=plan_ranking.first_bucket_elements(cfg, t, mine) if lay.dp > 1 else 0)
    return MemoryEstimate(
        lay, x.ckpt != "none", x.sp, x.gas, s, blocks, params, k, st.weights,
        st.grads_keep + st.grads_accum + st.bucket + fresh, st.master, st.adam,
        acts + x.workspace, logits, st.step, x.overhead, fixed + max(start, end, st.step),
        "bwd" if max(start, end) >= st.step else "step", bubble, tp_comm, x.capacity, dp_comm,
        pp_comm, recompute=x.ckpt, recomputed=x.recomputed,
        extra_compute=plan_ranking.extra_compute(x.recomputed, bubble), exposed_comm=exposed)


def candidate_layouts(model_cfg: ModelConfig, gpus: int, *, global_batch: int,
                      tp: list[int] | None = None, pp: list[int] | None = None,
                      micro_batch: list[int] = (1, 2), max_tp: int = 8) -> list[Layout]:
    """Every (tp, pp, dp, micro) with tp * pp * dp = gpus and global_batch divisible by micro * dp.
    Explicit tp / pp / micro values must each be valid for the model (else ConfigError); the
    default tp list (powers of two up to ``max_tp``: one node) and pp list (1..n_layers) are
    filtered silently."""
    if gpus < 1:
        raise ConfigError(f"gpus={gpus}: must be >= 1")
    if tp is None:
        tp = [x for x in (1, 2, 4, 8, 16, 32, 64) if x <= max_tp and _tp_ok(model_cfg, x)]
    for x in tp:
        check_tp_layout(model_cfg, x)
    if pp is None:
        pp = list(range(1, model_cfg.n_layers + 1))
    if any(x < 1 or x > model_cfg.n_layers for x in pp) or any(m < 1 for m in micro_batch):
        raise ConfigError(f"pp={pp} / micro_batch={list(micro_batch)}: pp must be in "
                          f"1..n_layers={model_cfg.n_layers}, micro_batch >= 1")
    out = [Layout(t, p, gpus // (t * p), m) for t in tp for p in pp for m in micro_batch
           if gpus % (t * p) == 0 and global_batch % (m * (gpus // (t * p))) == 0]
    if not out:
        raise ConfigError(
            f"no layout of gpus={gpus} with tp in {tp}, pp in {pp} and micro_batch in "
            f"{list(micro_batch)} has tp*pp dividing gpus and global_batch={global_batch} "
            "divisible by micro_batch*dp; change gpus, global_batch or the lists")
    return out


def _tp_ok(cfg: ModelConfig, tp: int) -> bool:
    try:
        check_tp_layout(cfg, tp)
    except ConfigError:
        return False
    return True


def plan(model_cfg: ModelConfig, gpus: int, *, seq_len: int, global_batch: int,
         tp: list[int] | None = None, pp: list[int] | None = None,
         micro_batch: list[int] = (1, 2), max_tp: int = 8,
         activation_checkpointing: tuple[bool | str, ...] = ("none", "selective", "full"),
         sequence_parallel: tuple[bool, ...] = (False, True),
         **kwargs: Any) -> list[MemoryEstimate]:
    """:func:`estimate` for every candidate layout x checkpointing x SP choice (SP only where
    tp > 1 divides seq_len), best first by :func:`megallama.training.plan_ranking.rank_key`:
    those that fit, by extra compute time, exposed communication bytes, peak bytes."""
    rows = []
    for lay in candidate_layouts(model_cfg, gpus, global_batch=global_batch, tp=tp, pp=pp,
                                 micro_batch=micro_batch, max_tp=max_tp):
        sps = sorted({sp and lay.tp > 1 and seq_len % lay.tp == 0 for sp in sequence_parallel})
        rows += [estimate(model_cfg, lay, seq_len=seq_len, global_batch=global_batch,
                          activation_checkpointing=ckpt, sequence_parallel=sp, **kwargs)
                 for ckpt in activation_checkpointing for sp in sps]
    return sorted(rows, key=plan_ranking.rank_key)
