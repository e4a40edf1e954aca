"""FP8 linears (trainer.fp8) on one process: torchao's own Float8Linear is the oracle at tp = 1,
the conversion leaves parameters alone and skips the head, the TP scale rule is the documented
table, and the option's errors are one clear line. Across TP ranks and through the Engine:
tests/distributed/test_fp8_tp.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging

import pytest
import torch
from torch import nn
from torchao.float8 import convert_to_float8_training

from megallama.config import ConfigError, preset
from megallama.config.train_config import TrainerConfig
from megallama.config.validate import check_trainer
from megallama.model.llama import Transformer
from megallama.parallel import fp8
from megallama.parallel.layers import ColumnParallelLinear, RowParallelLinear, TensorParallel

kernels = fp8.load_torchao()  # megallama.parallel.fp8_matmul (needs torchao)
_find_spec = importlib.util.find_spec


@pytest.mark.parametrize("recipe", fp8.RECIPES)
@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_tp1_is_bit_identical_to_torchao_float8_linear(recipe, cls):
    layer = cls(64, 96, TensorParallel(), seed=1, key="w", std=0.5)
    layer.weight.data = layer.weight.data.bfloat16()
    ref = nn.Sequential(nn.Linear(64, 96, bias=False, dtype=torch.bfloat16))
    ref[0].weight.data.copy_(layer.weight.data)
    ref = convert_to_float8_training(ref, config=fp8.float8_config(recipe, emulate=True))
    assert fp8.convert_to_float8(layer, recipe, TensorParallel(), emulate=True) == 1
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(2, 8, 96, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [layer(xs[0]), ref(xs[1])]
    for out in outs:
        out.backward(grad)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(xs[0].grad, xs[1].grad)
    assert torch.equal(layer.weight.grad, ref[0].weight.grad)
    # and FP8 is really on: bf16's matmul differs by far more than bf16 round-off
    plain = nn.functional.linear(x, layer.weight.detach())
    err = ((outs[0] - plain).float().norm() / plain.float().norm()).item()
    assert 0.01 < err < 0.1, err


def test_conversion_keeps_parameters_and_skips_head_and_embedding():
    model = Transformer(preset("tiny_gqa", n_layers=2))
    before = {n: (p, p.dtype, p.shape, vars(p).copy()) for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert fp8.convert_to_float8(model, "none", TensorParallel(), emulate=True) == 0
    assert fp8.convert_to_float8(model, "tensorwise", TensorParallel(), emulate=True) == 2 * 7
    for n, p in model.named_parameters():  # the same Parameter objects, dtype, shape, TP tags
        assert (p, p.dtype, p.shape, vars(p)) == before[n], n
    assert list(model.state_dict()) == keys
    converted = {n for n, m in model.named_modules() if getattr(m, "fp8_matmul", None)}
    assert converted == {f"layers.{i}.{s}" for i in range(2) for s in (
        "attention.wq", "attention.wk", "attention.wv", "attention.wo",
        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    assert model.output.fp8_matmul is None  # the head stays bf16


def _reduced(sharding, recipe: str) -> set[str]:
    """The casts whose amax the TP group MAX-reduces, named as in the module docstring's table."""
    c = fp8.float8_config(recipe, emulate=True)
    casts = {  # name: (cast config, amax axis in torchao's convention, operand)
        "input": (c.cast_config_input, -1, "input"),
        "weight": (c.cast_config_weight, 0, "weight_t"),
        "weight for grad input": (c.cast_config_weight_for_grad_input, -1, "weight_t"),
        "grad output for grad input": (c.cast_config_grad_output, -1, "grad_output"),
        "grad output for grad weight": (c.cast_config_grad_output_for_grad_weight, 0,
                                        "grad_output"),
        "input for grad weight": (c.cast_config_input_for_grad_weight, 0, "input"),
    }
    return {name for name, (cast, axis, operand) in casts.items()
            if kernels.crosses_shard(cast, kernels._axis(cast, axis), getattr(sharding, operand))}


def test_scale_rule_is_the_documented_table():
    weight_and_grad = {"weight", "weight for grad input", "grad output for grad input",
                       "grad output for grad weight"}
    assert _reduced(kernels.COLUMN, "tensorwise") == weight_and_grad
    assert _reduced(kernels.COLUMN, "rowwise") == {"weight for grad input",
                                                   "grad output for grad input"}
    assert _reduced(kernels.ROW, "tensorwise") == {"input", "weight", "weight for grad input",
                                                   "input for grad weight"}
    assert _reduced(kernels.ROW, "rowwise") == {"input", "weight"}


def test_torchao_import_warnings_are_silenced(caplog):
    # torchao's import warns through these loggers that its CUDA extensions do not load (always so
    # with a CPU torch); fp8.load_torchao imports it inside _quiet, and restores the levels after
    # (checked by hand in a fresh process: `python -c "from megallama.parallel import fp8;
    # fp8.load_torchao()"` prints nothing, `python -c "import torchao.float8"` three lines)
    loggers = [logging.getLogger(n) for n in fp8._NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    with caplog.at_level(logging.DEBUG), fp8._quiet(fp8._NOISY_LOGGERS):
        for lg in loggers:
            lg.warning("Failed to load something")
    assert not caplog.records
    assert [lg.level for lg in loggers] == levels
    loggers[0].warning("after")  # levels restored: warnings pass again
    assert [r.getMessage() for r in caplog.records] == ["after"]


# ---- trainer.fp8 errors (the style of tests/test_train_config.py's table) ------------------------
def _no_torchao(name, *args, **kwargs):
    return None if name == "torchao" else _find_spec(name, *args, **kwargs)


BAD = [  # (trainer changes, patch, expected fragment of the one-line message)
    ({"fp8": "e4m3"}, None, "trainer.fp8='e4m3': choose one of ['none', 'tensorwise', 'rowwise']"),
    ({"fp8": "tensorwise"}, None,
     "trainer.fp8=tensorwise needs trainer.precision=bf16 (FP8 matmuls take bf16 activations and "
     "weights), not fp32; set trainer.precision=bf16"),
    ({"fp8": "rowwise", "precision": "bf16"}, "no-torchao",
     "trainer.fp8=rowwise needs torchao, which is not installed: pip install 'megallama[fp8]', "
     "or set trainer.fp8=none"),
    ({"fp8": "tensorwise", "precision": "bf16", "device": "auto"}, "a100",
     "trainer.fp8=tensorwise needs FP8 matmuls (compute capability >= 8.9: Ada, Hopper or later), "
     "but NVIDIA A100 is 8.0; set trainer.fp8=none"),
]


@pytest.mark.parametrize("changes,patch,message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_fp8_option_errors_are_one_line(changes, patch, message, monkeypatch):
    if patch == "no-torchao":
        monkeypatch.setattr(importlib.util, "find_spec", _no_torchao)
    if patch == "a100":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    trainer = dataclasses.replace(TrainerConfig(device="cpu"), **changes)
    with pytest.raises(ConfigError) as info:
        check_trainer(trainer)
    assert str(info.value) == message


@pytest.mark.parametrize("recipe", ["none", *fp8.RECIPES])
def test_fp8_option_accepted(recipe):
    check_trainer(TrainerConfig(device="cpu", precision="bf16", fp8=recipe))
