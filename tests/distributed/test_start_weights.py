"""A run started from saved weights trains *those* weights, under every optimizer the config can
reach: DeepSpeed's ZeRO 1/2/3 (pp 1) and ZeRO-1 (pp > 1), fp32 and bf16, megallama's ``fused``
and ``distributed``; started by ``trainer.init_from`` or by ``trainer.resume`` of a weights-only
directory (a converted Meta/HF model); at (tp, pp, dp) = (1, 1, 1), (2, 2, 1) and (2, 1, 2).

Every optimizer keeps a master copy of the parameters and writes it back after each step, so
weights loaded after the optimizer copied the random initialisation are used by the first forward
only: the loss of step 1 looks right and the run then trains a random model. The properties are
checked after two optimizer steps, so the loaded state must survive updates:

- at ``optim.lr=0`` every parameter equals the checkpoint's bit for bit (bf16: the checkpoint
  rounded to bf16, as the run's weights are);
- at a real learning rate (fp32) every parameter equals torch's AdamW (same parameter groups,
  clipping and LR schedule) applied to the checkpoint's weights on the same two global batches,
  within the tolerance test_updated_weights.py measured for summation-order round-off.

The checkpoint is a model initialised with another seed than the runs' (``trainer.seed``), so a
run that fell back to its own initialisation is off by the size of the weights.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from megallama.checkpoint.weights import save_model_weights
from megallama.config import preset
from megallama.config.grid import Grid
from megallama.config.train_config import TrainConfig
from megallama.data.packing import collate_windows
from megallama.data.sampler import DataSampler
from megallama.model.llama import Transformer
from megallama.parallel.layers import TensorParallel
from megallama.parallel.runtime import init_distributed
from megallama.parallel.topology import build_topology
from megallama.training.loop import Trainer, build_datasets
from tests.distributed.cli import VOCAB
from tests.distributed.engine_cases import reference_optimizer
from tests.distributed.harness import run_world
from tests.distributed.test_updated_weights import TOL, _full_weights

pytestmark = pytest.mark.slow

STEPS, CKPT_SEED, RUN_SEED, LR = 2, 123, 5, 1e-2

# (name, optim.impl, parallel.zero_stage, trainer.precision)
DS1, DS2, DS3 = ("ds-z1", "deepspeed", 1, "fp32"), ("ds-z2", "deepspeed", 2, "fp32"), \
    ("ds-z3", "deepspeed", 3, "fp32")
DS1_BF16, DS2_BF16 = ("ds-z1-bf16", "deepspeed", 1, "bf16"), ("ds-z2-bf16", "deepspeed", 2, "bf16")
FUSED, FUSED_BF16 = ("fused", "fused", 0, "fp32"), ("fused-bf16", "fused", 0, "bf16")
DIST, DIST_BF16 = ("distributed", "distributed", 0, "fp32"), \
    ("distributed-bf16", "distributed", 0, "bf16")
ALL_PP1 = [DS1, DS2, DS3, DS1_BF16, DS2_BF16, FUSED, FUSED_BF16, DIST, DIST_BF16]
# ZeRO-2/3 are incompatible with DeepSpeed's pipeline engine
ALL_PP2 = [DS1, DS1_BF16, FUSED, FUSED_BF16, DIST, DIST_BF16]


def make_config(token_files: Path, out: Path, tp: int, pp: int, optimizer: tuple, lr: float,
                start: str, ckpt: Path) -> TrainConfig:
    _, impl, zero, precision = optimizer
    cfg = TrainConfig()
    cfg.model = preset("tiny_gqa", vocab_size=VOCAB, n_layers=2)
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = tp, pp, zero
    cfg.parallel.micro_batch_size, cfg.parallel.global_batch_size = 2, 8
    cfg.optim.impl, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip = impl, lr, 1, 0.3
    cfg.data.train, cfg.data.valid, cfg.data.seq_len = [str(token_files / "train")], [], 16
    t = cfg.trainer
    t.precision, t.steps, t.seed, t.device, t.output_dir = precision, STEPS, RUN_SEED, "cpu", str(out)
    t.eval_interval, t.save_interval, t.save_final, t.progress = 0, 0, False, False
    if start == "init_from":
        t.init_from = str(ckpt)
    else:
        t.resume = str(ckpt)
    return cfg


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors read with safetensors alone (tp 1: each piece is the tensor)."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(ckpt.glob("model-pp*-tp*.safetensors")):
        out.update(load_file(shard))
    return out


def reference_after_steps(cfg: TrainConfig, ckpt: Path) -> dict[str, torch.Tensor]:
    """torch AdamW from the checkpoint's weights over the run's first global batches (the
    sampler's order at dp 1 is the concatenation of every DP rank's share)."""
    model = Transformer(cfg.model, seed=cfg.trainer.seed)
    model.load_state_dict(checkpoint_tensors(ckpt))
    opt, sched = reference_optimizer(model, cfg)
    dataset, _ = build_datasets(cfg)
    gbs, m = cfg.parallel.global_batch_size, cfg.parallel.micro_batch_size
    sampler = DataSampler(len(dataset), gbs, 0, 1, seed=cfg.trainer.seed, shuffle=True)
    for _ in range(cfg.trainer.steps):
        tokens, labels = collate_windows([dataset[i] for i in sampler.next_batch()])
        opt.zero_grad()
        for i in range(0, gbs, m):
            (model.loss(model(tokens[i:i + m]), labels[i:i + m]) / (gbs // m)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _write_checkpoint(rank: int, world: int, ckpt: Path) -> None:
    init_distributed(torch.device("cpu"))
    cfg = preset("tiny_gqa", vocab_size=VOCAB, n_layers=2)
    model = Transformer(cfg, seed=CKPT_SEED)
    save_model_weights(model.named_layers(), TensorParallel(), build_topology(Grid()), ckpt, cfg)


def _compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], exact: bool
             ) -> list[str]:
    bad = []
    for name, value in got.items():
        ref = want[name].to(value.dtype) if exact else want[name]
        err = (value.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
        if (exact and not torch.equal(value, ref)) or (not exact and not err <= TOL):
            bad.append(f"{name} {err:.2e}")
    return bad


def _worker(rank: int, world: int, token_files: Path, ckpt: Path, tmp: Path, cases) -> None:
    init_distributed(torch.device("cpu"))
    saved = checkpoint_tensors(ckpt)
    failures = []
    for (tp, pp), optimizer, start, lr in cases:
        what = f"{optimizer[0]} ({tp}, {pp}, {world // (tp * pp)}) {start} lr={lr}"
        out = tmp / what.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        cfg = make_config(token_files, out, tp, pp, optimizer, lr, start, ckpt)
        try:  # load errors are raised on every rank alike: report them with the other cases
            trainer = Trainer(cfg, Grid.from_world(world, tp=tp, pp=pp), torch.device("cpu"))
            trainer.train()
        except Exception as e:
            failures.append(f"{what}: {type(e).__name__}: {str(e)[-200:]}")
            continue
        got = _full_weights(trainer.engine, cfg)
        want = saved if lr == 0 else reference_after_steps(cfg, ckpt)
        if lr != 0:  # the oracle moved every parameter far beyond the tolerance
            moved = min((want[n] - saved[n]).abs().max() / saved[n].abs().max() for n in want)
            assert moved > 50 * TOL, f"{what}: the reference barely moved ({moved:.1e})"
        bad = _compare(got, want, exact=lr == 0)
        every: list = [None] * world
        dist.all_gather_object(every, bad)
        if any(every):
            failures.append(f"{what}: " + ", ".join(sorted({b for r in every for b in r})[:4]))
        del trainer
    assert not failures, "parameters after 2 steps differ from the checkpoint's " \
        "(lr=0: bit for bit) or from torch AdamW on the checkpoint:\n" + "\n".join(failures)


def _cases(layouts, optimizers, starts=("init_from", "resume")):
    out = []
    for layout, optimizer, start in itertools.product(layouts, optimizers, starts):
        out.append((layout, optimizer, start, 0.0))
        if optimizer[3] == "fp32" and start == "init_from":  # the loader is shared by both starts
            out.append((layout, optimizer, start, LR))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("start_weights") / "converted"
    run_world(1, _write_checkpoint, ckpt)
    return ckpt


def test_start_weights_survive_updates_one_rank(token_files, checkpoint, tmp_path):
    run_world(1, _worker, token_files, checkpoint, tmp_path, _cases([(1, 1)], ALL_PP1))


def test_start_weights_survive_updates_four_ranks(token_files, checkpoint, tmp_path):
    cases = _cases([(2, 2)], ALL_PP2) + _cases([(2, 1)], [DS1, DS2, DS3, DIST, DIST_BF16])
    run_world(4, _worker, token_files, checkpoint, tmp_path, cases)
