"""Tensor parallelism reproduces the 1-rank model: logits, loss and full-weight gradients (fp32).

Every rank also builds the 1-rank reference locally (initialisation does not depend on tp), so
each check compares against an independent single-process computation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megallama.config import ConfigError, ModelConfig, preset
from megallama.model.llama import Transformer, TransformerBlock
from megallama.parallel.cross_entropy import vocab_parallel_cross_entropy
from megallama.parallel.layers import TensorParallel, full_tensor, padded_vocab_size
from megallama.parallel.mappings import all_gather_tensor
from megallama.parallel.topology import Grid, build_topology, kv_replicas_for
from megallama.training.planner import block_activation_bytes
from tests.distributed.harness import run_world
from tests.saved_bytes import saved_block_bytes

VOCAB = 1001  # divisible by no tp > 1: exercises vocabulary padding
TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _batch(seq: int = 16):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (2, seq + 1), generator=g)
    labels = tokens[:, 1:].clone()
    labels[0, :3] = -100  # masked labels must be ignored identically
    return tokens[:, :-1], labels


def _reference(cfg, tokens, labels):
    ref = Transformer(cfg, seed=3)
    logits = ref(tokens)
    loss = ref.loss(logits, labels)
    loss.backward()
    return ref, logits.detach(), loss.detach()


def _check_case(world: int, name: str, tp: int, sp: bool, ckpt: str = "none", **over) -> None:
    cfg = preset(name, vocab_size=VOCAB, **over)
    grid = Grid(tp=tp, dp=world // tp)
    topo = build_topology(grid, kv_replicas=kv_replicas_for(cfg.n_kv_heads, tp))
    tpc = topo.tensor_parallel(cfg.n_kv_heads, sequence_parallel=sp)
    tokens, labels = _batch()
    ref, ref_logits, ref_loss = _reference(cfg, tokens, labels)

    model = Transformer(cfg, tpc, seed=3, activation_checkpointing=ckpt)
    logits = model(tokens)
    loss = model.loss(logits, labels)
    loss.backward()
    what = f"{name} tp={tp} sp={sp} ckpt={ckpt}"
    full_logits = all_gather_tensor(logits.detach(), -1, tpc.group)[..., :VOCAB]
    assert rel_err(full_logits, ref_logits) < TOL, f"{what}: logits {rel_err(full_logits, ref_logits)}"
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item()), f"{what}: loss"
    ref_params = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        full_w = full_tensor(p.detach(), p, tpc)[: ref_params[pname].shape[0]]
        full_g = full_tensor(p.grad, p, tpc)[: ref_params[pname].shape[0]]
        assert torch.equal(full_w, ref_params[pname].detach()), f"{what}: init of {pname} differs"
        err = rel_err(full_g, ref_params[pname].grad)
        assert err < TOL, f"{what}: grad of {pname} rel err {err:.2e}"
    # padded vocabulary rows: zero weights, zero gradients (a tied head's are the embedding's)
    head = model.tok_embeddings.weight if cfg.tie_embeddings else model.output.weight
    padded = full_tensor(head.grad, head, tpc)[VOCAB:]
    assert padded.abs().sum() == 0, f"{what}: padded head rows received gradient"
    if cfg.tie_embeddings:  # one weight: its gradient sums the lookup's and the head's
        assert "output.weight" not in dict(model.named_parameters())


def _check_cross_entropy(world: int, tp: int) -> None:
    """Vocab-parallel CE equals F.cross_entropy (loss and logit gradients), padding included."""
    topo = build_topology(Grid(tp=tp, dp=world // tp))
    vocab, padded = 1001, padded_vocab_size(1001, tp)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 7, vocab, generator=g) * 4
    labels = torch.randint(0, vocab, (3, 7), generator=g)
    labels[1, 2:5] = -100
    ref = logits.clone().requires_grad_(True)
    F.cross_entropy(ref.view(-1, vocab), labels.view(-1), ignore_index=-100).backward()
    full = torch.cat([logits, torch.full((3, 7, padded - vocab), 1e4)], dim=-1)  # huge pad logits
    local = full.chunk(tp, dim=-1)[topo.tp_rank].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, labels, topo.tp_group, vocab)
    loss.backward()
    expected = F.cross_entropy(logits.view(-1, vocab), labels.view(-1), ignore_index=-100)
    assert abs(loss.item() - expected.item()) < 1e-5 * expected.item(), (tp, loss, expected)
    grad = all_gather_tensor(local.grad, -1, topo.tp_group)
    assert rel_err(grad[..., :vocab], ref.grad) < TOL and grad[..., vocab:].abs().sum() == 0


def _check_bad_layouts(world: int) -> None:
    with pytest.raises(ConfigError, match="world size 4 != tp\\*pp\\*dp"):
        build_topology(Grid(tp=2, pp=1, dp=1))
    with pytest.raises(ConfigError, match="not divisible by tp\\*pp"):
        Grid.from_world(world, tp=3)
    with pytest.raises(ConfigError, match="does not divide n_heads"):
        cfg = ModelConfig(dim=96, n_layers=1, n_heads=6, vocab_size=VOCAB)
        Transformer(cfg, TensorParallel(group=build_topology(Grid(tp=4)).tp_group))


def _check_saved_bytes(world: int, name: str, tp: int) -> None:
    """Saved-activation bytes of one block on this rank (tests/saved_bytes.py), at tp and tp +
    SP x none / selective / full, equal the planner's block_activation_bytes within 5%; the
    formula of none misses selective's bytes by more (tests/test_recompute.py: tp 1)."""
    cfg, seq, micro = preset(name, vocab_size=VOCAB), 64, 2
    topo = build_topology(Grid(tp=tp, dp=world // tp), kv_replicas=kv_replicas_for(cfg.n_kv_heads, tp))
    for sp in (False, True):
        tpc = topo.tensor_parallel(cfg.n_kv_heads, sequence_parallel=sp)
        got = {}
        for mode in ("none", "selective", "full"):
            block = TransformerBlock(0, cfg, tpc, 3, mode)
            x = torch.randn(micro, seq // tp if sp else seq, cfg.dim, requires_grad=True)
            got[mode] = saved_block_bytes(block, x)
            want = block_activation_bytes(cfg, tokens=micro * seq, seq_len=seq, tp=tp, element=4,
                                          sequence_parallel=sp, recompute=mode)
            assert abs(got[mode] - want) <= 0.05 * want, (name, tp, sp, mode, got[mode], want)
        ignoring = block_activation_bytes(cfg, tokens=micro * seq, seq_len=seq, tp=tp, element=4,
                                          sequence_parallel=sp, recompute="none")
        assert abs(got["selective"] - ignoring) > 0.05 * got["selective"], (name, tp, sp, got)


def _tp_world(rank: int, world: int, cases) -> None:
    torch.manual_seed(0)
    if world == 4:
        _check_bad_layouts(world)
        for tp in (2, 4):
            _check_cross_entropy(world, tp)
        for name in ("tiny", "tiny_gqa"):
            _check_saved_bytes(world, name, 2)
    for case in cases:
        _check_case(world, *case[:3], **(case[3] if len(case) > 3 else {}))


CASES_4 = [
    ("tiny", 2, False), ("tiny", 2, True), ("tiny", 4, False), ("tiny", 4, True),
    ("tiny_gqa", 2, False), ("tiny_gqa", 2, True),      # KV heads sharded (tp <= n_kv)
    ("tiny_gqa", 4, False), ("tiny_gqa", 4, True),      # tp > n_kv: each KV head on 2 ranks
    ("tiny_70b_shape", 4, True),                         # 64 query heads over 8 KV heads
    ("tiny", 2, True, {"pad_token_id": 0}),
    ("tiny_llama3", 4, True),                            # Llama 3.1: scaled RoPE, tp > n_kv
    ("tiny_llama3_tied", 2, True), ("tiny_llama3_tied", 4, False),  # 3.2: tied head
    ("tiny_gqa", 2, True, {"ckpt": "selective"}),       # recomputation under TP + SP
    ("tiny_gqa", 4, False, {"ckpt": "selective"}),      # ... with KV heads replicated
]
CASES_8 = [
    ("tiny", 8, True), ("tiny_gqa", 8, False), ("tiny_gqa", 8, True),  # 4 replicas per KV head
    ("tiny_70b_shape", 8, False), ("tiny_70b_shape", 8, True),
]


@pytest.mark.slow
def test_tp_matches_single_rank_world4():
    run_world(4, _tp_world, CASES_4)


@pytest.mark.slow
def test_tp_matches_single_rank_world8():
    run_world(8, _tp_world, CASES_8)
