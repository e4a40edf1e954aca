"""Layout planner: per-GPU memory of every TP x PP x DP layout, and its pipeline bubble.

``megallama-plan model=llama2_70b gpus=512`` lists each candidate layout with the memory of its
worst pipeline stage split into weights, gradients, fp32 master weights, Adam moments, activations,
logits, optimizer-step buffers and a fixed overhead, so a layout is chosen before a job is queued
rather than by trial and OOM. Every formula (and what DeepSpeed keeps on each optimizer path) is
derived in docs/PLANNER.md. The module imports neither torch nor DeepSpeed so it starts instantly
on a login node; the three rules it mirrors (``check_tp_layout``, ``padded_vocab_size``,
``layer_costs``) and DeepSpeed's stage partitioner are pinned to the originals by tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from megallama.config import PRESETS, ConfigError, ModelConfig, preset

GIB = 1024**3
DS_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size / MEMORY_OPT_ALLREDUCE_SIZE (elements)
DEFAULT_OVERHEAD_GIB = {"cuda": 3.0, "cpu": 0.0}
ELEMENT = {"bf16": 2, "fp32": 4}
PARTITION_METHODS = ("balanced", "uniform", "parameters")


@dataclass(frozen=True)
class Layout:
    """A parallel layout: ``tp * pp * dp`` GPUs, ``micro_batch`` sequences per micro-batch."""

    tp: int
    pp: int
    dp: int
    micro_batch: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass
class MemoryEstimate:
    """Bytes per GPU on the worst pipeline stage; ``total`` is the peak over the step (see
    :func:`estimate`), ``bubble`` the idle fraction of 1F1B, ``tp_comm`` the bytes each GPU sends
    in tensor-parallel collectives per optimizer step (busiest stage)."""

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

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(out.pop("layout"), fits=self.fits)
        return out


# ---- rules mirrored from the trainer (tests pin them to the originals) -----------------------
def check_tp(cfg: ModelConfig, tp: int) -> None:
    """megallama.model.llama.check_tp_layout: heads, KV heads and FFN width must split over tp."""
    kv = cfg.n_kv_heads
    if cfg.n_heads % tp:
        raise ConfigError(f"tp={tp} does not divide n_heads={cfg.n_heads}")
    if (tp <= kv and kv % tp) or (tp > kv and tp % kv):
        raise ConfigError(f"tp={tp} does not divide n_kv_heads={kv} (nor is a multiple of it)")
    if cfg.ffn_hidden_dim % tp:
        raise ConfigError(f"tp={tp} does not divide the FFN width {cfg.ffn_hidden_dim}")


def padded_vocab(cfg: ModelConfig, tp: int) -> int:
    """megallama.parallel.layers.padded_vocab_size: vocabulary rounded up to a multiple of tp."""
    return -(-cfg.vocab_size // tp) * tp


def layer_costs(cfg: ModelConfig, seq_len: int, names: list[str]) -> list[int]:
    """megallama.engine.pipeline.layer_costs: forward FLOPs per token, the stage-balancing weight."""
    d, hd = cfg.dim, cfg.head_dim
    block = 2 * (2 * d * cfg.n_heads * hd + 2 * d * cfg.n_kv_heads * hd + 3 * d * cfg.ffn_hidden_dim)
    block += 4 * seq_len * cfg.n_heads * hd // 2
    head = 2 * d * cfg.vocab_size + 5 * cfg.vocab_size
    cost = {"tok_embeddings": max(1, block // 50), "norm": max(1, block // 100), "output": head}
    return [cost.get(n, block) for n in names]


def partition_uniform(n: int, parts: int) -> list[int]:
    """deepspeed.runtime.utils.partition_uniform: stage start indices (plus the end)."""
    if n <= parts:
        return [min(p, n) for p in range(parts + 1)]
    chunk, residual = divmod(n, parts)
    return [p * chunk + min(p, residual) for p in range(parts + 1)]


def partition_balanced(weights: list[int], parts: int) -> list[int]:
    """deepspeed.runtime.utils.partition_balanced (same dynamic programme and tie-breaking: the
    split minimising max - min stage weight), in plain Python because DeepSpeed's numpy-scalar loop
    takes ~1 s for 80 stages."""
    n, inf = len(weights), math.inf
    if n <= parts:
        return partition_uniform(n, parts)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    hi = [[inf] * (parts + 1) for _ in range(n + 1)]
    lo = [[inf] * (parts + 1) for _ in range(n + 1)]
    cost = [[inf] * (parts + 1) for _ in range(n + 1)]
    pos = [[0] * (parts + 1) for _ in range(n + 1)]
    hi[0][0] = cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, parts) + 1):
            for k in range(i):
                seg = prefix[i] - prefix[k]
                top, bottom = max(hi[k][j - 1], seg), min(lo[k][j - 1], seg)
                if cost[i][j] >= top - bottom:
                    cost[i][j], hi[i][j], lo[i][j], pos[i][j] = top - bottom, top, bottom, k
    bounds = [n]
    for j in range(parts, 0, -1):
        bounds.append(pos[bounds[-1]][j])
    return bounds[::-1]


# ---- parameters and stages ---------------------------------------------------------------------
def layer_params(cfg: ModelConfig, tp: int) -> dict[str, int]:
    """Parameters one TP rank holds per layer kind (KV heads replicated when tp > n_kv_heads)."""
    d, hd, f = cfg.dim, cfg.head_dim, cfg.ffn_hidden_dim
    kv_local = max(1, cfg.n_kv_heads // tp) * hd
    block = 2 * d * cfg.n_heads * hd // tp + 2 * d * kv_local + 3 * d * f // tp + 2 * d
    table = padded_vocab(cfg, tp) // tp * d
    return {"tok_embeddings": table, "block": block, "norm": d, "output": table}


def layer_names(cfg: ModelConfig) -> list[str]:
    return ["tok_embeddings", *(f"layers.{i}" for i in range(cfg.n_layers)), "norm", "output"]


@lru_cache(maxsize=256)
def _stage_bounds(cfg_json: str, pp: int, tp: int, seq_len: int, method: str) -> tuple[int, ...]:
    cfg = ModelConfig(**json.loads(cfg_json))
    names = layer_names(cfg)
    if method == "uniform":
        return tuple(partition_uniform(len(names), pp))
    if method == "parameters":
        sizes = layer_params(cfg, tp)
        weights = [sizes.get(n, sizes["block"]) for n in names]
    else:
        weights = layer_costs(cfg, seq_len, names)
    return tuple(partition_balanced(weights, pp))


def stage_bounds(cfg: ModelConfig, pp: int, *, tp: int = 1, seq_len: int = 4096,
                 method: str = "balanced") -> list[int]:
    """Index in :func:`layer_names` where each stage starts, plus the end -- DeepSpeed's ``parts``
    for LlamaPipeline's ``partition_method``."""
    if method not in PARTITION_METHODS:
        raise ConfigError(f"partition_method={method!r}: choose one of {list(PARTITION_METHODS)}")
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    return list(_stage_bounds(key, pp, tp, seq_len, method))


