"""parallel.activation_checkpointing=none|selective|full on one rank: selective and full give the
loss and every gradient of none (plain, packed documents, the pipeline's layer list); each mode's
saved-activation bytes per block, counted exactly (tests/saved_bytes.py), equal the planner's
formula; the option's spellings. tp 2 and tp 2 + SP: tests/distributed/test_tensor_parallel.py."""

from __future__ import annotations

import pytest
import torch

from megallama.config import ConfigError, preset
from megallama.config.compose import load_config
from megallama.config.train_config import checkpointing_mode
from megallama.model.llama import Transformer, TransformerBlock, layer_defs
from megallama.parallel.layers import TensorParallel
from megallama.training.planner import GIB, Layout, block_activation_bytes, estimate
from tests.saved_bytes import saved_block_bytes

VOCAB = 1001
MODES = ("none", "selective", "full")
PLANNER_TOL = 0.05


def _grads(cfg, mode, tokens, labels, segments=None) -> tuple[float, dict[str, torch.Tensor]]:
    model = Transformer(cfg, seed=3, activation_checkpointing=mode)
    loss = model.loss(model(tokens, segments=segments), labels)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _assert_same(got, want, what: str) -> None:
    assert abs(got[0] - want[0]) <= 1e-6 * abs(want[0]), f"{what}: loss {got[0]} != {want[0]}"
    for name, g in want[1].items():
        err = ((got[1][name] - g).norm() / g.norm().clamp(min=1e-30)).item()
        assert err < 1e-6, f"{what}: grad of {name} rel err {err:.2e}"


@pytest.mark.parametrize("packed", [False, True], ids=["concat", "documents"])
def test_selective_and_full_recomputation_give_the_gradients_of_none(packed):
    cfg = preset("tiny_gqa", vocab_size=VOCAB)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 33), generator=g)
    segments = torch.tensor([[0] * 11 + [1] * 21, [0] * 32]) if packed else None
    ref = _grads(cfg, "none", tokens[:, :-1], tokens[:, 1:], segments)
    for mode in ("selective", "full"):
        _assert_same(_grads(cfg, mode, tokens[:, :-1], tokens[:, 1:], segments), ref, mode)


def test_the_pipeline_layer_list_carries_selective_recomputation():
    """Pipeline stages are built from layer_defs (engine.pipeline wraps each class with
    ``carrying`` and passes (hidden, segments) between layers): the mode reaches every block
    and the result equals the model's without recomputation."""
    from megallama.engine.pipeline import carrying

    cfg = preset("tiny", vocab_size=VOCAB)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    segments = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    defs = layer_defs(cfg, TensorParallel(), 3, "selective")
    layers = [carrying(d.cls)(*d.args, **d.kwargs) for d in defs]
    blocks = [m for m in layers if isinstance(m, TransformerBlock)]
    assert blocks and all(b.attention.recompute and b.feed_forward.recompute and
                          b.attention_norm.recompute and b.ffn_norm.recompute for b in blocks)
    x = (tokens[:, :-1], segments)
    for layer in layers:
        x = layer(x)
    loss = Transformer(cfg).loss(x, tokens[:, 1:])
    loss.backward()
    ref = _grads(cfg, "none", tokens[:, :-1], tokens[:, 1:], segments)
    got = {f"{d.name}.{p}": t.grad for d, layer in zip(defs, layers, strict=True)
           for p, t in layer.named_parameters()}
    _assert_same((loss.item(), got), ref, "pipeline layer list")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_saved_activation_bytes_per_block_equal_the_planner(dtype):
    """At tp 1, MHA and GQA: bytes kept per block (measured) vs block_activation_bytes; the
    formula for none, applied to selective, misses by more than the tolerance."""
    element, tokens, seq = (4 if dtype == torch.float32 else 2), 128, 64
    for name in ("tiny", "tiny_gqa"):
        cfg = preset(name, vocab_size=VOCAB)
        measured = {}
        for mode in MODES:
            block = TransformerBlock(0, cfg, TensorParallel(), 3, mode)
            for p in block.parameters():  # as training casts: parameters only, buffers stay fp32
                p.data = p.data.to(dtype)
            x = torch.randn(2, seq, cfg.dim, dtype=dtype, requires_grad=True)
            measured[mode] = saved_block_bytes(block, x)
            planned = block_activation_bytes(cfg, tokens=tokens, seq_len=seq, tp=1, element=element,
                                             sequence_parallel=False, recompute=mode)
            assert abs(measured[mode] - planned) <= PLANNER_TOL * planned, (name, mode, measured,
                                                                           planned)
        assert measured["full"] < measured["selective"] < measured["none"], measured
        ignoring = block_activation_bytes(cfg, tokens=tokens, seq_len=seq, tp=1, element=element,
                                          sequence_parallel=False, recompute="none")
        assert abs(measured["selective"] - ignoring) > PLANNER_TOL * measured["selective"]


def test_planner_ranks_selective_between_none_and_full():
    cfg = preset("llama2_7b")
    kw = dict(seq_len=4096, global_batch=64, zero_stage=1, precision="bf16")
    rows = {m: estimate(cfg, Layout(2, 4, 1), activation_checkpointing=m, **kw) for m in MODES}
    assert rows["full"].activations < rows["selective"].activations < rows["none"].activations
    assert rows["selective"].tp_comm == rows["none"].tp_comm < rows["full"].tp_comm
    assert rows["selective"].recompute == "selective" and rows["selective"].activation_checkpointing
    legacy = estimate(cfg, Layout(2, 4, 1), activation_checkpointing=True, **kw)
    assert legacy.total == rows["full"].total and rows["none"].total > 20 * GIB


def test_option_spellings():
    assert [checkpointing_mode(v) for v in (True, "True", "false", False, "selective", "FULL")] \
        == ["full", "full", "none", "none", "selective", "full"]
    with pytest.raises(ConfigError, match=r"parallel.activation_checkpointing='some'.*selective"):
        checkpointing_mode("some")
    assert load_config(["parallel.activation_checkpointing=true"]).parallel \
        .activation_checkpointing == "True"  # a string field; validation makes it "full"
    assert load_config(["parallel.activation_checkpointing=selective"]).parallel \
        .activation_checkpointing == "selective"
    assert load_config([]).parallel.activation_checkpointing == "none"
