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
from megallama.config import ConfigError
from megallama.config.compose import save_config
from megallama.config.grid import Grid
from megallama.config.train_config import TrainConfig
from megallama.data.dataset import BlendedDataset, ConcatWindows, PackedDataset, build_train_valid
from megallama.data.packing import blank_window, collate_windows, input_tokens, windows_for
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
    """Train and validation datasets, as windows of the configured packing (``data.packing``,
    ``data.loss_mask``; see megallama.data.packing). Several ``data.train`` prefixes are
    blended into an epoch of as many samples as they hold together (in proportion to
    ``data.train_weights``; independent of the run's length, so a run can be extended);
    several ``data.valid`` prefixes are evaluated one after the other."""
    d = cfg.data

    def windows(packed: PackedDataset):
        return windows_for(packed, d.packing, d.loss_mask)

    first, valid = build_train_valid(d.train[0], d.seq_len, d.valid[0] if d.valid else None,
                                     d.valid_fraction)
    parts = [windows(first)] + [windows(PackedDataset(p, d.seq_len)) for p in d.train[1:]]
    valid_parts = [] if valid is None else [windows(valid)] + [
        windows(PackedDataset(p, d.seq_len)) for p in d.valid[1:]]
    valid_set = None if not valid_parts else (
        valid_parts[0] if len(valid_parts) == 1 else ConcatWindows(valid_parts))
    if len(parts) == 1:
        return parts[0], valid_set
    weights = d.train_weights or [len(p) for p in parts]
    return BlendedDataset(parts, weights, num_samples=sum(map(len, parts)),
                          seed=cfg.trainer.seed), valid_set


def steps_for_epochs(cfg: TrainConfig, train_set) -> int:
    """``trainer.epochs`` as optimizer steps: ceil(epochs * training samples / global batch)."""
    return max(1, math.ceil(cfg.trainer.epochs * len(train_set) / cfg.parallel.global_batch_size))


class BatchSource:
    """This rank's micro-batches for each global step, driven by the resumable sampler;
    ``real_tokens`` counts the input tokens read that are data, not padding."""

    def __init__(self, dataset, cfg: TrainConfig, topo: Topology, shuffle: bool = True) -> None:
        self.dataset, self.micro = dataset, cfg.parallel.micro_batch_size
        self.sampler = DataSampler(len(dataset), cfg.parallel.global_batch_size, topo.dp_rank,
                                   topo.grid.dp, seed=cfg.trainer.seed, shuffle=shuffle)
        self.real_tokens = 0

    def next_step(self, load: bool = True) -> list[MicroBatch]:
        indices = self.sampler.next_batch()  # advance on every rank, read only where needed
        if not load:
            return []
        if isinstance(self.dataset, BlendedDataset):  # draws continue from epoch to epoch
            samples = [self.dataset.sample(i, e)
                       for i, e in zip(indices, self.sampler.last_epochs, strict=True)]
        else:
            samples = [self.dataset[i] for i in indices]
        self.real_tokens += input_tokens(samples)
        return split_micro(collate_windows(samples), self.micro)


def split_micro(batch: tuple[torch.Tensor, ...], micro: int) -> list[MicroBatch]:
    return list(zip(*(t.split(micro) for t in batch), strict=True))


@dataclass
class ValidationResult:
    loss: float
    windows: int  # validation windows scored (each once)
    targets: int  # target tokens the loss averages over


