"""The training loop: data in global batches, one engine step each, logging, evaluation, saving.

The loss DeepSpeed returns is already averaged over micro-batches and DP and broadcast from the
last pipeline stage to every stage, so global rank 0 (first stage) can report it.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megallama.config.training import TrainConfig
from megallama.data.dataset import BlendedDataset, PackedDataset, build_train_valid, collate
from megallama.data.sampler import DataSampler
from megallama.engine import faults
from megallama.engine.deepspeed_engine import Engine, MicroBatch, perplexity
from megallama.parallel.topology import Grid, Topology, build_topology, kv_replicas_for
from megallama.training.metrics import (
    MetricsWriter,
    Progress,
    device_peak_flops,
    flops_per_token,
    format_metrics,
    peak_memory_bytes,
)
from megallama.training.train_state import resolve_resume, resume, save_checkpoint


def build_datasets(cfg: TrainConfig):
    """Train (blended when several files are given) and validation datasets."""
    d = cfg.data
    valid_prefix = d.valid[0] if d.valid else None
    first, valid = build_train_valid(d.train[0], d.seq_len, valid_prefix, d.valid_fraction)
    if len(d.train) == 1:
        return first, valid
    parts = [first] + [PackedDataset(p, d.seq_len) for p in d.train[1:]]
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
        tokens, labels = collate([np.asarray(self.dataset[i]) for i in indices])
        return list(zip(tokens.split(self.micro), labels.split(self.micro), strict=True))


def evaluate(engine: Engine, dataset, cfg: TrainConfig, topo: Topology) -> float:
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


def _inject(step: int, engine: Engine, topo: Topology) -> None:
    """Test-only faults (see megallama.engine.faults)."""
    world = topo.grid.world_size
    if faults.armed("crash", step, topo.rank, world):
        raise RuntimeError(f"injected crash at step {step} (MEGALLAMA_FAULT)")
    engine.loss_fn.poison = faults.armed("nan", step, topo.rank, world, every_rank=True)


def train(cfg: TrainConfig, grid: Grid, device: torch.device) -> dict:
    """Run the configured training; returns the final metrics (on every rank)."""
    topo = build_topology(grid, kv_replicas_for(cfg.model.n_kv_heads, grid.tp))
    torch.manual_seed(cfg.trainer.seed)
    is_logger = topo.rank == 0
    out_dir = Path(cfg.trainer.output_dir)
    if is_logger:
        from megallama.config.compose import save_config

        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    train_set, valid_set = build_datasets(cfg)
    engine = Engine(cfg, topo, device)
    source = BatchSource(train_set, cfg, topo)
    start = 0
    resume_from = resolve_resume(cfg)
    if resume_from is not None:
        start = resume(engine, cfg, topo, resume_from, source.sampler)
        if is_logger:
            print(f"resumed from {resume_from} at step {start}", flush=True)
    stop = StopSignal()

    t = cfg.trainer
    tokens_per_step = cfg.parallel.global_batch_size * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = device_peak_flops(device, t.precision)
    writer = MetricsWriter(out_dir / "tensorboard" if t.tensorboard else None, enabled=is_logger)
    progress = Progress(t.steps, enabled=is_logger, bar=t.progress, initial=start)
    final: dict = {}
    window_t, window_steps = time.perf_counter(), 0
    step = start
    for step in range(start + 1, t.steps + 1):
        _inject(step, engine, topo)
        result = engine.train_step(source.next_step(load=engine.needs_data()))
        if result.skipped or not math.isfinite(result.loss):
            if t.nonfinite == "stop":
                raise FloatingPointError(
                    f"non-finite loss or gradients at step {step} (the update was not applied); "
                    "stopping as trainer.nonfinite=stop asks")
            progress.log(f"step {step}: non-finite loss or gradients, update skipped "
                         f"({engine.skipped_steps} skipped so far)")
        window_steps += 1
        if step % t.log_interval == 0 or step == t.steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - window_t
            tok_s = tokens_per_step * window_steps / elapsed
            tflops = fpt * tok_s / grid.world_size / 1e12
            metrics = {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                       "tokens_per_s": tok_s, "tflops_per_device": tflops,
                       "peak_memory_gib": peak_memory_bytes(device) / 2**30,
                       "skipped_steps": engine.skipped_steps}
            if peak:
                metrics["mfu"] = tflops * 1e12 / peak
            writer.scalars(step, {f"train/{k}": v for k, v in metrics.items() if v is not None})
            progress.log(format_metrics(step, t.steps, metrics))
            final.update(metrics)
            window_t, window_steps = time.perf_counter(), 0
        if valid_set is not None and t.eval_interval and (step % t.eval_interval == 0 or step == t.steps):
            val = evaluate(engine, valid_set, cfg, topo)
            writer.scalars(step, {"valid/loss": val, "valid/perplexity": perplexity(val)})
            progress.log(f"step {step}/{t.steps} | valid loss {val:.4f} | "
                         f"perplexity {perplexity(val):.2f}")
            final["valid_loss"] = val
            window_t = time.perf_counter()  # evaluation time is not training throughput
        if stop.requested():
            progress.log(f"SIGTERM: saving step {step} and exiting")
            final["checkpoint"] = str(save_checkpoint(engine, cfg, topo, step, source.sampler))
            final["preempted_at"] = step
            break
        if t.save_interval and step % t.save_interval == 0 and step != t.steps:
            save_checkpoint(engine, cfg, topo, step, source.sampler)
        progress.update(step)
    progress.close()
    if t.save_final and "preempted_at" not in final and step > start:
        final["checkpoint"] = str(save_checkpoint(engine, cfg, topo, step, source.sampler))
    writer.close()
    if is_logger:
        print(f"TensorBoard logs: {out_dir / 'tensorboard'}  (tensorboard --logdir {out_dir})",
              flush=True)
    dist.barrier()
    return final
