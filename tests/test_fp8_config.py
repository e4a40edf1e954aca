"""What validation decides for FP8 on a GPU (a CUDA machine simulated: only the answers of
torch.cuda change): compiled blocks on unless turned off explicitly, and the sizes torch._scaled_mm
needs checked in one line."""

from __future__ import annotations

import pytest
import torch

from megallama.config import ConfigError, preset
from megallama.config.compose import load_config
from megallama.config.train_config import TrainConfig
from megallama.config.validate import validate_options


def _config(fp8: str = "tensorwise", device: str = "auto", seq_len: int = 64,
            micro_batch: int = 1) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model = preset("tiny_gqa", vocab_size=256, n_layers=2)
    cfg.data.train, cfg.data.seq_len = ["corpus"], seq_len
    cfg.parallel.micro_batch_size = micro_batch
    t = cfg.trainer
    t.precision, t.fp8, t.device, t.eval_interval = "bf16", fp8, device, 0
    return cfg


@pytest.fixture
def h100(monkeypatch):
    """torch.cuda answering as on one H100 (compute capability 9.0, bf16)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")


def test_conf_leaves_compile_blocks_unset():
    assert load_config([]).parallel.compile_blocks is None
    assert load_config(["parallel.compile_blocks=false"]).parallel.compile_blocks is False
    assert TrainConfig().parallel.compile_blocks is None


def test_fp8_on_a_gpu_compiles_blocks_unless_turned_off(h100):
    cfg = _config()
    validate_options(cfg, 1)
    assert cfg.parallel.compile_blocks is True
    off = _config()
    off.parallel.compile_blocks = False  # explicitly off: kept
    validate_options(off, 1)
    assert off.parallel.compile_blocks is False
    for plain in (_config(fp8="none"), _config(device="cpu")):  # bf16, or FP8 emulated on CPU
        validate_options(plain, 1)
        assert plain.parallel.compile_blocks is False


def test_compile_blocks_stay_off_without_a_gpu():
    cfg = _config()
    validate_options(cfg, 1)
    assert cfg.parallel.compile_blocks is False


@pytest.mark.parametrize("changes,named", [
    (dict(seq_len=100), "tokens per micro-batch parallel.micro_batch_size*data.seq_len = 100"),
    (dict(seq_len=36, micro_batch=2), "data.seq_len = 72"),
])
def test_fp8_sizes_for_scaled_mm_are_checked_on_a_gpu(h100, changes, named):
    with pytest.raises(ConfigError) as e:
        validate_options(_config(**changes), 1)
    message = str(e.value)
    assert "\n" not in message and named in message and "multiples of 16" in message
    assert "trainer.fp8=none" in message
    validate_options(_config(seq_len=36, micro_batch=2, device="cpu"), 1)  # emulated: any size
    validate_options(_config(seq_len=48, micro_batch=1), 1)


def test_fp8_sizes_name_the_per_rank_width(h100):
    cfg = _config()  # head_dim 24: each rank's one KV head is 24 wide, its 2 query heads 48
    cfg.model = preset("tiny_gqa", vocab_size=256, n_layers=2, dim=96, n_heads=4, n_kv_heads=2)
    cfg.parallel.tp = 2
    with pytest.raises(ConfigError, match=r"but per-rank KV width = 24; change them") as e:
        validate_options(cfg, 2)
    assert "model.dim" not in str(e.value) and "query" not in str(e.value)
