"""Single-process checks of the parallel building blocks and layout validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megallama.config import ConfigError, ModelConfig, check_tp_layout, preset
from megallama.model.llama import Transformer
from megallama.parallel.cross_entropy import vocab_parallel_cross_entropy
from megallama.parallel.init import full_normal
from megallama.parallel.topology import Grid


def test_cross_entropy_matches_torch_with_ignored_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 37, generator=g, requires_grad=True)
    labels = torch.randint(0, 37, (2, 9), generator=g)
    labels[0, ::2] = -100
    ours = vocab_parallel_cross_entropy(logits, labels, None, 37)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    ref = F.cross_entropy(logits.view(-1, 37), labels.view(-1), ignore_index=-100)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-5, atol=1e-8)


def test_cross_entropy_pointwise_gradient_equals_in_place_form():
    """The scatter-free gradient (the form torch.compile fuses) equals the eager in-place one, with
    padded columns, ignored and foreign (other-rank) labels."""
    from megallama.parallel import cross_entropy as ce

    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, generator=g).to(torch.bfloat16)
    pad = torch.arange(40) >= 37
    row_max = ce._chunk_max(x, pad)
    idx = torch.randint(0, 37, (6,), generator=g)
    owned = torch.tensor([True, True, False, True, True, False])
    sum_exp, _ = ce._chunk_stats(x, row_max, idx, pad)
    scale = torch.rand(6, generator=g)
    out = torch.empty_like(x)
    ce._chunk_grad(x, row_max, sum_exp, idx, owned, scale, pad, out=out)
    assert torch.equal(ce._chunk_grad_pointwise(x, row_max, sum_exp, idx, owned, scale, pad), out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled loss kernels: GPU only")
def test_compiled_cross_entropy_matches_eager_on_gpu():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 300, 1001, generator=g).to("cuda", torch.bfloat16)
    labels = torch.randint(0, 1000, (2, 300), generator=g).cuda()
    labels[0, :7] = -100
    out = []
    for compiled in (False, True):
        x = logits.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(x, labels, None, 1000, compiled=compiled)
        loss.backward()
        out.append((loss.detach(), x.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(out[1][1].float(), out[0][1].float(), rtol=1e-2, atol=1e-6)


def test_tp_layout_errors():
    with pytest.raises(ConfigError, match="does not divide n_heads=8"):
        check_tp_layout(preset("tiny"), 3)
    cfg = ModelConfig(dim=96, n_layers=1, n_heads=12, n_kv_heads=6, vocab_size=10, multiple_of=8)
    with pytest.raises(ConfigError, match="does not divide n_kv_heads=6"):
        check_tp_layout(cfg, 4)
    with pytest.raises(ConfigError, match="must be a multiple of it"):
        check_tp_layout(ModelConfig(dim=96, n_heads=12, n_kv_heads=4, vocab_size=10), 6)
    check_tp_layout(preset("llama2_70b"), 16)  # 8 KV heads at tp=16: each replicated on 2 ranks


def test_grid_rank_order_matches_deepspeed():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    grid = Grid(tp=2, pp=2, dp=3)
    ds = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=3)
    for rank in range(grid.world_size):
        tp_rank, dp_rank, pp_rank = grid.coords(rank)
        c = ds.get_coord(rank)
        assert (c.model, c.data, c.pipe) == (tp_rank, dp_rank, pp_rank)
    assert sorted(map(sorted, ds.get_axis_comm_lists("model"))) == sorted(grid.tp_groups())
    assert sorted(map(sorted, ds.get_axis_comm_lists("data"))) == sorted(grid.dp_groups())
    assert sorted(map(sorted, ds.get_axis_comm_lists("pipe"))) == sorted(grid.pp_groups())
    with pytest.raises(ConfigError, match="world size 8 != tp\\*pp\\*dp"):
        Grid.from_world(8, tp=2, pp=2, dp=3)


def test_init_is_seeded_by_name_and_seed():
    a = full_normal((4, 4), 1.0, 1, "x")
    assert torch.equal(a, full_normal((4, 4), 1.0, 1, "x"))
    assert not torch.equal(a, full_normal((4, 4), 1.0, 2, "x"))
    assert not torch.equal(a, full_normal((4, 4), 1.0, 1, "y"))


def test_padding_index_embedding_is_zero_and_frozen():
    cfg = preset("tiny", vocab_size=64, pad_token_id=0)
    model = Transformer(cfg, seed=0)
    assert model.tok_embeddings.weight[0].abs().sum() == 0
    tokens = torch.tensor([[0, 5, 0, 7]])
    model.loss(model(tokens)[:, :-1], tokens[:, 1:]).backward()
    assert model.tok_embeddings.weight.grad[0].abs().sum() == 0


def test_pipeline_cuts_balance_cost_and_keep_a_block_per_stage():
    from megallama.model.layout import balanced_cuts

    # tiny demo shape: the head costs more than four blocks, yet each stage keeps a block
    assert balanced_cuts([1, 10, 10, 10, 10, 1, 54], [0, 1, 1, 1, 1, 0, 0], 2) == [0, 4, 7]
    assert balanced_cuts([1, 10, 10, 10, 10, 1, 5], [0, 1, 1, 1, 1, 0, 0], 4) == [0, 2, 3, 4, 7]
    costs, blocks = [1] + [10] * 32 + [1, 30], [0] + [1] * 32 + [0, 0]
    cuts = balanced_cuts(costs, blocks, 4)
    stage_costs = [sum(costs[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    assert max(stage_costs) - min(stage_costs) <= 30 and cuts == [0, 9, 18, 27, 35]
    with pytest.raises(ValueError, match="need at least 3 blocks"):
        balanced_cuts([1, 10, 10, 1], [0, 1, 1, 0], 3)
