"""The training configuration: dataclasses that Hydra fills from conf/ and command-line overrides.

Defaults are the Llama 2 paper's recipe (AdamW 0.9/0.95, eps 1e-5, weight decay 0.1, cosine decay to
10% of peak, gradient clipping 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megallama.config import ConfigError, ModelConfig

CHECKPOINTING = ("none", "selective", "full")
_CHECKPOINTING_BOOLS = {"true": "full", "false": "none"}


def checkpointing_mode(value: object) -> str:
    """``parallel.activation_checkpointing`` as one of :data:`CHECKPOINTING`: true (also
    "True", as YAML/Hydra booleans reach a string field) is ``full``, false is ``none``;
    ConfigError naming the choices for anything else."""
    text = str(value).strip().lower()
    mode = _CHECKPOINTING_BOOLS.get(text, text)
    if mode not in CHECKPOINTING:
        raise ConfigError(f"parallel.activation_checkpointing={value!r}: choose one of "
                          f"{list(CHECKPOINTING)} (true = full, false = none)")
    return mode


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int | None = None  # derived from the world size; set only to assert it
    sequence_parallel: bool = False
    # DeepSpeed ZeRO stage; None: 0 for megallama's optimizers (optim.impl fused / distributed),
    # else 1
    zero_stage: int | None = None
    micro_batch_size: int = 1
    global_batch_size: int = 8
    # none | selective (attention core and SwiGLU product recomputed) | full (every block
    # recomputed from its input); true = full, false = none
    activation_checkpointing: str = "none"
    # torch.compile each transformer block (fast path on GPU); None: on with trainer.fp8 on CUDA
    # (torchao's casts are fast only compiled), else off (resolved in validation)
    compile_blocks: bool | None = None
    # "balanced": stage costs from FLOPs per layer (embedding and head included);
    # "uniform": equal layer counts. Either way every stage holds at least one block.
    partition_method: str = "balanced"


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2000
    decay_steps: int | None = None  # cosine length; None: trainer.steps
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables; always passed to DeepSpeed explicitly
    # auto (default): for bf16 training fused at dp = 1 and distributed at dp > 1, deepspeed for
    # fp32 (or whenever parallel.zero_stage >= 1 is set); deepspeed: torch AdamW wrapped by
    # DeepSpeed's ZeRO / bf16 optimizer (state sharded over DP); fused: megallama's one-pass
    # master-weight AdamW (zero_stage 0; not sharded); distributed: the fused AdamW with its state
    # sharded over DP and bucketed gradient reduce-scatter overlapped with backward (zero_stage 0).
    # See megallama/optim/ and docs/PERFORMANCE.md.
    impl: str = "auto"
    bucket_mb: float = 25.0  # optim.impl=distributed: gradient bucket size (MiB of gradients)


@dataclass
class DataConfig:
    # Preprocessed token files (prefixes written by megallama-preprocess).
    train: list[str] = field(default_factory=list)
    train_weights: list[float] | None = None
    valid: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    seq_len: int = 256
    valid_fraction: float = 0.0  # held-out tail of train when no valid files are given
    # concat: the token stream cut into windows, attention across documents (pretraining);
    # documents: whole documents packed into windows, attention and RoPE positions restart at
    # each document; padded: one document per window, padded (fine-tuning)
    packing: str = "concat"
    loss_mask: bool = True  # use the loss mask written by preprocessing (chat data); false: all tokens


@dataclass
class WandbConfig:
    """Weights & Biases logging beside TensorBoard (``pip install 'megallama[wandb]'``)."""

    mode: str = "disabled"  # disabled | offline (files only; `wandb sync` later) | online
    project: str = "megallama"
    entity: str | None = None  # W&B team or user; None: the account's default
    name: str | None = None  # run name; None: the name of trainer.output_dir
    dir: str | None = None  # W&B writes <dir>/wandb/; None: trainer.output_dir


@dataclass
class TrainerConfig:
    steps: int = 100
    epochs: float = 0.0  # > 0: steps = ceil(epochs * training samples / global_batch_size)
    log_interval: int = 10
    eval_interval: int = 50
    eval_iters: int | None = None  # global batches per evaluation; None: the whole set, once
    eval_at_start: bool = False  # evaluate the starting weights before the first step
    save_interval: int = 0  # 0: save only at the end
    seed: int = 1234
    precision: str = "fp32"  # fp32 | bf16
    fp8: str = "none"  # none | tensorwise | rowwise: FP8 matmuls in the TP linears (needs bf16)
    device: str = "auto"  # auto | cpu | cuda
    output_dir: str = "runs/default"
    nonfinite: str = "skip"  # skip (count the step) | stop
    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True
    save_final: bool = True
    keep_last: int = 3  # complete checkpoints kept; older ones are pruned
    resume: str = "auto"  # auto (latest of this run, if any) | none | PATH
    # weights to start from when the run has no checkpoint of its own to resume (fine-tuning a
    # converted Meta/HF model or another run's checkpoint): model weights only, fresh optimizer
    init_from: str | None = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