# ---- activations ---------------------------------------------------------------------------------
def block_activation_bytes(cfg: ModelConfig, *, tokens: int, seq_len: int, tp: int,
                           sequence_parallel: bool, element: int) -> int:
    """Bytes one transformer block's autograd graph keeps for one micro-batch of ``tokens``
    (= micro_batch * seq_len) on one TP rank, term by term as docs/PLANNER.md derives them."""
    h, e = cfg.dim, element
    hq, heads, ffn = cfg.n_heads * cfg.head_dim // tp, cfg.n_heads // tp, cfg.ffn_hidden_dim // tp
    ts = tokens // tp if sequence_parallel else tokens  # tokens of the sequence-split region
    return (2 * (4 + e) * ts * h + 2 * 4 * ts   # 2 RMSNorms: fp32 input, normalised, rsqrt
            + 2 * e * tokens * h                # inputs of wq/wk/wv and w1/w3 (full seq under SP)
            + 4 * e * tokens * hq               # SDPA q, k and v (repeated to query heads), output
            + 4 * tokens * heads                # SDPA logsumexp (fp32)
            + 4 * e * tokens * ffn              # SwiGLU: w1 out, silu out, w3 out, product
            + 4 * seq_len * cfg.head_dim)       # RoPE cos/sin tables (fp32)


