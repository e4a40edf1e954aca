"""Shared pieces of the engine parity tests: a tiny config, deterministic batches and the plain
single-process torch reference (same init, same data, AdamW, clipping, LR schedule)."""

from __future__ import annotations

import torch

from megallama.config import preset
from megallama.config.train_config import TrainConfig
from megallama.model.llama import Transformer
from megallama.optim.schedule import lr_at, param_groups

VOCAB, SEQ, STEPS = 1001, 16, 5


def make_config(tp=1, pp=1, zero=1, sp=False, micro=2, global_batch=8, clip=0.3) -> TrainConfig:
    """zero=0 selects megallama's fused optimizer (optim.impl=fused), which needs ZeRO off."""
    cfg = TrainConfig()
    cfg.optim.impl = "fused" if zero == 0 else "deepspeed"
    cfg.model = preset("tiny_gqa", vocab_size=VOCAB)
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    cfg.parallel.zero_stage, cfg.parallel.sequence_parallel = zero, sp
    cfg.parallel.micro_batch_size, cfg.parallel.global_batch_size = micro, global_batch
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip = 1e-2, 2, clip
    cfg.trainer.steps, cfg.trainer.seed, cfg.data.seq_len = STEPS, 5, SEQ
    return cfg


def global_batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    seq = torch.randint(0, VOCAB, (size, SEQ + 1), generator=g)
    labels = seq[:, 1:].clone()
    labels[:, :2] = -100  # some ignored positions
    return seq[:, :-1], labels


def rank_micro_batches(step: int, cfg: TrainConfig, dp_rank: int, dp: int):
    tokens, labels = global_batch(step, cfg.parallel.global_batch_size)
    per_rank = cfg.parallel.global_batch_size // dp
    lo = dp_rank * per_rank
    m = cfg.parallel.micro_batch_size
    return [(tokens[i:i + m], labels[i:i + m]) for i in range(lo, lo + per_rank, m)]


def reference_run(cfg: TrainConfig) -> tuple[list[float], list[float]]:
    """Losses and pre-clipping gradient norms of a plain torch run on one process."""
    losses, norms, _ = reference_train(cfg, cfg.trainer.steps)
    return losses, norms


def reference_optimizer(model: Transformer, cfg: TrainConfig):
    """torch AdamW with the run's parameter groups and its LR schedule: the optimizer oracle."""
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model.named_parameters(), o.weight_decay), lr=o.lr,
                            betas=(o.beta1, o.beta2), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_at(s, o, cfg.trainer.steps) / o.lr if o.lr else 0.0)
    return opt, sched


def reference_weights(cfg: TrainConfig, steps: int) -> dict[str, torch.Tensor]:
    """The plain torch run's parameters (global names, unpadded full tensors) after ``steps``
    optimizer steps of the ``cfg.trainer.steps``-step schedule."""
    return reference_train(cfg, steps)[2]


def reference_train(cfg: TrainConfig, steps: int
                    ) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """``steps`` steps of the plain torch run (same init, data, AdamW, clipping and LR schedule
    as the engine): losses, pre-clipping gradient norms and the parameters after the last step."""
    model = Transformer(cfg.model, seed=cfg.trainer.seed)
    opt, sched = reference_optimizer(model, cfg)
    o = cfg.optim
    losses, norms = [], []
    m = cfg.parallel.micro_batch_size
    for step in range(steps):
        tokens, labels = global_batch(step, cfg.parallel.global_batch_size)
        n_micro = tokens.size(0) // m
        opt.zero_grad()
        total = 0.0
        for i in range(0, tokens.size(0), m):
            loss = model.loss(model(tokens[i:i + m]), labels[i:i + m])
            (loss / n_micro).backward()
            total += loss.item() / n_micro
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip).item())
        opt.step()
        sched.step()
        losses.append(total)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    return losses, norms, weights
