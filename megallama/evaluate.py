"""``python -m megallama.evaluate --checkpoint DIR --data FILE...`` -- validation loss at any layout.

Prints one JSON line ``{"val_loss": ..., "perplexity": ..., "tokens": ...}`` on stdout (rank 0).
Evaluation uses the same windows at every layout: whole global batches of ``--batch-size``
sequences of ``seq_len + 1`` tokens, every label counted, so TP/PP/DP change nothing but round-off.
Text inputs (.txt/.jsonl, optionally compressed) are tokenized with the checkpoint's tokenizer
exactly as ``megallama-preprocess`` does; preprocessed token files are given by their prefix.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from megallama.config import ConfigError, ModelConfig
from megallama.config.training import TrainConfig
from megallama.parallel.runtime import init_distributed, resolve_device, world_info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megallama-evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="a step directory, a checkpoints/ root (its latest) or a run directory")
    p.add_argument("--data", nargs="+", required=True, help="text/JSONL files or token-file prefixes")
    p.add_argument("--tokenizer", help="tokenizer.model for text inputs (default: the run's)")
    p.add_argument("--seq-len", type=int, help="default: the run's data.seq_len")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per global batch")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--max-batches", type=int, default=0, help="0: the whole data")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def resolve_checkpoint(path: Path) -> tuple[Path, Path | None]:
    """(step directory, the run's saved config.yaml if found)."""
    from megallama.checkpoint.weights import INDEX_NAME, latest_checkpoint

    for candidate in (path, path / "checkpoints"):
        if (candidate / INDEX_NAME).is_file():
            step = candidate
            break
        latest = latest_checkpoint(candidate) if candidate.is_dir() else None
        if latest is not None:
            step = latest
            break
    else:
        raise ConfigError(f"{path}: no checkpoint (no {INDEX_NAME} and no complete step_* inside)")
    run_config = step.parent.parent / "config.yaml"
    return step, run_config if run_config.is_file() else None


def _is_prefix(path: str) -> bool:
    return Path(path + ".idx").is_file() and Path(path + ".bin").is_file()


def plan(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    """Everything checkable before torch.distributed starts."""
    from megallama.checkpoint.weights import read_index
    from megallama.config.compose import load_saved_config

    step_dir, run_config = resolve_checkpoint(Path(args.checkpoint))
    model = ModelConfig(**read_index(step_dir)["model_config"])
    cfg = load_saved_config(run_config) if run_config else TrainConfig()
    cfg.model = model
    cfg.data.seq_len = args.seq_len or cfg.data.seq_len
    cfg.data.tokenizer = args.tokenizer or cfg.data.tokenizer
    p = cfg.parallel
    p.tp, p.pp, p.dp, p.zero_stage = args.tp, args.pp, None, 1
    p.micro_batch_size, p.global_batch_size = args.micro_batch_size, args.batch_size
    p.activation_checkpointing = False
    cfg.trainer.precision, cfg.trainer.device, cfg.trainer.steps = args.precision, args.device, 1
    for item in args.data:
        if not _is_prefix(item) and not Path(item).is_file():
            raise ConfigError(f"--data {item}: neither a file nor a token-file prefix (.bin/.idx)")
        if not _is_prefix(item) and not (cfg.data.tokenizer and Path(cfg.data.tokenizer).is_file()):
            raise ConfigError(f"--data {item} is text: pass --tokenizer (the run's was "
                              f"{cfg.data.tokenizer!r})")
    from megallama.config.validate import check_parallel

    check_parallel(p, cfg.model, cfg.data.seq_len, world_info()[1])
    if args.batch_size % (args.micro_batch_size * (world_info()[1] // (args.tp * args.pp))):
        raise ConfigError("--batch-size must be divisible by --micro-batch-size * dp")
    return cfg, step_dir


def _token_prefix(item: str, tokenizer: str | None, tmp: Path) -> str:
    if _is_prefix(item):
        return item
    from megallama.data.preprocess import preprocess

    prefix = tmp / Path(item).name.split(".")[0]
    preprocess([item], prefix, tokenizer, workers=1, progress=False)
    return str(prefix)


def evaluate_files(cfg: TrainConfig, step_dir: Path, data: list[str], max_batches: int) -> dict:
    """Token-weighted loss over all files, at the current layout (collective)."""
    from megallama.checkpoint.weights import load_model_weights
    from megallama.data.dataset import PackedDataset, collate
    from megallama.engine.deepspeed_engine import Engine, perplexity
    from megallama.parallel.topology import Grid, build_topology, kv_replicas_for

    world = world_info()[1]
    grid = Grid.from_world(world, tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    topo = build_topology(grid, kv_replicas_for(cfg.model.n_kv_heads, grid.tp))
    device = resolve_device(cfg.trainer.device)
    engine = Engine(cfg, topo, device)
    load_model_weights(engine.local_layers(), engine.tp, step_dir, cfg.model)
    batch, micro = cfg.parallel.global_batch_size, cfg.parallel.micro_batch_size
    per_rank = batch // grid.dp
    loss_sum, tokens = 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for item in data:
            ds = PackedDataset(_token_prefix(item, cfg.data.tokenizer, Path(tmp)), cfg.data.seq_len)
            n_batches = len(ds) // batch
            if max_batches:
                n_batches = min(n_batches, max_batches)
            if n_batches == 0:
                raise ConfigError(f"{item}: fewer than --batch-size={batch} windows of "
                                  f"{cfg.data.seq_len + 1} tokens")
            micro_batches = []
            for b in range(n_batches):
                lo = b * batch + topo.dp_rank * per_rank
                tok, lab = collate([ds[i] for i in range(lo, lo + per_rank)])
                micro_batches += list(zip(tok.split(micro), lab.split(micro), strict=True))
            loss = engine.eval_loss(micro_batches)
            n_tokens = n_batches * batch * cfg.data.seq_len
            loss_sum, tokens = loss_sum + loss * n_tokens, tokens + n_tokens
    val = loss_sum / tokens
    return {"val_loss": val, "perplexity": perplexity(val), "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, _ = world_info()
    try:
        cfg, step_dir = plan(args)
        device = resolve_device(cfg.trainer.device)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if rank == 0:
            print(f"megallama.evaluate: error: {e}", file=sys.stderr)
        return 2
    init_distributed(device)
    torch.manual_seed(0)
    result = evaluate_files(cfg, step_dir, args.data, args.max_batches)
    if rank == 0:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
