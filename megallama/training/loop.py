"""The training loop: one global batch per step through the engine, then log, evaluate, save.

:meth:`Trainer.train` reads top to bottom as the step does (nanoGPT's loop, torchtitan's
``train_step``): sample this rank's micro-batches, forward/backward/clip/step (the engine), handle a
skipped step, log, evaluate, save. The loss the engine returns is already averaged over micro-batches and DP and
broadcast from the last pipeline stage to every stage, so global rank 0 (first stage) reports it.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megallama.checkpoint.stateful import SavedHook, has_training_state
from megallama.config.compose import save_config
from megallama.config.grid import Grid
from megallama.config.train_config import TrainConfig
from megallama.data.dataset import BlendedDataset, PackedDataset, build_train_valid
from megallama.data.packing import collate_windows, windows_for
from megallama.data.sampler import DataSampler
from megallama.engine import Engine, MicroBatch, StepResult
from megallama.parallel.cross_entropy import perplexity
from megallama.parallel.topology import Topology, build_topology, kv_replicas_for
from megallama.training.metrics import (
    MetricsWriter,
    Progress,
    device_peak_flops,
    flops_per_token,
    format_metrics,
    peak_memory_bytes,
)
from megallama.training.run_files import resolve_init, resolve_resume
from megallama.training.train_state import TrainingState, weights_loader


@dataclass
class TrainHooks:
    """Extension points for tests and tools: ``step_start(step, engine)`` runs before each step
    (fault injection, probes), ``piece_saved(piece_name, tmp_dir)`` after each piece of a save."""

    step_start: list[Callable[[int, Engine], None]] = field(default_factory=list)
    piece_saved: list[SavedHook] = field(default_factory=list)


def build_datasets(cfg: TrainConfig) -> tuple[Any, Any]:
    """Train (blended when several files are given) and validation datasets, as windows of the
    configured packing (``data.packing``, ``data.loss_mask``; see megallama.data.packing)."""
    d = cfg.data
    valid_prefix = d.valid[0] if d.valid else None
    first, valid = build_train_valid(d.train[0], d.seq_len, valid_prefix, d.valid_fraction)
    first = windows_for(first, d.packing, d.loss_mask)
    valid = None if valid is None else windows_for(valid, d.packing, d.loss_mask)
    if len(d.train) == 1:
        return first, valid
    parts = [first] + [windows_for(PackedDataset(p, d.seq_len), d.packing, d.loss_mask)
                       for p in d.train[1:]]
    weights = d.train_weights or [len(p) for p in parts]
    total = cfg.trainer.steps * cfg.parallel.global_batch_size
    return BlendedDataset(parts, weights, num_samples=max(total, sum(map(len, parts))),
                          seed=cfg.trainer.seed), valid


class BatchSource:
    """This rank's micro-batches for each global step, driven by the resumable sampler."""

    def __init__(self, dataset, cfg: TrainConfig, topo: Topology, shuffle: bool = True) -> None:
        self.dataset, self.micro = dataset, cfg.parallel.micro_batch_size
        self.sampler = DataSampler(len(dataset), cfg.parallel.global_batch_size, topo.dp_rank,
                                   topo.grid.dp, seed=cfg.trainer.seed, shuffle=shuffle)

    def next_step(self, load: bool = True) -> list[MicroBatch]:
        indices = self.sampler.next_batch()  # advance on every rank, read only where needed
        if not load:
            return []
        batch = collate_windows([self.dataset[i] for i in indices])
        return list(zip(*(t.split(self.micro) for t in batch), strict=True))


def validation_loss(engine: Engine, dataset, cfg: TrainConfig, topo: Topology) -> float:
    """Validation loss over the first ``eval_iters`` global batches of the (unshuffled) set."""
    source = BatchSource(dataset, cfg, topo, shuffle=False)
    batches: list[MicroBatch] = []
    for _ in range(cfg.trainer.eval_iters):
        batches += source.next_step(load=engine.needs_data())
    if not engine.needs_data():  # middle stages: the engine ignores the data, keep the count
        batches = [None] * (cfg.trainer.eval_iters * engine.gas)  # type: ignore[list-item]
    return engine.eval_loss(batches)