def validation_loss(engine: Engine, dataset, cfg: TrainConfig, topo: Topology
                    ) -> ValidationResult:
    """Token-weighted loss over the validation set in order, each window once: all of it when
    ``trainer.eval_iters`` is null, else its first ``eval_iters`` global batches (fewer if the
    set is smaller). A short last global batch is filled with windows that have no target."""
    gbs, per_rank = cfg.parallel.global_batch_size, cfg.parallel.global_batch_size // topo.grid.dp
    n = len(dataset)
    if cfg.trainer.eval_iters is not None:
        n = min(n, cfg.trainer.eval_iters * gbs)
    steps = -(-n // gbs)
    batches: list[MicroBatch] = []
    for b in range(steps):
        if not engine.needs_data():  # middle stages: the engine ignores the data, keeps the count
            batches += [None] * engine.gas  # type: ignore[list-item]
            continue
        lo = b * gbs + topo.dp_rank * per_rank
        samples = [dataset[i] if i < n else blank_window(dataset[0])
                   for i in range(lo, lo + per_rank)]
        batches += split_micro(collate_windows(samples), cfg.parallel.micro_batch_size)
    loss = engine.eval_loss(batches)
    return ValidationResult(loss, n, engine.last_targets)


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
    saving excluded by :meth:`restart`). ``tokens_per_s`` counts every position computed (what
    MFU measures, padding included); ``data_tokens_per_s`` only the data, not the padding of
    ``documents`` / ``padded`` packing (how fast the data advances). Collective: every rank calls
    :meth:`report`, the data tokens are summed over the first stage's DP ranks."""

    def __init__(self, cfg: TrainConfig, topo: Topology, device: torch.device,
                 source: BatchSource) -> None:
        self.tokens_per_step = cfg.parallel.global_batch_size * cfg.data.seq_len
        self.fpt = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = device_peak_flops(device, cfg.trainer.precision)
        self.world, self.device, self.source = topo.grid.world_size, device, source
        self.counts = topo.is_first_stage and topo.tp_rank == 0  # one count per DP rank
        self.restart()

    def restart(self) -> None:
        self.t0, self.steps, self.real_at = time.perf_counter(), 0, self.source.real_tokens

    def report(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.t0
        tok_s = self.tokens_per_step * self.steps / seconds
        real = torch.tensor(float(self.source.real_tokens - self.real_at) if self.counts else 0.0,
                            dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(real)
        tflops = self.fpt * tok_s / self.world / 1e12
        out = {"tokens_per_s": tok_s, "data_tokens_per_s": float(real) / seconds,
               "tflops_per_device": tflops,
               "peak_memory_gib": peak_memory_bytes(self.device) / 2**30}
        if self.peak:
            out["mfu"] = tflops * 1e12 / self.peak
        self.restart()
        return out


def _check_finite(result: StepResult, step: int, engine: Engine, cfg: TrainConfig,
                  progress: Progress) -> None:
    """A skipped (non-finite) step stops the run or is reported, as ``trainer.nonfinite`` says;
    a global batch without any target token is skipped and reported (not an error)."""
    if result.no_targets:
        progress.log(f"step {step}: no target token in the global batch (every label masked), "
                     f"update skipped ({engine.skipped_steps} skipped so far)")
        return
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
            t.steps = steps_for_epochs(cfg, train_set)
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
        self.writer = self._open_writer()
        self.throughput = Throughput(cfg, self.topo, device, self.source)
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

    def _open_writer(self) -> MetricsWriter:
        """TensorBoard and W&B on the logging rank. W&B can refuse the run there only (no key,
        no network): every rank learns it, so all stop with one line instead of waiting in the
        first collective."""
        writer, error = None, None
        try:
            writer = MetricsWriter.for_run(self.cfg, enabled=self.is_logger,
                                           resumed=self.start > 0)
        except ConfigError as e:
            error = e
        failed = torch.tensor([1.0 if error else 0.0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if error is not None:
            raise error
        if writer is None or float(failed) > 0:
            raise ConfigError("trainer.wandb: the logging rank (rank 0) could not open the W&B "
                              "run (its message is in rank 0's output); see trainer.wandb.mode")
        return writer

    def _say(self, line: str) -> None:
        if self.is_logger:
            print(line, flush=True)

    def train(self) -> dict[str, Any]:
        """Run the steps; returns the final metrics (on every rank)."""
        t, engine, stop = self.cfg.trainer, self.engine, StopSignal()
        final: dict[str, Any] = {}
        step = self.start
        if self.valid_set is not None and t.eval_at_start and self.start == 0:
            final["valid_loss_at_start"] = self.evaluate(0)  # the starting weights' number
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
        """Validation loss (and perplexity) after ``step`` (0: before the first update), with
        the windows and target tokens it averages over; reported like the training loss."""
        result = validation_loss(self.engine, self.valid_set, self.cfg, self.topo)
        val = result.loss
        self.writer.scalars(step, {"valid/loss": val, "valid/perplexity": perplexity(val),
                                   "valid/windows": result.windows,
                                   "valid/target_tokens": result.targets})
        self.progress.log(f"step {step}/{self.cfg.trainer.steps} | valid loss {val:.4f} | "
                          f"perplexity {perplexity(val):.2f} | {result.windows} windows, "
                          f"{result.targets} target tokens")
        self.throughput.restart()  # evaluation time is not training throughput
        return val


def train(cfg: TrainConfig, grid: Grid, device: torch.device,
          hooks: TrainHooks | None = None) -> dict[str, Any]:
    """Run the configured training; returns the final metrics (on every rank)."""
    return Trainer(cfg, grid, device, hooks).train()
