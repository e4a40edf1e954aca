"""Checkpoint save/load benchmark on CPU (one process, gloo world of one).

Reports save and load (resume) seconds, bytes per rank, and the ratio of checkpoint bytes to the
theoretical minimum: weights (training dtype) + fp32 master weights + two fp32 Adam moments.

    python tools/bench_checkpoint.py --preset tiny
    python tools/bench_checkpoint.py --dim 1536 --layers 12 --heads 16   # ~0.4B parameters
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(args: argparse.Namespace) -> dict:
    from megallama.config import preset
    from megallama.config.train_config import TrainConfig
    from megallama.data.sampler import DataSampler
    from megallama.engine import Engine
    from megallama.parallel.runtime import init_distributed
    from megallama.parallel.topology import Grid, build_topology
    from megallama.training.train_state import TrainingState

    device = torch.device("cpu")
    init_distributed(device)
    cfg = TrainConfig()
    over = {"vocab_size": 32000}
    if args.dim:
        over.update(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads)
    cfg.model = preset(args.preset, **over)
    cfg.parallel.micro_batch_size = cfg.parallel.global_batch_size = 1
    cfg.data.seq_len, cfg.trainer.steps = 16, 10
    topo = build_topology(Grid())
    n_params = cfg.model.num_parameters()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cfg.trainer.output_dir = tmp
        engine = Engine(cfg, topo, device)
        tokens = torch.randint(0, cfg.model.vocab_size, (1, 16))
        engine.train_step([(tokens, tokens)])  # Adam state exists, as in a real run
        sampler = DataSampler(1000, 1, 0, 1)
        t0 = time.perf_counter()
        path = TrainingState(engine, cfg, topo, sampler).save(1)
        save_s = time.perf_counter() - t0
        size = dir_bytes(path)
        fresh = Engine(cfg, topo, device)
        t0 = time.perf_counter()
        TrainingState(fresh, cfg, topo, DataSampler(1000, 1, 0, 1)).resume(path)
        load_s = time.perf_counter() - t0
    minimum = n_params * (4 + 4 + 8)  # fp32 weights + fp32 master + exp_avg + exp_avg_sq
    return {"parameters": n_params, "save_s": round(save_s, 3), "load_s": round(load_s, 3),
            "bytes_per_rank": size, "theoretical_min_bytes": minimum,
            "ratio_to_min": round(size / minimum, 4),
            "save_GBps": round(size / save_s / 1e9, 3), "load_GBps": round(size / load_s / 1e9, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dim", type=int, default=0)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dir", default=None, help="where to write (default: system temp)")
    print(json.dumps(run(p.parse_args())))


if __name__ == "__main__":
    main()
