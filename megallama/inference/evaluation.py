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
from megallama.config import ConfigError, ModelConfig
from megallama.config.compose import load_saved_config
from megallama.config.grid import Grid
from megallama.config.train_config import TrainConfig
from megallama.config.validate import PACKINGS
from megallama.data.dataset import DatasetError, PackedDataset
from megallama.data.indexed import IndexedFormatError
from megallama.data.packing import blank_window, collate_windows, windows_for
from megallama.data.preprocess import preprocess
from megallama.data.sources import SourceError
from megallama.data.tokenizer import TokenizerError, check_vocab
from megallama.inference.loader import (
    PRECISIONS,
    InferenceModel,
    check_layout,
    inference_device,
    inspect_checkpoint,
    load_for_inference,
    open_tokenizer,
)
from megallama.parallel.cross_entropy import IGNORE_INDEX, perplexity, vocab_parallel_cross_entropy

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
    packing: str | None = None  # concat | documents | padded; None: the run's data.packing
    loss_mask: bool | None = None  # use the files' loss mask (chat data); None: the run's


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
    packing: str = "concat"  # resolved: --packing, else the run's data.packing
    loss_mask: bool = True  # resolved: --no-loss-mask, else the run's data.loss_mask


def _is_prefix(path: str) -> bool:
    return Path(path + ".idx").is_file() and Path(path + ".bin").is_file()


def _check_numbers(req: EvalRequest) -> None:
    """Sizes that make no sense (the command line's argparse types refuse them too; a caller of
    the API hears the same option names)."""
    for option, value, low in (("--tp", req.tp, 1), ("--pp", req.pp, 1),
                               ("--batch-size", req.batch_size, 1),
                               ("--micro-batch-size", req.micro_batch_size, 1),
                               ("--max-batches", req.max_batches, 0),
                               ("--seq-len", 1 if req.seq_len is None else req.seq_len, 1)):
        if value < low:
            raise ConfigError(f"{option} {value}: must be >= {low}")
    if req.precision not in PRECISIONS:
        raise ConfigError(f"--precision {req.precision}: expected one of {', '.join(PRECISIONS)}")
    if req.packing is not None and req.packing not in PACKINGS:
        raise ConfigError(f"--packing {req.packing}: expected one of {', '.join(PACKINGS)}")


def _check_data(data: Sequence[str], tokenizer: Path | None, explicit: bool,
                cfg: ModelConfig) -> None:
    """Every ``--data`` item is a token-file prefix or a file; text has a tokenizer, and a
    tokenizer in use (or given with ``explicit`` --tokenizer) is SentencePiece of the model's
    vocabulary."""
    if not data:
        raise ConfigError("--data: give at least one file")
    text = []
    for item in data:
        if _is_prefix(item):
            continue
        if not Path(item).is_file():
            kind = "a directory" if Path(item).is_dir() else "no such file"
            raise ConfigError(f"--data {item}: {kind}, and no token-file prefix ({item}.bin + "
                              ".idx); give text/JSONL files or token-file prefixes")
        text.append(item)
    if text and tokenizer is None:
        raise ConfigError(f"--data {text[0]} is text: pass --tokenizer (none found beside the "
                          "checkpoint nor in its run's config)")
    if tokenizer is not None and (text or explicit):
        check_vocab(open_tokenizer(tokenizer, explicit).vocab_size, cfg.vocab_size, tokenizer)


def _check_batches(req: EvalRequest, grid: Grid) -> None:
    if req.batch_size % (req.micro_batch_size * grid.dp):
        raise ConfigError(f"--batch-size {req.batch_size}: not divisible by --micro-batch-size * "
                          f"dp = {req.micro_batch_size}*{grid.dp}; change --batch-size or "
                          "--micro-batch-size")


def plan_evaluation(req: EvalRequest, world: int) -> EvalPlan:
    """Check a request against the checkpoint, the data and a world of ``world`` ranks; raises
    ConfigError / CheckpointError / TokenizerError (one line). No collectives."""
    _check_numbers(req)
    device = inference_device(req.device)
    info = inspect_checkpoint(Path(req.checkpoint), req.fmt)
    run = load_saved_config(info.run_config) if info.run_config else TrainConfig()
    seq_len = req.seq_len if req.seq_len is not None else run.data.seq_len
    method = run.parallel.partition_method
    grid = check_layout(info.cfg, req.tp, req.pp, world, seq_len=seq_len, partition_method=method)
    _check_batches(req, grid)
    tokenizer = Path(req.tokenizer) if req.tokenizer else info.tokenizer
    _check_data(req.data, tokenizer, req.tokenizer is not None, info.cfg)
    packing = req.packing if req.packing is not None else run.data.packing
    loss_mask = req.loss_mask if req.loss_mask is not None else run.data.loss_mask
    return EvalPlan(req, info.path, info.cfg, grid, seq_len, tokenizer, method, device, packing,
                    loss_mask)


def token_files(data: Sequence[str], tokenizer: Path | None, tmp: Path) -> list[str]:
    """The token-file prefix of every ``data`` item: a prefix stays, text is tokenized into
    ``tmp`` exactly as ``megallama-preprocess`` does (one prefix per item: equal names differ)."""
    return [_token_prefix(item, tokenizer, tmp / f"data{i}") for i, item in enumerate(data)]


