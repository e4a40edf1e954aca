"""One training step on DeepSpeed: the 1F1B PipelineEngine when pp > 1, the plain engine when
pp == 1 (so ZeRO-2/3 stay selectable), both over the same layer list and the same TP layers.

DeepSpeed's defaults are never relied on silently: gradient clipping, batch arithmetic, precision,
the fp32 gradient-accumulation dtype and the non-finite-gradient check are always written into
its config. A step whose global gradient norm is not finite is skipped on every rank: by
DeepSpeed's ZeRO optimizer (``optim.impl=deepspeed``, zero_stage >= 1), or by megallama's fused
master-weight AdamW (``optim.impl=fused``, zero_stage 0), which then also does the clipping and the
data-parallel gradient reduction itself.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megallama.config.training import TrainConfig
from megallama.model.llama import Transformer, compile_blocks, layer_defs, make_loss_fn
from megallama.optim.schedule import lr_at, param_groups
from megallama.parallel.topology import Topology

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # tokens [b, s], labels [b, s]


def deepspeed_config(cfg: TrainConfig, dp: int) -> dict:
    p = cfg.parallel
    fused = cfg.optim.impl == "fused"
    return {
        "train_batch_size": p.global_batch_size,
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": p.global_batch_size // (p.micro_batch_size * dp),
        # explicit: DeepSpeed's default is 1.0 (the fused optimizer clips by itself)
        "gradient_clipping": 0.0 if fused else cfg.optim.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        # immediate_grad_update: each bf16 gradient is added into the fp32 buffer as soon as it is
        # ready and then freed, instead of all of them living until the step (2 bytes/param less).
        # With the fused optimizer DeepSpeed sees plain parameters (cast to bf16 by the Engine).
        "bf16": {"enabled": cfg.trainer.precision == "bf16" and not fused,
                 "check_grad_overflow": True, "immediate_grad_update": True},
        "data_types": {"grad_accum_dtype": "fp32"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device at every forward and step; we
        # measure throughput ourselves (megallama.training.metrics)
        "timers": {"throughput": {"enabled": False}},
        "zero_allow_untested_optimizer": True,
        # DeepSpeed may send 1/tp of each inter-stage activation and all-gather it on arrival,
        # which assumes activations are replicated over TP; under sequence parallelism each TP
        # rank holds a different sequence chunk, so that must be off.
        "pipeline": {"pipe_partitioned": not p.sequence_parallel,
                     "grad_partitioned": not p.sequence_parallel},
    }


class TopologyMPU:
    """The ``mpu`` interface DeepSpeed's plain engine reads for DP reduction and the TP-aware
    gradient norm (the PipelineEngine builds the same groups from its own topology)."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo

    def get_model_parallel_rank(self) -> int:
        return self.topo.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.topo.grid.tp

    def get_model_parallel_group(self):
        return self.topo.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.topo.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topo.grid.dp

    def get_data_parallel_group(self):
        return self.topo.dp_group


class _Loss:
    """The vocab-parallel loss; ``poison`` makes the next steps' loss NaN (fault injection for
    tests of the non-finite policy, see MEGALLAMA_FAULT in megallama.training.loop)."""

    def __init__(self, fn) -> None:
        self.fn, self.poison = fn, False

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.fn(logits, labels)
        return loss * float("nan") if self.poison else loss


class _SingleStage(nn.Module):
    """pp == 1: the whole model plus its loss, as DeepSpeed's plain engine expects."""

    def __init__(self, model: Transformer, loss_fn: _Loss) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(tokens), labels)


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    lr: float
    skipped: bool


