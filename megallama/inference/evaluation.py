"""Validation loss of a checkpoint at any (tp, pp, dp), on the inference loader (no optimizer,
no DeepSpeed).

Every layout evaluates the same windows: whole global batches of ``batch_size`` sequences of
``seq_len + 1`` tokens (``PackedDataset``), every label counted; DP rank r takes the r-th slice
of each global batch and splits it into micro-batches, which flow through the pipeline one after
the other. The last stage sums the token losses (the vocab-parallel cross-entropy, fp32) in
float64, the sums are added over DP and broadcast from the last stage to the whole pipeline, so
TP/PP/DP change nothing but fp32 round-off. Text inputs (.txt/.jsonl, optionally compressed) are
tokenized with the checkpoint's tokenizer exactly as ``megallama-preprocess`` does.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megallama.checkpoint.atomic import CheckpointError
from megallama.config import ConfigError, ModelConfig, check_tp_layout
from megallama.config.compose import load_saved_config
from megallama.config.grid import Grid
from megallama.config.train_config import TrainConfig
from megallama.data.dataset import DatasetError, PackedDataset, collate
from megallama.data.indexed import IndexedFormatError
from megallama.data.preprocess import preprocess
from megallama.data.sources import SourceError
from megallama.data.tokenizer import Tokenizer, TokenizerError, check_vocab
from megallama.inference.loader import (
    PRECISIONS,
    InferenceModel,
    inspect_checkpoint,
    load_for_inference,
)
from megallama.model import layout
from megallama.parallel.cross_entropy import IGNORE_INDEX, perplexity, vocab_parallel_cross_entropy
from megallama.parallel.runtime import resolve_device

# bad input found while evaluating (on every rank alike): one line, exit code 2
INPUT_ERRORS = (ConfigError, CheckpointError, DatasetError, IndexedFormatError, SourceError,
                TokenizerError, OSError)


@dataclass(frozen=True)
class EvalRequest:
    """What the user asked for (the command line's options)."""

    checkpoint: Path
    data: Sequence[str]
    fmt: str = "megallama"
    tokenizer: Path | None = None  # default: beside the weights, else the run's
    seq_len: int | None = None  # default: the run's data.seq_len
    tp: int = 1
    pp: int = 1
    batch_size: int = 8
    micro_batch_size: int = 1
    max_batches: int = 0  # 0: all whole batches
    precision: str = "fp32"
    device: str = "auto"


@dataclass(frozen=True)
class EvalPlan:
    """A checked request: everything resolved before torch.distributed starts."""

    request: EvalRequest
    checkpoint: Path  # the step directory or the Meta / HF directory
    cfg: ModelConfig
    grid: Grid
    seq_len: int
    tokenizer: Path | None
    partition_method: str  # the run's, so that stages are those training used
    device: torch.device


def _is_prefix(path: str) -> bool:
    return Path(path + ".idx").is_file() and Path(path + ".bin").is_file()


def _check_data(data: Sequence[str], tokenizer: Path | None, cfg: ModelConfig) -> None:
    if not data:
        raise ConfigError("--data: give at least one file")
    for item in data:
        if _is_prefix(item):
            continue
        if not Path(item).is_file():
            raise ConfigError(f"--data {item}: neither a file nor a token-file prefix (.bin/.idx)")
        if tokenizer is None:
            raise ConfigError(f"--data {item} is text: pass --tokenizer (none found beside the "
                              "checkpoint nor in its run's config)")
        if not tokenizer.is_file():
            raise ConfigError(f"--tokenizer {tokenizer}: no such file")
    if tokenizer is not None and not all(_is_prefix(item) for item in data):
        check_vocab(Tokenizer(tokenizer).vocab_size, cfg.vocab_size, tokenizer)


def _check_layout(req: EvalRequest, cfg: ModelConfig, world: int, seq_len: int,
                  method: str) -> Grid:
    grid = Grid.from_world(world, tp=req.tp, pp=req.pp)
    check_tp_layout(cfg, req.tp)
    layout.stage_cuts(cfg, req.pp, seq_len, method)  # pp <= n_layers, a known method
    if req.micro_batch_size < 1 or req.batch_size < 1 or req.max_batches < 0:
        raise ConfigError("--batch-size and --micro-batch-size must be >= 1, --max-batches >= 0")
    if req.batch_size % (req.micro_batch_size * grid.dp):
        raise ConfigError(f"--batch-size must be divisible by --micro-batch-size * dp = "
                          f"{req.micro_batch_size}*{grid.dp}")
    return grid


def plan_evaluation(req: EvalRequest, world: int) -> EvalPlan:
    """Check a request against the checkpoint, the data and a world of ``world`` ranks; raises
    ConfigError / CheckpointError / TokenizerError (one line). No collectives."""
    if req.precision not in PRECISIONS:
        raise ConfigError(f"--precision {req.precision}: expected one of {', '.join(PRECISIONS)}")
    info = inspect_checkpoint(Path(req.checkpoint), req.fmt)
    run = load_saved_config(info.run_config) if info.run_config else TrainConfig()
    seq_len = req.seq_len or run.data.seq_len
    if seq_len < 1:
        raise ConfigError(f"--seq-len {seq_len}: must be >= 1")
    tokenizer = Path(req.tokenizer) if req.tokenizer else info.tokenizer
    grid = _check_layout(req, info.cfg, world, seq_len, run.parallel.partition_method)
    _check_data(req.data, tokenizer, info.cfg)
    return EvalPlan(req, info.path, info.cfg, grid, seq_len, tokenizer,
                    run.parallel.partition_method, resolve_device(req.device))


def evaluate(plan: EvalPlan) -> dict:
    """Load the checkpoint at the plan's layout and return ``{"val_loss", "perplexity",
    "tokens"}``, the same on every rank. Collective over the world."""
    req = plan.request
    model = load_for_inference(plan.checkpoint, req.fmt, tp=req.tp, pp=req.pp,
                               dtype=PRECISIONS[req.precision], device=plan.device,
                               seq_len=plan.seq_len, partition_method=plan.partition_method)
    return validation_loss(model, req.data, seq_len=plan.seq_len, batch_size=req.batch_size,
                           micro_batch_size=req.micro_batch_size, max_batches=req.max_batches,
                           tokenizer=plan.tokenizer)


def _token_prefix(item: str, tokenizer: Path | None, tmp: Path) -> str:
    """``item`` itself if it is a token-file prefix, else its tokenization in ``tmp``."""
    if _is_prefix(item):
        return item
    if tokenizer is None:
        raise ConfigError(f"--data {item} is text: pass --tokenizer")
    prefix = tmp / Path(item).name.split(".")[0]
    preprocess([item], prefix, tokenizer, workers=1, progress=False)
    return str(prefix)


def _summed_loss(model: InferenceModel, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sum (not the mean) of the token losses of one micro-batch, float64."""
    labels = labels.to(logits.device)
    mean = vocab_parallel_cross_entropy(logits, labels, model.tp.group, model.cfg.vocab_size)
    return mean.double() * (labels != IGNORE_INDEX).sum()


def _total_over_ranks(model: InferenceModel, loss_sum: torch.Tensor) -> float:
    """Add the last stage's sums over DP and hand the total to every stage."""
    topo = model.topo
    if topo is None:
        return float(loss_sum)
    if topo.is_last_stage and topo.grid.dp > 1:
        dist.all_reduce(loss_sum, group=topo.dp_group)
    return float(model.broadcast_from_last(loss_sum))


@torch.no_grad()
def validation_loss(model: InferenceModel, data: Sequence[str], *, seq_len: int, batch_size: int,
                    micro_batch_size: int = 1, max_batches: int = 0,
                    tokenizer: Path | None = None) -> dict:
    """Token-weighted loss over all of ``data`` (token-file prefixes or text files) in whole
    global batches of ``batch_size`` windows (at most ``max_batches`` per file, 0: all); the same
    dict on every rank. Collective over the model's world."""
    topo = model.topo
    dp, dp_rank = (topo.grid.dp, topo.dp_rank) if topo is not None else (1, 0)
    per_rank = batch_size // dp
    loss_sum = torch.zeros((), dtype=torch.float64, device=model.device)
    tokens = 0
    with tempfile.TemporaryDirectory() as tmp:
        for item in data:
            ds = PackedDataset(_token_prefix(item, tokenizer, Path(tmp)), seq_len)
            n_batches = len(ds) // batch_size
            if max_batches:
                n_batches = min(n_batches, max_batches)
            if n_batches == 0:
                raise ConfigError(f"{item}: fewer than --batch-size={batch_size} windows of "
                                  f"{seq_len + 1} tokens")
            for b in range(n_batches):
                lo = b * batch_size + dp_rank * per_rank
                tok, lab = collate([ds[i] for i in range(lo, lo + per_rank)])
                for t, labels in zip(tok.split(micro_batch_size), lab.split(micro_batch_size),
                                     strict=True):
                    logits = model(t)
                    if logits is not None:
                        loss_sum += _summed_loss(model, logits, labels)
            tokens += n_batches * batch_size * seq_len
    val = _total_over_ranks(model, loss_sum) / tokens
    return {"val_loss": val, "perplexity": perplexity(val), "tokens": tokens}


__all__ = ["INPUT_ERRORS", "EvalPlan", "EvalRequest", "evaluate", "perplexity", "plan_evaluation",
           "validation_loss"]