def check_windows(data: Sequence[str], prefixes: Sequence[str], seq_len: int,
                  packing: str = "concat") -> None:
    """Every item must hold at least one window; the error names the ``--data`` item (not the
    temporary tokenization of a text file)."""
    for item, prefix in zip(data, prefixes, strict=True):
        try:
            windows = len(_windows(prefix, seq_len, packing, True))
        except DatasetError:  # not even one window (or, by document, no document to predict)
            windows = 0
        if windows < 1:
            raise ConfigError(f"--data {item}: no window of {seq_len + 1} tokens (--packing "
                              f"{packing}); give more data or lower --seq-len")


def _windows(prefix: str, seq_len: int, packing: str, loss_mask: bool):
    """The windows of a token file as the trainer reads them for ``data.packing``."""
    return windows_for(PackedDataset(prefix, seq_len), packing, loss_mask)


def evaluate(plan: EvalPlan) -> dict:
    """Load the checkpoint at the plan's layout and return ``{"val_loss", "perplexity",
    "tokens"}``, the same on every rank. Collective over the world.

    Text is tokenized and every item's windows counted before the model is loaded (and
    torch.distributed started): such errors stop every rank alike, before any collective."""
    req = plan.request
    with tempfile.TemporaryDirectory(prefix="megallama-evaluate-") as tmp:
        prefixes = token_files(req.data, plan.tokenizer, Path(tmp))
        check_windows(req.data, prefixes, plan.seq_len, plan.packing)
        model = load_for_inference(plan.checkpoint, req.fmt, tp=req.tp, pp=req.pp,
                                   dtype=PRECISIONS[req.precision], device=plan.device,
                                   seq_len=plan.seq_len, partition_method=plan.partition_method)
        return validation_loss(model, prefixes, seq_len=plan.seq_len,
                               batch_size=req.batch_size, micro_batch_size=req.micro_batch_size,
                               max_batches=req.max_batches, packing=plan.packing,
                               loss_mask=plan.loss_mask)


def _token_prefix(item: str, tokenizer: Path | None, prefix: Path) -> str:
    """``item`` itself if it is a token-file prefix, else its tokenization at ``prefix``."""
    if _is_prefix(item):
        return item
    if tokenizer is None:
        raise ConfigError(f"--data {item} is text: pass --tokenizer")
    preprocess([item], prefix, tokenizer, workers=1, progress=False)
    return str(prefix)


def _summed_loss(model: InferenceModel, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sum (not the mean) of the token losses of one micro-batch, float64 (0 without
    targets, e.g. the blank windows that fill a short last batch)."""
    labels = labels.to(logits.device)
    count = (labels != IGNORE_INDEX).sum()
    if int(count) == 0:
        return torch.zeros((), dtype=torch.float64, device=logits.device)
    mean = vocab_parallel_cross_entropy(logits, labels, model.tp.group, model.cfg.vocab_size)
    return mean.double() * count


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
                    tokenizer: Path | None = None, packing: str = "concat",
                    loss_mask: bool = True) -> dict:
    """Token-weighted loss over every window of ``data`` (token-file prefixes or text files),
    each once, in global batches of ``batch_size`` windows (at most ``max_batches`` per file, 0:
    all; a short last batch is filled with windows that have no target), the windows and targets
    made as the trainer makes them (``packing``, ``loss_mask``); the same dict on every rank.
    Collective over the model's world."""
    topo = model.topo
    dp, dp_rank = (topo.grid.dp, topo.dp_rank) if topo is not None else (1, 0)
    per_rank = batch_size // dp
    loss_sum = torch.zeros((), dtype=torch.float64, device=model.device)
    windows = targets = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, item in enumerate(data):
            prefix = _token_prefix(item, tokenizer, Path(tmp) / f"data{i}")
            ds = _windows(prefix, seq_len, packing, loss_mask)
            n = len(ds) if not max_batches else min(len(ds), max_batches * batch_size)
            for b in range(-(-n // batch_size)):
                lo = b * batch_size + dp_rank * per_rank
                batch = collate_windows([ds[j] if j < n else blank_window(ds[0])
                                         for j in range(lo, lo + per_rank)])
                for micro in zip(*(t.split(micro_batch_size) for t in batch), strict=True):
                    labels, segments = micro[1], (micro[2] if len(micro) == 3 else None)
                    targets += int((labels != IGNORE_INDEX).sum())
                    logits = model(micro[0], segments=segments)
                    if logits is not None:
                        loss_sum += _summed_loss(model, logits, labels)
            windows += n
    count = torch.tensor(float(targets), dtype=torch.float64, device=model.device)
    if topo is not None and dp > 1:
        dist.all_reduce(count, group=topo.dp_group)  # gloo or NCCL: the DP group's device
    val = _total_over_ranks(model, loss_sum) / max(float(count), 1.0)
    return {"val_loss": val, "perplexity": perplexity(val), "tokens": int(count),
            "windows": windows}


__all__ = ["INPUT_ERRORS", "EvalPlan", "EvalRequest", "check_windows", "evaluate", "perplexity",
           "plan_evaluation", "token_files", "validation_loss"]