class States(NamedTuple):
    """Bytes of one optimizer path: ``grads_keep`` lives all step, ``grads_accum`` (the model's
    .grad) from a micro-batch's backward to the optimizer step, ``grads_bucket`` fills during the
    last backward; ``step`` is what the optimizer step adds once activations are gone."""

    weights: int
    grads_keep: int
    grads_accum: int
    grads_bucket: int
    master: int
    adam: int
    step: int


def optimizer_states(p: int, dp: int, precision: str, zero: int, device: str,
                     largest_layer: int = 0, pipeline: bool = False) -> States:
    """What DeepSpeed keeps for ``p`` local parameters on the optimizer path it picks for this
    precision and ZeRO stage (docs/PLANNER.md, "Model states"), with ``dp``-way sharding."""
    shard, cpu = -(-p // dp), device == "cpu"
    touched = min(DS_BUCKET, p)  # CPU: only the pages a bucket copy touches become resident
    adam_tmp = 8 * shard if cpu else 0  # CPU AdamW's sqrt(v) and sqrt(v)/c; fused CUDA has none
    master, adam = 4 * shard, 8 * shard
    if precision == "bf16":
        if zero == 0:
            raise ConfigError("precision=bf16 with zero_stage=0: DeepSpeed refuses bf16 weights with "
                              "fp32 gradient accumulation outside ZeRO; use zero_stage>=1")
        if zero == 1:  # BF16_Optimizer: bf16 .grad plus a full (unsharded) fp32 accumulator
            return States(2 * p, 4 * p, 2 * p, 0, master, adam, 2 * p + adam_tmp)
        weights = 2 * p if zero == 2 else 2 * shard + 2 * largest_layer
        keep, bucket = 4 * shard + (0 if cpu else 2 * DS_BUCKET), 2 * touched if cpu else 0
        return States(weights, keep, 0, bucket, master, adam, bucket + adam_tmp)
    if zero == 0:  # plain AdamW; the DP all-reduce flattens gradient buckets into a copy
        return States(4 * p, 0, 4 * p, 0, 0, 8 * p, 4 * p + max(4 * touched, adam_tmp))
    keep, bucket = (0 if cpu else 4 * DS_BUCKET), (4 * touched if cpu else 0)
    if zero == 1:  # grads -> bucket -> grads_in_partition staging -> flat copy of the partition
        step = bucket + 4 * shard + max(4 * p, 4 * shard + adam_tmp)
        keep += 4 * shard if pipeline else 0  # measured: the PipelineEngine keeps one more
        return States(4 * p, keep, 4 * p, bucket, master, adam, step)
    weights = 4 * p if zero == 2 else 4 * shard + 4 * largest_layer
    return States(weights, keep + 4 * shard, 0, bucket, master, adam, bucket + 4 * shard + adam_tmp)


def bubble_fraction(pp: int, micro_batches: int) -> float:
    """Idle fraction of a 1F1B pipeline: (p - 1) / (m + p - 1)."""
    return (pp - 1) / (micro_batches + pp - 1)


# ---- the estimate ------------------------------------------------------------------------------
def estimate(model_cfg: ModelConfig, layout: Layout, **kwargs: Any) -> MemoryEstimate:
    """The worst stage of :func:`estimate_stages` (same arguments); ``tp_comm`` is the busiest
    stage's."""
    stages = estimate_stages(model_cfg, layout, **kwargs)
    worst = max(stages, key=lambda r: r.total)
    return dataclasses.replace(worst, tp_comm=max(r.tp_comm for r in stages))


def estimate_stages(model_cfg: ModelConfig, layout: Layout, *, seq_len: int, global_batch: int,
                    precision: str = "bf16", zero_stage: int = 1,
                    activation_checkpointing: bool = False, sequence_parallel: bool = False,
                    overhead_bytes: int | None = None, device: str = "cuda",
                    capacity_bytes: int = 80 * GIB,
                    partition_method: str = "balanced") -> list[MemoryEstimate]:
    """Peak memory per GPU of each pipeline stage of ``layout`` training ``model_cfg``: weights +
    master + Adam + persistent grads + overhead + max(forward/backward, optimizer step).

    Forward/backward holds the activations of the micro-batches in flight on the stage under 1F1B
    (stage s: min(pp - s, gas)), the logits working set on the last stage and a backward workspace;
    the transient grads coexist with them when gas exceeds that count, otherwise (gas == in-flight)
    backward replaces activations by grads layer by layer. The step holds all grads plus step
    buffers. Raises ConfigError for a layout the trainer would refuse.
    """
    cfg, lay, e = model_cfg, layout, ELEMENT.get(precision, 0)
    if not e:
        raise ConfigError(f"precision={precision!r}: choose one of {list(ELEMENT)}")
    if device not in DEFAULT_OVERHEAD_GIB:
        raise ConfigError(f"device={device!r}: choose one of {list(DEFAULT_OVERHEAD_GIB)}")
    if min(lay.tp, lay.pp, lay.dp, lay.micro_batch, seq_len) < 1:
        raise ConfigError(f"{lay} / seq_len={seq_len}: every size must be >= 1")
    check_tp(cfg, lay.tp)
    if lay.pp > cfg.n_layers:
        raise ConfigError(f"pp={lay.pp} > n_layers={cfg.n_layers}: each stage needs a block")
    if global_batch < 1 or global_batch % (lay.micro_batch * lay.dp):
        raise ConfigError(f"global_batch={global_batch} is not a multiple of micro_batch*dp = "
                          f"{lay.micro_batch}*{lay.dp}")
    if zero_stage not in (0, 1, 2, 3) or (zero_stage > 1 and lay.pp > 1):
        raise ConfigError(f"zero_stage={zero_stage} with pp={lay.pp}: use 0..3, and 0/1 when pp>1")
    sp = sequence_parallel and lay.tp > 1
    if sp and seq_len % lay.tp:
        raise ConfigError(f"sequence_parallel needs seq_len={seq_len} divisible by tp={lay.tp}")
    if overhead_bytes is None:
        overhead_bytes = int(DEFAULT_OVERHEAD_GIB[device] * GIB)
    gas = global_batch // (lay.micro_batch * lay.dp)
    t, h, tokens = lay.tp, cfg.dim, lay.micro_batch * seq_len
    ts = tokens // t if sp else tokens
    vocab_local = padded_vocab(cfg, t) // t
    sizes = layer_params(cfg, t)
    block = block_activation_bytes(cfg, tokens=tokens, seq_len=seq_len, tp=t,
                                   sequence_parallel=sp, element=e)
    stored = e * ts * h if activation_checkpointing else block  # per block per micro-batch
    workspace = max(2 * e * tokens * cfg.ffn_hidden_dim // t + e * ts * h, 16 * ts * h)
    boundary = e * ts * h  # one [micro, seq(/tp), dim] tensor crossing a stage boundary
    bounds = stage_bounds(cfg, lay.pp, tp=t, seq_len=seq_len, method=partition_method)
    names = layer_names(cfg)
    out = []
    for s in range(lay.pp):
        mine = names[bounds[s]:bounds[s + 1]]
        first, last = s == 0, s == lay.pp - 1
        blocks = sum(n.startswith("layers.") for n in mine)
        params = sum(sizes.get(n, sizes["block"]) for n in mine)
        largest = max((sizes.get(n, sizes["block"]) for n in mine), default=0)
        st = optimizer_states(params, lay.dp, precision, zero_stage, device, largest, lay.pp > 1)
        k = min(lay.pp - s, gas)
        per_mb = blocks * stored
        if not first:  # DeepSpeed keeps each received input until its backward
            per_mb += boundary
        if not last:  # and each output, partitioned over TP ranks when tp > 1
            per_mb += boundary // t
        if "output" in mine:  # final norm, gathered head input
            per_mb += (4 + e) * ts * h + 4 * ts + e * tokens * h
        acts = k * per_mb + (block if activation_checkpointing and blocks else 0)
        acts += (boundary if not first else 0) + (boundary if not last else 0)  # recv buffers
        # cross-entropy: fp32 logits, shifted, exp (+ masked pad shard) / backward: 4 fp32 tensors,
        # plus the head output DeepSpeed's pipeline keeps for backward
        logits = tokens * vocab_local * (16 + (e if lay.pp > 1 else 0)) if "output" in mine else 0
        # backward swaps activations for grads: peak at its start (all activations, plus the
        # accumulated grads of earlier micro-batches) or its end (all grads, one block's
        # activations and the other micro-batches in flight)
        start = acts + logits + workspace + (st.grads_accum if gas > k else 0)
        end = st.grads_accum + st.grads_bucket + (k - 1) * per_mb + block + workspace
        fixed = st.weights + st.master + st.adam + st.grads_keep + overhead_bytes
        total = fixed + max(start, end, st.step)
        per_layer_comm = 8 + (4 if activation_checkpointing else 0)
        comm = (per_layer_comm * blocks + 2 * first + 2 * ("output" in mine)) * e * tokens * h
        out.append(MemoryEstimate(
            lay, activation_checkpointing, sp, gas, s, blocks, params, k, st.weights,
            st.grads_keep + st.grads_accum + st.grads_bucket, st.master, st.adam,
            acts + workspace, logits, st.step, overhead_bytes, total,
            "bwd" if max(start, end) >= st.step else "step", bubble_fraction(lay.pp, gas),
            gas * comm * (t - 1) // t, capacity_bytes))
    return out


def candidate_layouts(model_cfg: ModelConfig, gpus: int, *, global_batch: int,
                      tp: list[int] | None = None, pp: list[int] | None = None,
                      micro_batch: list[int] = (1, 2), max_tp: int = 8) -> list[Layout]:
    """Every (tp, pp, dp, micro) with tp * pp * dp = gpus that the trainer accepts. Values given
    explicitly must each be valid for the model (else ConfigError); the default tp list (powers of
    two up to ``max_tp``, one node) and pp list (1..n_layers) are filtered silently."""
    if gpus < 1:
        raise ConfigError(f"gpus={gpus}: must be >= 1")
    if tp is None:
        tp = [x for x in (1, 2, 4, 8, 16, 32, 64) if x <= max_tp and _tp_ok(model_cfg, x)]
    else:
        for x in tp:
            check_tp(model_cfg, x)
    if pp is None:
        pp = list(range(1, model_cfg.n_layers + 1))
    elif any(x < 1 or x > model_cfg.n_layers for x in pp):
        raise ConfigError(f"pp={pp}: each value must be in 1..n_layers={model_cfg.n_layers}")
    if any(m < 1 for m in micro_batch):
        raise ConfigError(f"micro_batch={list(micro_batch)}: each value must be >= 1")
    out = [Layout(t, p, gpus // (t * p), m) for t in tp for p in pp for m in micro_batch
           if gpus % (t * p) == 0 and global_batch % (m * (gpus // (t * p))) == 0]
    if not out:
        raise ConfigError(
            f"no layout of gpus={gpus} with tp in {tp}, pp in {pp}, micro_batch in "
            f"{list(micro_batch)} has tp*pp dividing gpus and global_batch={global_batch} "
            "divisible by micro_batch*dp; change gpus, global_batch or the lists")
    return out


def _tp_ok(cfg: ModelConfig, tp: int) -> bool:
    try:
        check_tp(cfg, tp)
    except ConfigError:
        return False
    return True


def plan(model_cfg: ModelConfig, gpus: int, *, seq_len: int, global_batch: int,
         tp: list[int] | None = None, pp: list[int] | None = None,
         micro_batch: list[int] = (1, 2), activation_checkpointing: tuple[bool, ...] = (False, True),
         sequence_parallel: tuple[bool, ...] = (False, True), max_tp: int = 8,
         **kwargs: Any) -> list[MemoryEstimate]:
    """:func:`estimate` for every candidate layout x checkpointing x SP choice (SP only where
    tp > 1 divides seq_len), sorted by (does not fit, bubble, total)."""
    rows = []
    for lay in candidate_layouts(model_cfg, gpus, global_batch=global_batch, tp=tp, pp=pp,
                                 micro_batch=micro_batch, max_tp=max_tp):
        sps = sorted({sp and lay.tp > 1 and seq_len % lay.tp == 0 for sp in sequence_parallel})
        for ckpt in activation_checkpointing:
            rows += [estimate(model_cfg, lay, seq_len=seq_len, global_batch=global_batch,
                              activation_checkpointing=ckpt, sequence_parallel=sp, **kwargs)
                     for sp in sps]
    return sorted(rows, key=lambda r: (not r.fits, r.bubble, r.total))


# ---- command line --------------------------------------------------------------------------------
USAGE = """usage: megallama-plan model=NAME|params.json gpus=N [seq_len=4096] [global_batch=1024]
  [gpu_mem_gib=80] [precision=bf16|fp32] [zero_stage=1] [micro_batch=1,2] [tp=1,2,4,8] [pp=...]
  [activation_checkpointing=both|on|off] [sequence_parallel=both|on|off] [device=cuda|cpu]
  [overhead_gib=3 (cuda) / 0 (cpu)] [max_tp=8] [partition_method=balanced] [top=20] [json=PATH]
  [model.FIELD=VALUE ...]   (formulas: docs/PLANNER.md)"""
OPTIONS = ("model", "gpus", "seq_len", "global_batch", "gpu_mem_gib", "precision", "zero_stage",
           "micro_batch", "tp", "pp", "activation_checkpointing", "sequence_parallel", "device",
           "overhead_gib", "max_tp", "partition_method", "top", "json")
_COLUMNS = [("weights", "weights"), ("grads", "gradients"), ("master", "master"),
            ("adam", "optimizer"), ("act", "activations"), ("logits", "logits"), ("step", "step"),
            ("ovh", "overhead")]


def _scalar(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("null", "none"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def load_model(spec: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """A preset name or a Meta params.json / HF config.json path, with ModelConfig overrides."""
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if set(overrides) - known:
        raise ConfigError(f"unknown model field(s) {sorted(set(overrides) - known)}; "
                          f"ModelConfig has {sorted(known)}")
    if spec in PRESETS:
        return preset(spec, **overrides)
    path = Path(spec)
    if not (path.suffix == ".json" and path.is_file()):
        raise ConfigError(f"unknown model {spec!r}: neither a preset ({', '.join(PRESETS)}) nor "
                          "an existing params.json / config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if "hidden_size" in raw:
        return dataclasses.replace(ModelConfig.from_hf_config(raw), **overrides)
    raw.update(overrides)
    if raw.get("vocab_size", -1) <= 0:
        raise ConfigError(f"{path} has vocab_size={raw.get('vocab_size')}: pass the tokenizer's, "
                          "e.g. model.vocab_size=32000")
    return ModelConfig.from_meta_params(raw)


def _parse(argv: list[str]) -> tuple[dict[str, str], dict[str, Any]]:
    opts: dict[str, str] = {}
    overrides: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        if not sep:
            raise ConfigError(f"argument {arg!r}: expected key=value (e.g. gpus=8)")
        if key.startswith("model."):
            overrides[key[len("model."):]] = _scalar(value)
        elif key in OPTIONS:
            opts[key] = value
        else:
            raise ConfigError(f"unknown option {key!r}; known: {', '.join(OPTIONS)}, model.FIELD")
    return opts, overrides


def _number(opts: dict[str, str], key: str, default: Any, kind: type = int) -> Any:
    try:
        return kind(opts[key]) if key in opts else default
    except ValueError:
        raise ConfigError(f"{key}={opts[key]!r}: expected a {kind.__name__}") from None


def _ints(opts: dict[str, str], key: str, default: Any) -> Any:
    try:
        return [int(x) for x in opts[key].split(",")] if key in opts else default
    except ValueError:
        raise ConfigError(f"{key}={opts[key]!r}: expected integers separated by commas") from None


def _switch(opts: dict[str, str], key: str) -> tuple[bool, ...]:
    choices = {"both": (False, True), "on": (True,), "off": (False,), "true": (True,),
               "false": (False,)}
    value = opts.get(key, "both").lower()
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: choose both, on or off")
    return choices[value]


def format_table(rows: list[MemoryEstimate], top: int | None = None) -> str:
    """One line per layout, memory in GiB; layouts over capacity are marked NO."""
    head = (f"{'fits':4} {'tp':>3} {'pp':>3} {'dp':>4} {'mb':>3} {'gas':>5} {'ckpt':>4} {'sp':>3} "
            f"{'stage':>5} |" + "".join(f"{name:>8}" for name, _ in _COLUMNS)
            + f" | {'total':>7} {'peak':>4} {'bubble':>6} {'TP-comm':>8}")
    lines = [head, "-" * len(head)]
    for r in rows[:top] if top else rows:
        lay = r.layout
        lines.append(
            f"{'yes' if r.fits else 'NO':4} {lay.tp:>3} {lay.pp:>3} {lay.dp:>4} "
            f"{lay.micro_batch:>3} {r.gas:>5} {'on' if r.activation_checkpointing else 'off':>4} "
            f"{'on' if r.sequence_parallel else 'off':>3} {r.stage:>5} |"
            + "".join(f"{getattr(r, field) / GIB:8.2f}" for _, field in _COLUMNS)
            + f" | {r.total / GIB:7.2f} {r.peak_phase:>4} {r.bubble:6.3f} {r.tp_comm / GIB:8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``megallama-plan``: print the layout table (and write JSON lines with ``json=PATH``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return 0 if argv else 2
    try:
        opts, overrides = _parse(argv)
        if "model" not in opts or "gpus" not in opts:
            raise ConfigError("model=... and gpus=... are required (e.g. model=llama2_7b gpus=8)")
        cfg = load_model(opts["model"], overrides)
        device = opts.get("device", "cuda")
        gpus, capacity = _number(opts, "gpus", 1), _number(opts, "gpu_mem_gib", 80.0, float)
        overhead = _number(opts, "overhead_gib", DEFAULT_OVERHEAD_GIB.get(device, 0.0), float)
        seq_len, batch = _number(opts, "seq_len", cfg.max_seq_len), _number(opts, "global_batch", 1024)
        if seq_len > cfg.max_seq_len:
            raise ConfigError(f"seq_len={seq_len} > model.max_seq_len={cfg.max_seq_len}")
        precision, zero = opts.get("precision", "bf16"), _number(opts, "zero_stage", 1)
        rows = plan(cfg, gpus, seq_len=seq_len, global_batch=batch, tp=_ints(opts, "tp", None),
                    pp=_ints(opts, "pp", None), micro_batch=_ints(opts, "micro_batch", [1, 2]),
                    activation_checkpointing=_switch(opts, "activation_checkpointing"),
                    sequence_parallel=_switch(opts, "sequence_parallel"),
                    max_tp=_number(opts, "max_tp", 8), precision=precision, zero_stage=zero,
                    overhead_bytes=int(overhead * GIB), device=device,
                    capacity_bytes=int(capacity * GIB),
                    partition_method=opts.get("partition_method", "balanced"))
    except ConfigError as exc:
        print(f"megallama-plan: error: {exc}", file=sys.stderr)
        return 2
    top = _number(opts, "top", 20)
    fitting = sum(r.fits for r in rows)
    print(f"{opts['model']}: {cfg.num_parameters() / 1e9:.2f}B parameters (dim {cfg.dim}, "
          f"{cfg.n_layers} layers, {cfg.n_heads} heads / {cfg.n_kv_heads} KV, FFN "
          f"{cfg.ffn_hidden_dim}, vocab {cfg.vocab_size})")
    print(f"{gpus} x {capacity:g} GiB ({device}), seq_len {seq_len}, global batch {batch} "
          f"({batch * seq_len / 1e6:.2f}M tokens), {precision}, ZeRO-{zero}, overhead "
          f"{overhead:g} GiB; {fitting} of {len(rows)} layouts fit")
    print("GiB per GPU on the worst stage; total = weights+grads+master+adam+ovh + the larger of "
          "act+logits (peak 'bwd') and the optimizer step (peak 'step'); TP-comm GiB/GPU/step")
    print(format_table(rows, top))
    if top and len(rows) > top:
        print(f"... {len(rows) - top} more (top=0 prints all)")
    if "json" in opts:
        with open(opts["json"], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r.to_dict()) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
