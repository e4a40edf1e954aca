"""LR schedule, AdamW groups; FLOPs/token, device peaks, TensorBoard writer, progress, log line."""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
import tqdm.std
from torch import nn

from megallama.config import preset
from megallama.config.train_config import OptimConfig
from megallama.model.llama import Transformer
from megallama.optim.schedule import build_optimizer, lr_at, param_groups
from megallama.training.metrics import (
    MetricsWriter,
    Progress,
    device_peak_flops,
    flops_per_token,
    format_metrics,
    peak_flops_for_name,
    peak_memory_bytes,
)

# ---- schedule ----------------------------------------------------------------------------------
CFG = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)  # decay end: total_steps = 110


@pytest.mark.parametrize("step,expected", [
    (0, 1e-4),         # warmup start: the first update already uses peak/warmup
    (4, 5e-4),         # mid-warmup
    (9, 1e-3),         # last warmup step reaches the peak
    (10, 1e-3),        # cosine start = peak
    (35, 1e-4 + 9e-4 * (1 + math.cos(math.pi / 4)) / 2),  # quarter of the cosine
    (60, 5.5e-4),      # mid-cosine: halfway between peak and floor
    (110, 1e-4),       # end of decay: min_lr_ratio * peak
    (5000, 1e-4),      # constant afterwards
])
def test_lr_schedule_formula(step, expected):
    assert lr_at(step, CFG, total_steps=110) == pytest.approx(expected, rel=1e-12)


def test_lr_schedule_variants():
    explicit = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, decay_steps=60)
    assert lr_at(35, explicit, total_steps=1000) == pytest.approx(5.5e-4)  # decay_steps wins
    assert lr_at(60, explicit, total_steps=1000) == pytest.approx(1e-4)
    no_warmup = OptimConfig(lr=2e-3, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(0, no_warmup, 100) == 2e-3 and lr_at(100, no_warmup, 100) == 0.0
    short = OptimConfig(lr=1e-3, warmup_steps=50, min_lr_ratio=0.1)  # run shorter than warmup
    assert lr_at(19, short, 20) == pytest.approx(4e-4)
    assert lr_at(60, short, 20) == pytest.approx(1e-4)
    with pytest.raises(ValueError):
        lr_at(-1, CFG, 110)


def test_lambdalr_follows_lr_at():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    opt, sched = build_optimizer(model.named_parameters(), CFG, total_steps=110)
    model(torch.ones(2, 3)).sum().backward()  # gradients kept: every step really updates
    seen = []
    for _ in range(130):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for step, lrs in enumerate(seen):
        assert lrs == pytest.approx([lr_at(step, CFG, 110)] * 2, rel=1e-12), step
    decay, no_decay = opt.param_groups
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-5
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sched.state_dict()["last_epoch"] == 130


def test_no_weight_decay_on_1d_params():
    model = Transformer(preset("tiny_gqa", vocab_size=256, n_layers=2))
    named = dict(model.named_parameters())
    groups = param_groups(model.named_parameters(), weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    names_no_decay = {n for n, p in named.items() if id(p) in no_decay}
    assert names_no_decay == {"norm.weight"} | {f"layers.{i}.{k}.weight" for i in range(2)
                                                for k in ("attention_norm", "ffn_norm")}
    assert id(named["tok_embeddings.weight"]) in decay and id(named["output.weight"]) in decay
    assert len(decay) + len(no_decay) == len(named)


def test_param_groups_skip_frozen_and_empty():
    lin = nn.Linear(2, 2, bias=False)
    frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
    groups = param_groups([("w", lin.weight), ("f", frozen)], 0.1)
    assert len(groups) == 1 and groups[0]["params"] == [lin.weight]


# ---- FLOPs and peaks ----------------------------------------------------------------------------
def test_flops_per_token_llama2_7b():
    d, layers, ffn, vocab, seq = 4096, 32, 11008, 32000, 4096
    attention = 4 * d * d  # wq, wk, wv, wo (MHA: 32 KV heads of 128)
    block = attention + 3 * d * ffn + 2 * d  # + w1, w2, w3 and the two RMSNorm gains
    n_prime = layers * block + d + vocab * d  # + final norm and the output head, no embedding
    assert n_prime == 6_607_343_616
    expected = 6 * n_prime + 12 * layers * d * seq
    assert expected == 46_086_512_640
    assert flops_per_token(preset("llama2_7b"), 4096) == expected


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12),
    ("NVIDIA L4", 121e12), ("Tesla V100-SXM2-32GB", None), ("NVIDIA GeForce RTX 3090", None),
])
def test_peak_flops_table(name, peak):
    assert peak_flops_for_name(name) == peak


def test_device_peak_flops_none_without_an_honest_figure():
    assert device_peak_flops("cpu", "bf16") is None
    assert device_peak_flops("cuda", "fp32") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to name")
def test_device_peak_flops_of_this_gpu():
    name = torch.cuda.get_device_name()
    assert device_peak_flops("cuda", "bf16") == peak_flops_for_name(name)


