"""Check a TrainConfig against the world it will run in, before any collective.

:func:`validate` runs on every rank right after the config is composed and before
``init_process_group``'s first collective, DeepSpeed or the model: a bad layout or a missing file
then fails as one :class:`~megallama.config.ConfigError` line that names the option and what to do,
instead of a hang in a collective, a DeepSpeed assertion, or a traceback per rank. Checks are
ordered cheap-first and primary-first: what to train on (``data.train``, ``data.seq_len``), the
loop, W&B and optimizer numbers, the layout, and last the rules that relate options to each other
(evaluation needs validation data), so a config without training data says so instead of
complaining about a consequence. The files on disk are checked after these by
:func:`megallama.data.checks.check_data_files` (:func:`megallama.training.preflight.validate` runs
both).
"""

from __future__ import annotations

import importlib.util
import math

import torch

from megallama.config.grid import Grid
from megallama.config.model_config import ConfigError, ModelConfig, check_tp_layout
from megallama.config.train_config import (
    DataConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    TrainerConfig,
    WandbConfig,
    checkpointing_mode,
)

PRECISIONS = ("fp32", "bf16")
FP8_RECIPES = ("none", "tensorwise", "rowwise")  # megallama.parallel.fp8 (torchao's recipe names)
DEVICES = ("auto", "cpu", "cuda")
NONFINITE = ("skip", "stop")
PARTITION_METHODS = ("balanced", "uniform")
OPTIM_IMPLS = ("deepspeed", "fused", "distributed")
WANDB_MODES = ("disabled", "offline", "online")
PACKINGS = ("concat", "documents", "padded")  # megallama.data.packing
MAX_BUCKET_MB = 1 << 20  # optim.bucket_mb: 1 TiB, above any model's gradients (70B bf16: 130 GiB)


