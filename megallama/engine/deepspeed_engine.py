"""The DeepSpeed boundary: one training step, one evaluation step, the optimizer state and the
step counters of a run, behind a narrow interface. The 1F1B PipelineEngine runs when pp > 1, the
plain engine when pp == 1 (so ZeRO-2/3 stay selectable), both over the same layer list and TP
layers. Nothing outside :mod:`megallama.engine` imports deepspeed (an import-linter contract).

A step whose global gradient norm is not finite is skipped on every rank: by DeepSpeed's ZeRO
optimizer (``optim.impl=deepspeed``, zero_stage >= 1), or by megallama's fused master-weight AdamW
(``optim.impl=fused``, zero_stage 0), which then also does the clipping and the data-parallel
gradient reduction itself.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from torch import nn

from megallama.config.train_config import TrainConfig
from megallama.config.validate import resolve_optimizer
from megallama.engine import ds_config, tp_grads
from megallama.engine.ds_state import DeepSpeedState, OptimizerStateAccess
from megallama.engine.pipeline import LlamaPipeline
from megallama.model.llama import Transformer, compile_blocks, layer_defs, make_loss_fn
from megallama.optim.distributed_adamw import DistributedAdamW
from megallama.optim.fused_adamw import MasterWeightAdamW
from megallama.optim.schedule import lr_at, param_groups
from megallama.parallel.fp8 import convert_to_float8, step_casts, weights_fixed
from megallama.parallel.topology import Topology

# tokens [b, s], labels [b, s] (-100: no loss), and with packed documents segments [b, s]
MicroBatch = tuple[torch.Tensor, ...]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Layers = list[tuple[str, nn.Module]]
# fills a stage's layers (global name, module) in place from saved weights: ``trainer.init_from``
# or a weights-only ``trainer.resume`` (the checkpoint package provides it; the engine cannot
# import it)
WeightsLoader = Callable[[Layers, Any], None]


class _SingleStage(nn.Module):
    """pp == 1: the whole model plus its loss, as DeepSpeed's plain engine expects."""

    def __init__(self, model: Transformer, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        return self.loss_fn(self.model(tokens, segments=segments), labels)


def _layers_of(module: nn.Module, forward_only: bool = False) -> Layers:
    """(global name, module) of a stage's layers: a pipeline stage's own, or the whole model's.
    A tied model's last stage adds its copy of the embedding (what checkpoints load), unless
    ``forward_only``."""
    if isinstance(module, LlamaPipeline):
        return module.local_layers() if forward_only else module.checkpoint_layers()
    return module.model.named_layers()


def _pipeline_item(batch: MicroBatch) -> tuple[Any, torch.Tensor]:
    """A micro-batch as DeepSpeed's PipelineEngine reads it: (inputs, labels)."""
    if len(batch) == 3:
        tokens, labels, segments = batch
        return (tokens, segments), labels
    tokens, labels = batch
    return tokens, labels


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    lr: float
    skipped: bool
    no_targets: bool = False  # skipped because the global batch had no target token


class Engine:
    """This rank's pipeline stage of the model, its optimizer and LR schedule, run by DeepSpeed.

    The interface the rest of megallama uses: :meth:`train_step`, :meth:`eval_loss`,
    :meth:`local_layers`, :attr:`optimizer_state` (full per-parameter optimizer state),
    :meth:`adam_step` / :meth:`set_adam_step`, :meth:`scheduler_state` /
    :meth:`load_scheduler_state`, :meth:`counters` / :meth:`set_counters`. ``loss_fn`` replaces
    the vocab-parallel cross-entropy (benchmarks).

    ``init_weights(layers, tp)`` loads starting weights into this stage's freshly built layers
    *before* any optimizer sees them: every optimizer takes its own fp32 master copy when it is
    built (DeepSpeed's ZeRO and BF16 optimizers inside ``deepspeed.initialize``, megallama's at
    construction) and writes that copy back after each step, so weights loaded later would be
    used by the first forward and then replaced by the random initialisation."""

    def __init__(self, cfg: TrainConfig, topo: Topology, device: torch.device,
                 loss_fn: LossFn | None = None, init_weights: WeightsLoader | None = None) -> None:
        ds_config.attach_comm(device)
        # DeepSpeed prints its stage partition with print(): keep stdout for our own results.
        with contextlib.redirect_stdout(sys.stderr):
            self._build(cfg, topo, device, loss_fn, init_weights)

    def _build(self, cfg: TrainConfig, topo: Topology, device: torch.device,
               loss_fn: LossFn | None, init_weights: WeightsLoader | None) -> None:
        resolve_optimizer(cfg)  # optim.impl=auto and the ZeRO stage, as validation resolves them
        self.cfg, self.topo, self.device = cfg, topo, device
        p, grid = cfg.parallel, topo.grid
        self.gas = p.global_batch_size // (p.micro_batch_size * grid.dp)
        # megallama's optimizer instead of DeepSpeed's: whole (fused) or sharded over DP
        self.fused = cfg.optim.impl in ("fused", "distributed")
        self.tp = topo.tensor_parallel(cfg.model.n_kv_heads, p.sequence_parallel)
        self.loss_fn = loss_fn or make_loss_fn(cfg.model, self.tp, compiled=p.compile_blocks)
        module = self._module(cfg, topo)
        if init_weights is not None:  # fp32 values, before FP8, compilation, bf16 and masters
            init_weights(_layers_of(module), self.tp)
        convert_to_float8(module, cfg.trainer.fp8, self.tp, emulate=device.type != "cuda")
        if p.compile_blocks:
            compile_blocks(module)
        module.to(device)
        self.optimizer = self._make_optimizer(module, cfg, topo, device)
        if isinstance(module, LlamaPipeline):  # megallama's optimizers sum tied grads themselves
            module.tied_grads_by_deepspeed = not self.fused
        peak, total = cfg.optim.lr, cfg.trainer.steps

        def schedule(optimizer):  # built on DeepSpeed's wrapped optimizer (its own groups)
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_at(s, cfg.optim, total) / peak if peak else 0.0)

        mpu = None if grid.pp > 1 else ds_config.TopologyMPU(topo)
        self.ds, self.ds_optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=self.optimizer, lr_scheduler=schedule, mpu=mpu,
            config=ds_config.deepspeed_config(cfg, grid.dp), dist_init_required=False)
        if self.fused or (grid.dp == 1 and isinstance(self.ds.optimizer, BF16_Optimizer)):
            # a 1-rank all-reduce is the identity, but DeepSpeed's bf16 optimizer would still copy
            # every fp32 gradient through a bucket and back (ZeRO's fp32 path needs that call);
            # the fused optimizer reduces gradients over DP itself, in fp32
            self.ds.enable_backward_allreduce = False
            if self.fused and grid.pp > 1:
                self.ds.pipeline_enable_backward_allreduce = False
        # SP norms / KV replicas: summed over TP once per step (megallama's optimizers do it in
        # their step; DeepSpeed's ZeRO 0/1 before its DP reduction, ZeRO 2/3 in every backward)
        self._partial_sum = None
        if not self.fused and tp_grads.sums_once_per_step(self.ds):
            self._partial_sum = tp_grads.PartialGradSum(self.ds, list(module.parameters()))
        self.module = module
        # FP8 in compiled blocks: every weight cast once per step, before the first forward,
        # into buffers the graphs read (eager blocks cast in the first micro-batch, weights_fixed);
        # ZeRO-3 holds no whole weight outside a layer's forward, so its blocks cast every use
        self._fp8_step_casts = module if cfg.trainer.fp8 != "none" and p.compile_blocks \
            and p.zero_stage < 3 else None
        self._skipped_before = 0
        self.last_targets = 0  # target tokens of the last global batch trained or evaluated
        self._state_access: OptimizerStateAccess | None = None

    def _module(self, cfg: TrainConfig, topo: Topology) -> nn.Module:
        """This stage's layers: a DeepSpeed PipelineModule when pp > 1, else the whole model."""
        p, grid, seed = cfg.parallel, topo.grid, cfg.trainer.seed
        if grid.pp > 1:
            defs = layer_defs(cfg.model, self.tp, seed, p.activation_checkpointing)
            module: nn.Module = LlamaPipeline(
                defs, self.loss_fn, cfg=cfg.model, pp=grid.pp, tp=grid.tp, dp=grid.dp,
                seq_len=cfg.data.seq_len, partition_method=p.partition_method)
            return module
        model = Transformer(cfg.model, self.tp, seed, p.activation_checkpointing)
        return _SingleStage(model, self.loss_fn)

    def _make_optimizer(self, module: nn.Module, cfg: TrainConfig, topo: Topology,
                        device: torch.device) -> torch.optim.Optimizer:
        o = cfg.optim
        groups = param_groups(module.named_parameters(), o.weight_decay)
        if not self.fused:
            return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                     **({"fused": True} if device.type == "cuda" else {}))
        if cfg.trainer.precision == "bf16":  # what DeepSpeed's bf16 mode does: params, not buffers
            for param in module.parameters():
                param.data = param.data.to(torch.bfloat16)
        if o.impl == "distributed":
            return DistributedAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                    max_grad_norm=o.grad_clip, topo=topo, gas=self.gas,
                                    bucket_bytes=int(o.bucket_mb * (1 << 20)),
                                    registration_order=module.parameters(),
                                    modules=[m for _, m in _layers_of(module, True)])
        return MasterWeightAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                 max_grad_norm=o.grad_clip, topo=topo, gas=self.gas)

    # ---- structure ---------------------------------------------------------------------------
    @property
    def is_pipeline(self) -> bool:
        return self.topo.grid.pp > 1

    def local_layers(self) -> Layers:
        """(global name, module) of the layers this rank holds, in forward order, with every
        weight final (no parameter all-gather of ``optim.impl=distributed`` in flight). On the
        last stage of a tied model at pp > 1, also ``("tok_embeddings", copy)``: checkpoints load
        it as that tensor and skip it when saving (its parameter is tagged ``tied_copy``)."""
        self.wait_for_weights()
        return _layers_of(self.module)

    def wait_for_weights(self) -> None:
        """Wait for the distributed optimizer's parameter all-gathers, which the next forward
        would otherwise wait for layer by layer: before weights are read outside training."""
        if isinstance(self.optimizer, DistributedAdamW):
            self.optimizer.wait_param_gathers()

    def needs_data(self) -> bool:
        """Only the first stage (tokens) and the last (labels) read batches."""
        return self.topo.is_first_stage or self.topo.is_last_stage

    # ---- state a checkpoint saves and restores -----------------------------------------------
    @property
    def optimizer_state(self) -> OptimizerStateAccess:
        """Full fp32 master weights and Adam moments per parameter (collective over DP)."""
        if self._state_access is None:
            own = isinstance(self.optimizer, (MasterWeightAdamW, DistributedAdamW))
            self._state_access = (self.optimizer if own
                                  else DeepSpeedState(self.ds_optimizer))
        return self._state_access

    def adam_step(self) -> int:
        """Adam's step count (the bias correction), the same for every parameter."""
        steps = {int(s["step"]) for s in self.optimizer.state.values() if "step" in s}
        if len(steps) > 1:
            raise RuntimeError(f"optimizer parameters disagree on the Adam step: {sorted(steps)}")
        return steps.pop() if steps else 0

    def set_adam_step(self, step: int) -> None:
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"].fill_(float(step))

    def scheduler_state(self) -> dict[str, Any]:
        state = self.scheduler.state_dict()
        state.pop("lr_lambdas", None)  # closures: rebuilt from the config
        return state

    def load_scheduler_state(self, state: dict[str, Any]) -> None:
        """Restore the schedule's position (steps taken) and set every group's LR from the
        *current* schedule at that position: a resumed run with another ``trainer.steps``,
        ``optim.lr`` or ``optim.decay_steps`` follows its new schedule from the first step (the
        saved peak LR and last LR describe the old schedule and are not restored)."""
        position = {k: state[k] for k in ("last_epoch", "_step_count") if k in state}
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), **position})
        sched = self.scheduler
        lrs = [base * rule(sched.last_epoch)
               for base, rule in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
        for group, lr in zip(self.ds_optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = lrs  # what get_last_lr() reports

    def counters(self) -> dict[str, int]:
        """Optimizer steps taken and, of those, skipped for a non-finite gradient norm."""
        return {"global_steps": int(self.ds.global_steps),
                "skipped_steps": int(self.ds.skipped_steps)}

    def set_counters(self, global_steps: int, skipped_steps: int) -> None:
        self.ds.global_steps = global_steps
        self.ds.skipped_steps = self._skipped_before = skipped_steps

    @property
    def skipped_steps(self) -> int:
        return int(self.ds.skipped_steps)

    # ---- steps -------------------------------------------------------------------------------
    def _count_targets(self, micro_batches: list[MicroBatch]) -> int:
        """Target tokens (labels != -100) of the whole global batch, known on every rank: the
        last stage's TP rank 0 counts its DP rank's micro-batches and one sum over the world
        hands the total to every stage (middle stages pass placeholders)."""
        count = 0
        if self.topo.is_last_stage and self.topo.tp_rank == 0:
            count = sum(int((batch[1] != -100).sum()) for batch in micro_batches)
        total = torch.tensor(float(count), dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        self.last_targets = int(total)
        return self.last_targets

    def _weigh_tokens(self, targets: int, micro_batches_per_rank: int) -> None:
        """Make the loss of this step the mean over every target token of the global batch,
        however the tokens fall over micro-batches and DP ranks: each micro-batch's summed token
        loss is divided by (global target tokens) / (global micro-batches), and DeepSpeed's mean
        over micro-batches and DP ranks (of the loss and the gradients) does the rest."""
        if not self.topo.is_last_stage or not hasattr(self.loss_fn, "denominator"):
            return
        global_micro_batches = micro_batches_per_rank * self.topo.grid.dp
        self.loss_fn.denominator = max(float(targets), 1.0) / global_micro_batches

    def train_step(self, micro_batches: Iterable[MicroBatch]) -> StepResult:
        """One optimizer step over ``gas`` micro-batches of this DP rank; the loss is the mean
        over all target tokens of the global batch (:meth:`_weigh_tokens`). A global batch
        without any target token (e.g. every answer masked) is skipped on every rank and counted
        like a non-finite step: Adam's momentum and weight decay would otherwise still move the
        weights."""
        lr = self.optimizer.param_groups[0]["lr"]
        micro_batches = list(micro_batches)
        if self._count_targets(micro_batches) == 0:
            self.ds.global_steps += 1
            self.ds.skipped_steps += 1
            self._skipped_before = self.ds.skipped_steps
            return StepResult(float("nan"), None, lr, skipped=True, no_targets=True)
        self._weigh_tokens(self.last_targets, self.gas)
        if self._fp8_step_casts is not None:
            self.wait_for_weights()  # the casts read every weight now
        # FP8: each weight cast (and its amax reduced) once per step
        with weights_fixed(), step_casts(self._fp8_step_casts):
            if self.is_pipeline:
                loss = self.ds.train_batch(data_iter=map(_pipeline_item, micro_batches))
            else:
                loss = self._train_single(iter(micro_batches))
        norm = self.ds.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        # DeepSpeed's ZeRO optimizers skip the update (and the LR step) when the global gradient
        # norm is not finite: fp32 always, bf16 with check_grad_overflow (set in our config).
        skipped = self.ds.skipped_steps > self._skipped_before
        self._skipped_before = self.ds.skipped_steps
        return StepResult(float(loss), norm, lr, skipped)

    def _train_single(self, it: Iterator[MicroBatch]) -> torch.Tensor:
        total: torch.Tensor | None = None
        for i in range(self.gas):
            loss = self.ds(*(t.to(self.device) for t in next(it)))
            self.ds.backward(loss)
            if i == self.gas - 1 and self._partial_sum is not None \
                    and not self.ds.enable_backward_allreduce:  # no DP reduction to precede
                self._partial_sum.now()
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
        """Mean loss over every target token of the given micro-batches of all DP ranks (the
        training loss's definition; the same value on every rank). Middle pipeline stages pass
        placeholders: they only need the count."""
        self.wait_for_weights()
        n = len(micro_batches) - len(micro_batches) % self.gas  # whole chunks of gas micro-batches
        micro_batches = micro_batches[:n]
        if self._count_targets(micro_batches) == 0:
            return float("nan")
        self._weigh_tokens(self.last_targets, n)
        if self.is_pipeline:
            # eval_batch consumes gas micro-batches per call and averages them over DP
            losses = [float(self.ds.eval_batch(map(_pipeline_item, micro_batches[i:i + self.gas])))
                      for i in range(0, n, self.gas)]
            return sum(losses) / max(1, len(losses))
        self.ds.eval()
        total = torch.zeros((), device=self.device)
        for batch in micro_batches:
            total += self.module(*(t.to(self.device) for t in batch)).float()
        total /= max(1, len(micro_batches))
        if self.topo.grid.dp > 1:
            dist.all_reduce(total, group=self.topo.dp_group)
            total /= self.topo.grid.dp
        self.ds.train()
        return float(total)