class Engine:
    """Builds the model for this rank's stage and runs training/eval steps through DeepSpeed."""

    def __init__(self, cfg: TrainConfig, topo: Topology, device: torch.device) -> None:
        # DeepSpeed prints its stage partition with print(): keep stdout for our own results.
        with contextlib.redirect_stdout(sys.stderr):
            self._build(cfg, topo, device)

    def _build(self, cfg: TrainConfig, topo: Topology, device: torch.device) -> None:
        import deepspeed
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

        self.cfg, self.topo, self.device = cfg, topo, device
        p, grid = cfg.parallel, topo.grid
        self.gas = p.global_batch_size // (p.micro_batch_size * grid.dp)
        self.fused = cfg.optim.impl == "fused"  # megallama's optimizer instead of DeepSpeed's
        self.tp = topo.tensor_parallel(cfg.model.n_kv_heads, p.sequence_parallel)
        seed = cfg.trainer.seed
        self.loss_fn = _Loss(make_loss_fn(cfg.model, self.tp, compiled=p.compile_blocks))
        if grid.pp > 1:
            from megallama.engine.pipeline import LlamaPipeline, layer_costs

            defs = layer_defs(cfg.model, self.tp, seed, p.activation_checkpointing)
            module: nn.Module = LlamaPipeline(
                defs, self.loss_fn, pp=grid.pp, tp=grid.tp, dp=grid.dp,
                costs=layer_costs(cfg.model, cfg.data.seq_len, [d.name for d in defs]),
                partition_method=p.partition_method)
            mpu = None
        else:
            model = Transformer(cfg.model, self.tp, seed, p.activation_checkpointing)
            module = _SingleStage(model, self.loss_fn)
            mpu = TopologyMPU(topo)
        if p.compile_blocks:
            compile_blocks(module)
        module.to(device)
        total = cfg.trainer.steps
        self.optimizer = self._make_optimizer(module, cfg, topo, device)
        peak = cfg.optim.lr

        def schedule(optimizer):  # built on DeepSpeed's wrapped optimizer (its own groups)
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_at(s, cfg.optim, total) / peak)

        self.ds, self.ds_optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=self.optimizer, lr_scheduler=schedule, mpu=mpu,
            config=deepspeed_config(cfg, grid.dp), dist_init_required=False)
        if self.fused or (grid.dp == 1 and isinstance(self.ds.optimizer, BF16_Optimizer)):
            # a 1-rank all-reduce is the identity, but DeepSpeed's bf16 optimizer would still copy
            # every fp32 gradient through a bucket and back (ZeRO's fp32 path needs that call);
            # the fused optimizer reduces gradients over DP itself, in fp32
            self.ds.enable_backward_allreduce = False
            if self.fused and grid.pp > 1:
                self.ds.pipeline_enable_backward_allreduce = False
        self.module = module
        self._skipped_before = 0

    def _make_optimizer(self, module: nn.Module, cfg: TrainConfig, topo: Topology,
                        device: torch.device) -> torch.optim.Optimizer:
        o = cfg.optim
        groups = param_groups(module.named_parameters(), o.weight_decay)
        if not self.fused:
            return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                     **({"fused": True} if device.type == "cuda" else {}))
        from megallama.optim.fused_adamw import MasterWeightAdamW

        if cfg.trainer.precision == "bf16":  # what DeepSpeed's bf16 mode does: params, not buffers
            for param in module.parameters():
                param.data = param.data.to(torch.bfloat16)
        return MasterWeightAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                 max_grad_norm=o.grad_clip, topo=topo, gas=self.gas)

    # ---- structure ---------------------------------------------------------------------------
    @property
    def is_pipeline(self) -> bool:
        return self.topo.grid.pp > 1

    def local_layers(self) -> list[tuple[str, nn.Module]]:
        """(global name, module) of the layers this rank holds, in forward order."""
        if self.is_pipeline:
            return self.module.local_layers()
        return self.module.model.named_layers()

    def needs_data(self) -> bool:
        """Only the first stage (tokens) and the last (labels) read batches."""
        return self.topo.is_first_stage or self.topo.is_last_stage

    # ---- steps -------------------------------------------------------------------------------
    def train_step(self, micro_batches: Iterable[MicroBatch]) -> StepResult:
        """One optimizer step over ``gas`` micro-batches of this DP rank."""
        lr = self.optimizer.param_groups[0]["lr"]
        it = iter(micro_batches)
        if self.is_pipeline:
            loss = self.ds.train_batch(data_iter=it)
        else:
            loss = self._train_single(it)
        norm = self.ds.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        # DeepSpeed's ZeRO optimizers skip the update (and the LR step) when the global gradient
        # norm is not finite: fp32 always, bf16 with check_grad_overflow (set in our config).
        skipped = self.ds.skipped_steps > self._skipped_before
        self._skipped_before = self.ds.skipped_steps
        return StepResult(float(loss), norm, lr, skipped)

    @property
    def skipped_steps(self) -> int:
        return self.ds.skipped_steps

    def _train_single(self, it: Iterator[MicroBatch]) -> torch.Tensor:
        total: torch.Tensor | None = None
        for _ in range(self.gas):
            tokens, labels = next(it)
            loss = self.ds(tokens.to(self.device), labels.to(self.device))
            self.ds.backward(loss)
            self.ds.step()
            total = loss.detach().float() if total is None else total + loss.detach().float()
        assert total is not None
        total = total / self.gas
        if self.topo.grid.dp > 1:
            dist.all_reduce(total, group=self.topo.dp_group)
            total /= self.topo.grid.dp
        return total

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[MicroBatch]) -> float:
        """Mean loss over the given micro-batches, averaged over DP (same value on every rank)."""
        if self.is_pipeline:
            n = len(micro_batches)
            # eval_batch consumes ``micro_batches`` (gas) items per call
            losses = []
            for start in range(0, n, self.gas):
                chunk = micro_batches[start:start + self.gas]
                if len(chunk) < self.gas:
                    break
                losses.append(float(self.ds.eval_batch(iter(chunk))))
            return sum(losses) / max(1, len(losses))
        self.ds.eval()
        total = torch.zeros((), device=self.device)
        for tokens, labels in micro_batches:
            total += self.module(tokens.to(self.device), labels.to(self.device)).float()
        total /= max(1, len(micro_batches))
        if self.topo.grid.dp > 1:
            dist.all_reduce(total, group=self.topo.dp_group)
            total /= self.topo.grid.dp
        self.ds.train()
        return float(total)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