def resolve_optimizer(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Fill in ``optim.impl=auto`` and an unset ``parallel.zero_stage`` (in place; idempotent):
    bf16 training, or zero_stage 0, runs megallama's fused AdamW (ZeRO off): whole at dp = 1
    (``fused``: the path measured on a GPU; at dp = 1 the distributed optimizer shards nothing) and
    sharded over DP at dp > 1 (``distributed``); fp32 training, or an explicit ZeRO stage >= 1,
    runs DeepSpeed's optimizer with ZeRO-1 unless another stage is set. dp is ``world_size`` /
    (tp pp); without ``world_size``: ``parallel.dp`` if set, else that of the initialised
    process group, else 1."""
    o, p = cfg.optim, cfg.parallel
    if o.impl == "auto":
        zero_off = p.zero_stage == 0 or (p.zero_stage is None and cfg.trainer.precision == "bf16")
        if world_size is None and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            world_size = torch.distributed.get_world_size()
        dp = p.dp or (max(1, world_size // max(1, p.tp * p.pp)) if world_size else 1)
        o.impl = ("distributed" if dp > 1 else "fused") if zero_off else "deepspeed"
    if p.zero_stage is None:
        p.zero_stage = 0 if o.impl in ("fused", "distributed") else 1


def fp8_gemms_on_gpu(t: TrainerConfig) -> bool:
    """Whether ``trainer.fp8`` runs real FP8 gemms (``torch._scaled_mm`` on a GPU), not
    torchao's emulation (CPU)."""
    return t.fp8 != "none" and t.device != "cpu" and torch.cuda.is_available()


def resolve_compile_blocks(cfg: TrainConfig) -> None:
    """Fill in ``parallel.compile_blocks=null`` (in place; idempotent): on for FP8 on a GPU
    (torchao's casts are fast only under torch.compile), else off; true/false are kept."""
    if cfg.parallel.compile_blocks is None:
        cfg.parallel.compile_blocks = fp8_gemms_on_gpu(cfg.trainer)


def check_fp8_sizes(cfg: TrainConfig) -> None:
    """``torch._scaled_mm`` takes dimensions that are multiples of 16: every FP8 linear's widths
    on one TP rank, and the tokens of a micro-batch (the inner dimension of the weight-gradient
    gemm; the linears see the whole sequence, under SP too). Only real FP8 gemms (GPU)."""
    if not fp8_gemms_on_gpu(cfg.trainer):
        return
    m, p = cfg.model, cfg.parallel
    sizes = {
        "model.dim": m.dim,
        "per-rank query width n_heads*head_dim/tp": m.n_heads * m.head_dim // p.tp,
        "per-rank KV width": max(1, m.n_kv_heads // p.tp) * m.head_dim,
        "per-rank FFN width ffn_hidden_dim/tp": m.ffn_hidden_dim // p.tp,
        "tokens per micro-batch parallel.micro_batch_size*data.seq_len":
            p.micro_batch_size * cfg.data.seq_len,
    }
    bad = [f"{name} = {size}" for name, size in sizes.items() if size % 16]
    if bad:
        raise ConfigError(
            f"trainer.fp8={cfg.trainer.fp8}: FP8 gemms (torch._scaled_mm) need sizes that are "
            f"multiples of 16, but {', '.join(bad)}; change them (e.g. data.seq_len or "
            "parallel.micro_batch_size), or set trainer.fp8=none")


def validate_options(cfg: TrainConfig, world_size: int) -> Grid:
    """Raise ConfigError on the first inconsistency, the primary one first (see the module
    docstring); return the rank grid for ``world_size``. Resolves ``optim.impl=auto``, the
    ZeRO stage (:func:`resolve_optimizer`) and ``parallel.compile_blocks=null`` first."""
    resolve_optimizer(cfg, world_size)
    resolve_compile_blocks(cfg)
    check_data(cfg.data, cfg.model)
    check_trainer(cfg.trainer)
    check_wandb(cfg.trainer.wandb)
    check_optim(cfg.optim)
    grid = check_parallel(cfg.parallel, cfg.model, cfg.data.seq_len, world_size)
    check_optimizer_impl(cfg.optim, cfg.parallel)
    check_fp8_sizes(cfg)
    check_evaluation(cfg.data, cfg.trainer)
    return grid


def check_trainer(t: TrainerConfig) -> None:
    """Loop lengths, precision and device."""
    if t.steps < 1:
        raise ConfigError(f"trainer.steps={t.steps}: must be >= 1 (optimizer steps to run)")
    if not (math.isfinite(t.epochs) and t.epochs >= 0):
        raise ConfigError(f"trainer.epochs={t.epochs}: must be >= 0 (0: run trainer.steps)")
    if t.log_interval < 1:
        raise ConfigError(f"trainer.log_interval={t.log_interval}: must be >= 1")
    if t.eval_interval < 0:
        raise ConfigError(f"trainer.eval_interval={t.eval_interval}: must be >= 0 (0 disables)")
    if t.eval_iters is not None and t.eval_iters < 1:
        raise ConfigError(
            f"trainer.eval_iters={t.eval_iters}: must be >= 1, or null to evaluate the whole "
            "validation set (trainer.eval_interval=0 disables evaluation)"
        )
    if t.save_interval < 0:
        raise ConfigError(f"trainer.save_interval={t.save_interval}: must be >= 0 (0: at the end)")
    if t.keep_last < 0:
        raise ConfigError(
            f"trainer.keep_last={t.keep_last}: must be >= 0 (0 keeps every checkpoint)")
    if not 0 <= t.seed < 2**63:  # numpy's generators refuse negative seeds
        raise ConfigError(f"trainer.seed={t.seed}: must be in [0, 2**63)")
    if not t.output_dir:
        raise ConfigError("trainer.output_dir is empty: give a directory for logs and checkpoints")
    if t.nonfinite not in NONFINITE:
        raise ConfigError(f"trainer.nonfinite={t.nonfinite!r}: choose one of {list(NONFINITE)}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={t.precision!r}: choose one of {list(PRECISIONS)}")
    if t.device not in DEVICES:
        raise ConfigError(f"trainer.device={t.device!r}: choose one of {list(DEVICES)}")
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device=cuda but no CUDA GPU is visible to this process; "
            "set trainer.device=cpu (or auto) or check CUDA_VISIBLE_DEVICES"
        )
    if t.device != "cpu" and t.precision == "bf16" and torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            raise ConfigError(
                f"trainer.precision=bf16 but {torch.cuda.get_device_name()} has no bf16 support; "
                "set trainer.precision=fp32"
            )
    check_fp8(t)
    check_start(t)


def check_start(t: TrainerConfig) -> None:
    """``trainer.init_from`` with an explicit ``trainer.resume`` checkpoint: the resumed
    checkpoint brings its own weights, so init_from would be ignored without a word; refused.
    ``trainer.resume=auto`` (the default) with init_from is legal: init_from starts the run, and
    a restart resumes the run's own latest checkpoint instead (it wins once there is one)."""
    if t.init_from in (None, "", "none") or t.resume in ("auto", "none", "", None):
        return
    raise ConfigError(
        f"trainer.init_from={t.init_from} with trainer.resume={t.resume}: the resumed checkpoint "
        "brings its own weights, so init_from would be ignored; give only one of them (keep "
        "trainer.resume=auto with init_from: it resumes this run's own checkpoints once saved)")


def check_fp8(t: TrainerConfig) -> None:
    """``trainer.fp8``: a known recipe, bf16 around it, torchao installed (the extra
    ``megallama[fp8]``), and FP8 gemms on the GPU it will run on (CPU runs emulate them)."""
    if t.fp8 not in FP8_RECIPES:
        raise ConfigError(f"trainer.fp8={t.fp8!r}: choose one of {list(FP8_RECIPES)}")
    if t.fp8 == "none":
        return
    if t.precision != "bf16":
        raise ConfigError(
            f"trainer.fp8={t.fp8} needs trainer.precision=bf16 (FP8 matmuls take bf16 "
            f"activations and weights), not {t.precision}; set trainer.precision=bf16")
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(
            f"trainer.fp8={t.fp8} needs torchao, which is not installed: "
            "pip install 'megallama[fp8]', or set trainer.fp8=none")
    if t.device != "cpu" and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
        if capability < (8, 9):
            raise ConfigError(
                f"trainer.fp8={t.fp8} needs FP8 matmuls (compute capability >= 8.9: Ada, Hopper "
                f"or later), but {torch.cuda.get_device_name()} is "
                f"{capability[0]}.{capability[1]}; set trainer.fp8=none")


def check_wandb(w: WandbConfig) -> None:
    """Weights & Biases options, and that the optional ``wandb`` package imports when asked for
    (on every rank: only rank 0 logs, but a missing package must not fail it alone, later)."""
    if w.mode not in WANDB_MODES:
        raise ConfigError(f"trainer.wandb.mode={w.mode!r}: choose one of {list(WANDB_MODES)}")
    if w.mode == "disabled":
        return
    if not w.project:
        raise ConfigError("trainer.wandb.project is empty: name the W&B project to log to")
    try:
        import wandb  # noqa: F401  optional dependency, imported only when W&B logging is asked for
    except Exception as e:  # not installed (ImportError), or a broken install
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"trainer.wandb.mode={w.mode} needs the wandb package, which does not import "
            f"({reason}): pip install 'megallama[wandb]', or set trainer.wandb.mode=disabled"
        ) from None