class StopSignal:
    """SIGTERM (e.g. SLURM preemption, torchrun shutting down) asks for a save and a clean exit.
    The flag is combined over ranks every step on a CPU (gloo) group, so all ranks stop together
    even if only some received the signal."""

    def __init__(self) -> None:
        self.flag = False
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.flag = True

    def requested(self) -> bool:
        value = torch.tensor([1.0 if self.flag else 0.0])
        if self.group is not None:
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())


class Throughput:
    """Tokens/s, TFLOP/s per device and MFU over the steps since the last report (evaluation and
    saving excluded by :meth:`restart`)."""

    def __init__(self, cfg: TrainConfig, world: int, device: torch.device) -> None:
        self.tokens_per_step = cfg.parallel.global_batch_size * cfg.data.seq_len
        self.fpt = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = device_peak_flops(device, cfg.trainer.precision)
        self.world, self.device = world, device
        self.restart()

    def restart(self) -> None:
        self.t0, self.steps = time.perf_counter(), 0

    def report(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        tok_s = self.tokens_per_step * self.steps / (time.perf_counter() - self.t0)
        tflops = self.fpt * tok_s / self.world / 1e12
        out = {"tokens_per_s": tok_s, "tflops_per_device": tflops,
               "peak_memory_gib": peak_memory_bytes(self.device) / 2**30}
        if self.peak:
            out["mfu"] = tflops * 1e12 / self.peak
        self.restart()
        return out


def _check_finite(result: StepResult, step: int, engine: Engine, cfg: TrainConfig,
                  progress: Progress) -> None:
    """A skipped (non-finite) step stops the run or is reported, as ``trainer.nonfinite`` says."""
    if not (result.skipped or not math.isfinite(result.loss)):
        return
    if cfg.trainer.nonfinite == "stop":
        raise FloatingPointError(
            f"non-finite loss or gradients at step {step} (the update was not applied); "
            "stopping as trainer.nonfinite=stop asks")
    progress.log(f"step {step}: non-finite loss or gradients, update skipped "
                 f"({engine.skipped_steps} skipped so far)")


class Trainer:
    """One training run: built from the config, then :meth:`train` runs its steps."""

    def __init__(self, cfg: TrainConfig, grid: Grid, device: torch.device,
                 hooks: TrainHooks | None = None) -> None:
        self.cfg, self.device, self.hooks = cfg, device, hooks or TrainHooks()
        t = cfg.trainer
        self.topo = build_topology(grid, kv_replicas_for(cfg.model.n_kv_heads, grid.tp))
        torch.manual_seed(t.seed)
        self.is_logger, self.out_dir = self.topo.rank == 0, Path(t.output_dir)
        train_set, self.valid_set = build_datasets(cfg)
        if t.epochs > 0:  # the schedule, the logs and the saved config all see these steps
            t.steps = max(1, math.ceil(t.epochs * len(train_set) / cfg.parallel.global_batch_size))
        if self.is_logger:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        resume, weights = self._starting_point()
        self.engine = Engine(cfg, self.topo, device,
                             init_weights=None if weights is None else weights_loader(weights, cfg.model))
        self.source = BatchSource(train_set, cfg, self.topo)
        self.state = TrainingState(self.engine, cfg, self.topo, self.source.sampler)
        self.state.on_saved += self.hooks.piece_saved
        self.start = 0
        if resume is not None:
            self.start = self.state.resume(resume)
            self._say(f"resumed from {resume} at step {self.start}")
        self.writer = MetricsWriter.for_run(cfg, enabled=self.is_logger, resumed=self.start > 0)
        self.throughput = Throughput(cfg, grid.world_size, device)
        self.progress = Progress(t.steps, enabled=self.is_logger, bar=t.progress,
                                 initial=self.start,
                                 tokens_per_step=self.throughput.tokens_per_step)

    def _starting_point(self) -> tuple[Path | None, Path | None]:
        """(full checkpoint to resume, weights to start from): this run's latest checkpoint
        (``trainer.resume``) or, when there is none, ``trainer.init_from``'s weights with a fresh
        optimizer. A weights-only ``trainer.resume`` directory (a converted Meta/HF model) also
        starts a fresh optimizer. Weights go to the engine, which loads them before any
        optimizer copies the parameters; a full resume loads its optimizer state afterwards."""
        resume = resolve_resume(self.cfg)
        if resume is not None and has_training_state(resume):
            return resume, None
        if resume is not None:
            self._say(f"resumed from {resume} at step 0 (weights only: fresh optimizer)")
            return None, resume
        if (weights := resolve_init(self.cfg)) is not None:
            self._say(f"initialised from the weights of {weights} (fresh optimizer)")
        return None, weights

    def _say(self, line: str) -> None:
        if self.is_logger:
            print(line, flush=True)

    def train(self) -> dict[str, Any]:
        """Run the steps; returns the final metrics (on every rank)."""
        t, engine, stop = self.cfg.trainer, self.engine, StopSignal()
        final: dict[str, Any] = {}
        step = self.start
        for step in range(self.start + 1, t.steps + 1):
            for hook in self.hooks.step_start:
                hook(step, engine)
            # forward, backward, gradient clipping and the optimizer step over gas micro-batches
            result = engine.train_step(self.source.next_step(load=engine.needs_data()))
            _check_finite(result, step, engine, self.cfg, self.progress)
            self.throughput.steps += 1
            if step % t.log_interval == 0 or step == t.steps:
                final.update(self.log(step, result))
            if self.valid_set is not None and t.eval_interval and (
                    step % t.eval_interval == 0 or step == t.steps):
                final["valid_loss"] = self.evaluate(step)
            if stop.requested():
                self.progress.log(f"SIGTERM: saving step {step} and exiting")
                final["checkpoint"], final["preempted_at"] = str(self.state.save(step)), step
                break
            if t.save_interval and step % t.save_interval == 0 and step != t.steps:
                self.state.save(step)
            self.progress.update(step)
        self.progress.close()
        if t.save_final and "preempted_at" not in final and step > self.start:
            final["checkpoint"] = str(self.state.save(step))
        self.writer.close()
        if self.is_logger:
            print(f"TensorBoard logs: {self.out_dir / 'tensorboard'}  "
                  f"(tensorboard --logdir {self.out_dir})", flush=True)
        dist.barrier()
        return final

    def log(self, step: int, result: StepResult) -> dict[str, Any]:
        """Report a step's loss, LR, gradient norm and throughput (console and TensorBoard)."""
        metrics = {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                   **self.throughput.report(), "skipped_steps": self.engine.skipped_steps}
        self.writer.scalars(step, {f"train/{k}": v for k, v in metrics.items() if v is not None})
        self.progress.log(format_metrics(step, self.cfg.trainer.steps, metrics))
        return metrics

    def evaluate(self, step: int) -> float:
        """Validation loss (and perplexity) after ``step``, reported like the training loss."""
        val = validation_loss(self.engine, self.valid_set, self.cfg, self.topo)
        self.writer.scalars(step, {"valid/loss": val, "valid/perplexity": perplexity(val)})
        self.progress.log(f"step {step}/{self.cfg.trainer.steps} | valid loss {val:.4f} | "
                          f"perplexity {perplexity(val):.2f}")
        self.throughput.restart()  # evaluation time is not training throughput
        return val


def train(cfg: TrainConfig, grid: Grid, device: torch.device,
          hooks: TrainHooks | None = None) -> dict[str, Any]:
    """Run the configured training; returns the final metrics (on every rank)."""
    return Trainer(cfg, grid, device, hooks).train()
