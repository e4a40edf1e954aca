"""The Llama 3.1 8B presets compose, validate at their layouts and fit by the planner: the layout
the YAML comments justify with megallama-plan's numbers is the one the planner still fits in
80 GiB (tp 2 x dp 4, SP, no recomputation, the distributed optimizer at 8192 tokens)."""

from __future__ import annotations

import pytest

from megallama.config import preset
from megallama.config.compose import load_config
from megallama.config.validate import check_optim, check_parallel, resolve_optimizer
from megallama.parallel.topology import Grid
from megallama.training import planner

GIB = 2**30


def planned(cfg, world: int) -> planner.MemoryEstimate:
    """The planner's estimate (80 GiB, 3 GiB overhead, as megallama-plan) of the preset's layout."""
    par = cfg.parallel
    layout = planner.Layout(tp=par.tp, pp=par.pp, dp=world // (par.tp * par.pp),
                            micro_batch=par.micro_batch_size)
    return planner.estimate(cfg.model, layout, seq_len=cfg.data.seq_len,
                            global_batch=par.global_batch_size, precision=cfg.trainer.precision,
                            zero_stage=None, optim_impl="auto",
                            activation_checkpointing=par.activation_checkpointing,
                            sequence_parallel=par.sequence_parallel, overhead_bytes=3 * GIB)


@pytest.mark.parametrize("name,batch,tokens_per_step", [
    ("llama3_1_8b_pretrain", 512, 512 * 8192),
    ("llama3_1_8b_sft", 64, 64 * 8192),
])
def test_llama3_1_8b_presets_compose_validate_and_fit(name: str, batch: int,
                                                      tokens_per_step: int) -> None:
    cfg = load_config([f"experiment={name}"])
    assert cfg.model == preset("llama3_1_8b")  # 128,256 ids, llama3 RoPE scaling, GQA 32/8
    assert cfg.parallel.global_batch_size * cfg.data.seq_len == tokens_per_step
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.sequence_parallel) == (2, 1, True)
    assert cfg.trainer.precision == "bf16" and cfg.parallel.global_batch_size == batch
    resolve_optimizer(cfg, 8)  # bf16 at dp 4: the distributed optimizer, ZeRO off
    assert (cfg.optim.impl, cfg.parallel.zero_stage) == ("distributed", 0)
    check_optim(cfg.optim)
    assert check_parallel(cfg.parallel, cfg.model, cfg.data.seq_len, 8) == Grid(tp=2, pp=1, dp=4)
    assert check_parallel(cfg.parallel, cfg.model, cfg.data.seq_len, 32).dp == 16
    est = planned(cfg, 8)
    assert est.fits and est.bubble == 0.0 and est.total < 70 * GIB, est.total / GIB
    if name.endswith("_sft"):  # answers-only loss on whole dialogs, from converted weights
        assert (cfg.data.packing, cfg.data.loss_mask) == ("documents", True)
        assert (cfg.optim.lr, cfg.optim.min_lr_ratio, cfg.trainer.epochs) == (1e-5, 0.0, 2)
        assert cfg.trainer.init_from and cfg.trainer.eval_at_start
    else:
        assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.trainer.steps) == (3e-4, 8000, 500000)