def check_optim(o: OptimConfig) -> None:
    """Learning-rate schedule and AdamW hyperparameters."""
    if not (math.isfinite(o.lr) and o.lr >= 0):
        raise ConfigError(f"optim.lr={o.lr}: the peak learning rate must be >= 0 (0 scores the "
                          "starting weights without changing them)")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps}: must be >= 0")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(
            f"optim.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1] (final lr = ratio * optim.lr)"
        )
    if o.decay_steps is not None and o.decay_steps <= o.warmup_steps:
        raise ConfigError(
            f"optim.decay_steps={o.decay_steps} <= warmup_steps={o.warmup_steps}: the cosine "
            "would be empty; set decay_steps above warmup_steps or null (= trainer.steps)"
        )
    for name, value in (("beta1", o.beta1), ("beta2", o.beta2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"optim.{name}={value}: must be in [0, 1)")
    if not o.eps > 0:
        raise ConfigError(f"optim.eps={o.eps}: must be > 0")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay={o.weight_decay}: must be >= 0")
    if o.grad_clip < 0:
        raise ConfigError(f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 disables clipping)")


def check_optimizer_impl(o: OptimConfig, p: ParallelConfig) -> None:
    """Which optimizer path runs, and the ZeRO stage it needs."""
    if o.impl not in OPTIM_IMPLS:
        raise ConfigError(f"optim.impl={o.impl!r}: choose one of {['auto', *OPTIM_IMPLS]}")
    if o.impl == "deepspeed" and p.zero_stage == 0:
        raise ConfigError(
            "parallel.zero_stage=0 with optim.impl=deepspeed: use 1, 2 or 3 (ZeRO's optimizer is "
            "what skips steps with non-finite gradients on every rank), or optim.impl=fused or "
            "distributed")
    if o.impl == "fused" and p.zero_stage != 0:
        raise ConfigError(
            f"optim.impl=fused with parallel.zero_stage={p.zero_stage}: the fused optimizer keeps "
            "the whole optimizer state on every rank; set parallel.zero_stage=0 (or use "
            "optim.impl=distributed or deepspeed for state sharded over DP)")
    if o.impl == "distributed" and p.zero_stage != 0:
        raise ConfigError(
            f"optim.impl=distributed with parallel.zero_stage={p.zero_stage}: the distributed "
            "optimizer shards its state over data parallelism itself; set parallel.zero_stage=0")
    if o.impl == "distributed" and not 0 < o.bucket_mb <= MAX_BUCKET_MB:  # nan and inf too
        raise ConfigError(f"optim.bucket_mb={o.bucket_mb}: must be in (0, {MAX_BUCKET_MB}] (MiB "
                          "of gradients per reduce-scatter bucket of optim.impl=distributed; a "
                          "bucket larger than all gradients is one bucket)")


def check_parallel(p: ParallelConfig, model: ModelConfig, seq_len: int, world_size: int) -> Grid:
    """The tp x dp x pp layout, the batch arithmetic and what DeepSpeed accepts."""
    for name in ("tp", "pp"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name}={getattr(p, name)}: must be >= 1")
    if p.dp is not None and p.dp < 1:
        raise ConfigError(f"parallel.dp={p.dp}: must be >= 1 or null (derived from world size)")
    grid = Grid.from_world(world_size, tp=p.tp, pp=p.pp, dp=p.dp)
    if p.micro_batch_size < 1:
        raise ConfigError(f"parallel.micro_batch_size={p.micro_batch_size}: must be >= 1")
    if p.global_batch_size < 1:
        raise ConfigError(f"parallel.global_batch_size={p.global_batch_size}: must be >= 1 "
                          "(samples per optimizer step)")
    per_step = p.micro_batch_size * grid.dp
    if p.global_batch_size % per_step:
        suggestion = max(per_step, p.global_batch_size // per_step * per_step)
        raise ConfigError(
            f"parallel.global_batch_size={p.global_batch_size} is not a multiple of "
            f"micro_batch_size*dp = {p.micro_batch_size}*{grid.dp} = {per_step}; "
            f"set it to e.g. {suggestion}"
        )
    if p.pp > model.n_layers:
        raise ConfigError(
            f"parallel.pp={p.pp} > model.n_layers={model.n_layers}: every pipeline stage needs at "
            "least one transformer block; lower parallel.pp"
        )
    check_tp_layout(model, p.tp)
    if p.sequence_parallel and seq_len % p.tp:
        raise ConfigError(
            f"parallel.sequence_parallel with data.seq_len={seq_len} not divisible by "
            f"tp={p.tp}: choose a seq_len that is a multiple of tp or disable sequence_parallel"
        )
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage}: use 0 (optim.impl=fused or distributed), 1, 2 or 3")
    if p.zero_stage > 1 and p.pp > 1:
        raise ConfigError(
            f"parallel.zero_stage={p.zero_stage} with pp={p.pp}: DeepSpeed refuses ZeRO-2/3 with "
            "pipeline parallelism; use zero_stage 1, or pp=1"
        )
    p.activation_checkpointing = checkpointing_mode(p.activation_checkpointing)
    if p.partition_method not in PARTITION_METHODS:
        raise ConfigError(
            f"parallel.partition_method={p.partition_method!r}: choose one of "
            f"{list(PARTITION_METHODS)}"
        )
    return grid


def check_data(d: DataConfig, model: ModelConfig) -> None:
    """What to train on, as options: training files given, sequence length, blend weights, the
    held-out fraction (the files on disk are checked by
    :func:`megallama.data.checks.check_data_files`)."""
    if not d.train:
        raise ConfigError(
            "data.train is empty: give preprocessed token files, e.g. data.train=[path/prefix] "
            "(the <prefix>.bin/.idx pair written by megallama-preprocess)"
        )
    if d.seq_len < 1:
        raise ConfigError(f"data.seq_len={d.seq_len}: must be >= 1")
    if d.seq_len > model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} > model.max_seq_len={model.max_seq_len}: shorten "
            "data.seq_len or raise model.max_seq_len"
        )
    if d.train_weights is not None:
        if len(d.train_weights) != len(d.train):
            raise ConfigError(
                f"data.train_weights has {len(d.train_weights)} entries but data.train has "
                f"{len(d.train)} prefixes: give one weight per prefix"
            )
        weights = d.train_weights
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(
                f"data.train_weights={list(weights)}: need finite weights >= 0, not all 0"
            )
    if not 0.0 <= d.valid_fraction < 1.0:
        raise ConfigError(f"data.valid_fraction={d.valid_fraction}: must be in [0, 1)")
    if d.packing not in PACKINGS:
        raise ConfigError(f"data.packing={d.packing!r}: choose one of {list(PACKINGS)} "
                          "(concat: pretraining; documents or padded: attention within documents)")


def check_evaluation(d: DataConfig, t: TrainerConfig) -> None:
    """Evaluation needs validation data: a consequence of other options, so checked last."""
    if t.eval_interval > 0 and not d.valid and d.valid_fraction == 0:
        raise ConfigError(
            f"trainer.eval_interval={t.eval_interval} but there is no validation data: set "
            "data.valid, or data.valid_fraction > 0, or trainer.eval_interval=0"
        )


__all__ = [
    "DEVICES",
    "FP8_RECIPES",
    "NONFINITE",
    "PARTITION_METHODS",
    "PRECISIONS",
    "WANDB_MODES",
    "check_data",
    "check_evaluation",
    "check_fp8",
    "check_fp8_sizes",
    "check_optim",
    "check_parallel",
    "check_start",
    "check_trainer",
    "check_wandb",
    "fp8_gemms_on_gpu",
    "resolve_compile_blocks",
    "validate_options",
]