def _resident_bytes() -> int:
    """This process's current (not peak) resident set size, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                    reason="reads the current RSS from /proc/self/statm (Linux only)")
def test_peak_memory_cpu_is_rss():
    before = peak_memory_bytes("cpu")
    assert 20 * 2**20 < before < 2**40  # torch alone is tens of MiB resident
    # The peak only grows once the resident set passes it: allocate what earlier tests of this
    # process left between the current RSS and the peak, plus GROWTH, and write every page.
    growth = 256 * 2**20
    headroom = max(0, before - _resident_bytes())
    block = torch.ones(headroom + growth, dtype=torch.uint8)
    block += 1
    after = peak_memory_bytes("cpu")
    assert after - before >= 0.75 * growth, (
        f"peak grew by {(after - before) / 2**20:.0f} MiB after touching "
        f"{block.numel() / 2**20:.0f} MiB (expected >= {0.75 * growth / 2**20:.0f})")
    assert peak_memory_bytes(torch.device("cpu")) == after  # a torch.device reads the same
    del block


# ---- reporting ---------------------------------------------------------------------------------
def test_metrics_writer_round_trip(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path / "tb", enabled=True) as w:
        w.scalars(1, {"train/loss": 5.25, "train/lr": 1e-3, "train/skipped": None})
        w.scalars(2, {"train/loss": torch.tensor(4.5), "train/lr": 2e-3})
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr"}
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    lr = [(e.step, e.value) for e in acc.Scalars("train/lr")]
    assert loss == [(1, 5.25), (2, 4.5)]
    assert [s for s, _ in lr] == [1, 2] and lr[1][1] == pytest.approx(2e-3, rel=1e-6)


def test_metrics_writer_disabled_writes_nothing(tmp_path):
    off, no_dir = MetricsWriter(tmp_path / "off", enabled=False), MetricsWriter(None, enabled=True)
    for writer in (off, no_dir):
        writer.scalars(1, {"loss": 1.0})
        writer.close()
        assert not writer.enabled
    assert not (tmp_path / "off").exists()


class _FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> _FakeClock:
    """tqdm's clock (``self._time``, bound from ``tqdm.std.time`` when a bar is made)."""
    fake = _FakeClock()
    monkeypatch.setattr(tqdm.std, "time", fake)
    return fake


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run_progress(clock, stream, total=20, **kw) -> Progress:
    progress = Progress(total, enabled=True, stream=stream, tokens_per_step=1000, **kw)
    for step in range(1, total + 1):
        clock.now += 0.5  # 2 it/s
        progress.update(step)
        if step == 10:
            progress.log("step 10/20 | loss 1.0000")
    progress.close()
    return progress


def test_progress_log_lines_only_when_not_a_tty(clock):
    out = io.StringIO()
    progress = _run_progress(clock, out)
    assert not progress.drawn
    assert out.getvalue() == "step 10/20 | loss 1.0000\n"  # no bar in a log file or pipe


def test_progress_redraws_in_place_on_a_tty(clock):
    out = _Tty()
    _run_progress(clock, out)
    text = out.getvalue()
    assert text.count("\r") >= 20 and text.endswith("\n")
    final = text.rstrip("\n").split("\r")[-1]
    assert "20/20" in final and "100%" in final and "ETA 00:00" in final
    assert "2.00step/s" in final and "2,000 tok/s" in final
    # the log line is printed on its own line (bar cleared first) and the bar redrawn below it
    before, after = text.split("step 10/20 | loss 1.0000\n")
    assert before.endswith("\r") and after.startswith("\rtrain:  50%")


def test_progress_forced_on_shows_rate_and_eta(clock):
    out = io.StringIO()
    progress = Progress(20, enabled=True, stream=out, tokens_per_step=1000, force=True)
    for step in range(1, 11):
        clock.now += 0.5
        progress.update(step)
    last = out.getvalue().split("\r")[-1]
    assert "10/20" in last and "50%" in last and "2.00step/s" in last
    assert "elapsed 00:05" in last and "ETA 00:05" in last and "2,000 tok/s" in last


def test_progress_disabled_and_log_only(clock):
    out = _Tty()
    off = Progress(5, enabled=False, stream=out)  # not the reporting rank
    off.update(5)
    off.log("hidden")
    off.close()
    assert out.getvalue() == ""
    quiet = Progress(5, enabled=True, stream=out, bar=False)  # trainer.progress=false
    quiet.update(5)
    quiet.log("shown")
    quiet.close()
    assert out.getvalue() == "shown\n"


def test_progress_slow_steps_and_resume(clock):
    out = _Tty()
    progress = Progress(100, enabled=True, stream=out, initial=50, tokens_per_step=100)
    clock.now += 40.0
    progress.update(60)  # 10 steps in 40 s since the resume at 50
    last = out.getvalue().split("\r")[-1]
    assert "60/100" in last and "4.00s/step" in last and "ETA 02:40" in last
    assert "25 tok/s" in last


def test_format_metrics():
    line = format_metrics(10, 300, {
        "tokens_per_s": 12345.4, "loss": 5.12341, "lr": 1e-3, "grad_norm": torch.tensor(1.2341),
        "tflops": 0.1234, "mem_bytes": 1.2 * 2**30, "mfu": 0.4123, "skipped": 2, "val_loss": None,
        "note": "warm", "ratio": 0.123456,
    })
    assert line == ("step 10/300 | loss 5.1234 | lr 1.00e-03 | grad_norm 1.234 | tok/s 12345 | "
                    "TFLOP/s 0.12 | MFU 41.2% | mem 1.2GiB | skipped 2 | note warm | ratio 0.1235")
    assert format_metrics(1, 2, {"peak_memory_gib": 0.5, "tflops_per_device": 1.0}) == (
        "step 1/2 | TFLOP/s 1.00 | mem 0.5GiB")
