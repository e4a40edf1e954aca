"""megallama.model.layout, the one place for the layer list, the pipeline stage cuts and where each
TP slice of each parameter lives: cuts are valid (and optimal) for every stage count, and every
ShardSpec describes exactly the slice a real model parameter holds at every TP rank."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from megallama.config import ConfigError, ModelConfig, check_tp_layout, kv_replicas_for, preset
from megallama.model.layout import (
    balanced_cuts,
    is_block,
    layer_costs,
    layer_names,
    layer_of,
    shard_spec,
    shard_specs,
    stage_cuts,
    stage_of_layers,
    tp_split_dim,
)
from megallama.model.llama import Transformer, layer_defs
from megallama.parallel.layers import TensorParallel
from megallama.training.planner import layer_params


@dataclass(frozen=True)
class RankTP(TensorParallel):
    """The TP view of rank ``r`` of an ``n``-rank group, without processes (builds its slices)."""

    n: int = 1
    r: int = 0
    kv: int = 1

    @property
    def size(self) -> int:
        return self.n

    @property
    def rank(self) -> int:
        return self.r

    @property
    def kv_replicas(self) -> int:
        return self.kv


def _check_cuts(cfg: ModelConfig, cuts: list[int], pp: int) -> None:
    names = layer_names(cfg)
    assert len(cuts) == pp + 1 and cuts[0] == 0 and cuts[-1] == len(names)
    assert all(a < b for a, b in itertools.pairwise(cuts)), cuts
    for a, b in itertools.pairwise(cuts):
        assert any(is_block(n) for n in names[a:b]), f"stage {names[a:b]} has no block"


# ---- layers --------------------------------------------------------------------------------------
def test_layer_list_is_the_models():
    cfg = preset("tiny_gqa", vocab_size=64, n_layers=3)
    names = layer_names(cfg)
    assert names == ["tok_embeddings", "layers.0", "layers.1", "layers.2", "norm", "output"]
    model = Transformer(cfg)
    assert [n for n, _ in model.named_layers()] == names
    assert [d.name for d in layer_defs(cfg, TensorParallel())] == names
    assert [is_block(n) for n in names] == [False, True, True, True, False, False]
    for pname, _ in model.named_parameters():
        assert layer_of(pname) in names and pname.startswith(layer_of(pname) + ".")
    assert layer_of("layers.3.attention.wq.weight") == "layers.3"
    assert layer_of("output.weight") == "output"


# ---- stage cuts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,pps", [("tiny", range(1, 5)),
                                      ("llama2_70b", (1, 2, 3, 4, 8, 10, 16, 20, 40, 80))])
@pytest.mark.parametrize("method", ["balanced", "uniform"])
def test_stage_cuts_are_monotone_with_a_block_per_stage(name, pps, method):
    cfg = preset(name)
    for pp in pps:
        cuts = stage_cuts(cfg, pp, 512, method)
        _check_cuts(cfg, cuts, pp)
        stage = stage_of_layers(cfg, pp, 512, method)
        assert list(stage) == layer_names(cfg)
        assert [sum(s == k for s in stage.values()) for k in range(pp)] == [
            b - a for a, b in itertools.pairwise(cuts)]


def test_balanced_cuts_minimise_the_costliest_stage():
    """Brute force over every cut with a block per stage (tiny model, all stage counts)."""
    cfg = preset("tiny")
    names, costs = layer_names(cfg), layer_costs(cfg, 256)
    for pp in range(1, cfg.n_layers + 1):
        every = [[0, *inner, len(names)]
                 for inner in itertools.combinations(range(1, len(names)), pp - 1)]
        best = min(max(sum(costs[a:b]) for a, b in itertools.pairwise(cuts)) for cuts in every
                   if all(any(map(is_block, names[a:b])) for a, b in itertools.pairwise(cuts)))
        cuts = stage_cuts(cfg, pp, 256)
        assert max(sum(costs[a:b]) for a, b in itertools.pairwise(cuts)) == best
        # the seq_len only moves the attention term; the default is max_seq_len
        assert stage_cuts(cfg, pp) == stage_cuts(cfg, pp, cfg.max_seq_len)


def _deepspeed_uniform(n: int, parts: int) -> list[int]:
    """deepspeed.runtime.utils.partition_uniform, by hand: the first n % parts stages get one
    layer more."""
    chunk, residual = divmod(n, parts)
    return [i * chunk + min(i, residual) for i in range(parts + 1)]


def test_uniform_is_deepspeeds_uniform_rule_where_that_keeps_a_block_per_stage():
    for n_layers in range(1, 13):
        cfg = preset("tiny", n_layers=n_layers)
        n = len(layer_names(cfg))
        for pp in range(1, n_layers + 1):
            ds = _deepspeed_uniform(n, pp)
            if not all(any(is_block(x) for x in layer_names(cfg)[a:b])
                       for a, b in itertools.pairwise(ds)):
                continue  # DeepSpeed's rule would leave a stage without a block: ours differs
            ours = stage_cuts(cfg, pp, method="uniform")
            sizes = [b - a for a, b in itertools.pairwise(ours)]
            ds_sizes = [b - a for a, b in itertools.pairwise(ds)]
            if n % pp == 0:
                assert ours == ds, (n_layers, pp)
            else:  # the same stage sizes; DeepSpeed puts the longer stages first, we put them last
                assert sorted(sizes) == sorted(ds_sizes), (n_layers, pp, ours, ds)
    assert stage_cuts(preset("tiny", n_layers=5), 2, method="uniform") == [0, 4, 8]
    assert stage_cuts(preset("tiny", n_layers=9), 4, method="uniform") == [0, 3, 6, 9, 12]


def test_stage_cuts_refuse_what_cannot_be_cut():
    cfg = preset("tiny")
    for pp in (0, 5):
        with pytest.raises(ConfigError, match=rf"^pp={pp}: every pipeline stage needs at least "
                                              "one transformer block and the model has "
                                              "n_layers=4; choose 1 <= pp <= 4$"):
            stage_cuts(cfg, pp)
    with pytest.raises(ConfigError, match="partition_method='even'"):
        stage_cuts(cfg, 2, method="even")
    with pytest.raises(ValueError, match="need at least 3 blocks"):
        balanced_cuts([1, 10, 10, 1], [False, True, True, False], 3)


# ---- TP slices -----------------------------------------------------------------------------------
CONFIGS = {
    "tiny_70b_shape": preset("tiny_70b_shape", vocab_size=1001),
    "tiny_gqa": preset("tiny_gqa", vocab_size=1001, n_layers=2),
    # 5 tokens over 8 ranks: slices that are all vocabulary padding
    "small_vocab": ModelConfig(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=5,
                               multiple_of=16, max_seq_len=32),
}


def _valid(cfg: ModelConfig, tp: int) -> bool:
    try:
        check_tp_layout(cfg, tp)
    except ConfigError:
        with pytest.raises(ConfigError):
            shard_specs(cfg, tp)
        return False
    return True


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_specs_list_every_parameter_as_the_checkpoint_tables_do(name):
    cfg = CONFIGS[name]
    model = Transformer(cfg)
    for tp in (1, 2, 4, 8, 16):
        if not _valid(cfg, tp):
            continue
        specs = shard_specs(cfg, tp)
        assert [s.name for s in specs] == [n for n, _ in model.named_parameters()]
        params = dict(model.named_parameters())  # the model at tp 1: full shapes, its own tags
        assert all(list(s.shape) == list(params[s.name].shape) for s in specs) or tp > 1
        assert all(s.split_dim == tp_split_dim(s.name)
                   == getattr(params[s.name], "partition_dim", None) for s in specs)
        assert all(shard_spec(cfg, s.name, tp) == s for s in specs)
    with pytest.raises(KeyError, match="not a parameter"):
        shard_spec(cfg, f"layers.{cfg.n_layers}.attention.wq.weight", 1)
    with pytest.raises(KeyError, match="not a parameter"):
        shard_spec(cfg, "lm_head.weight", 1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_first_holders_tile_every_tensor(name):
    cfg = CONFIGS[name]
    for tp in (1, 2, 4, 8, 16):
        if not _valid(cfg, tp):
            continue
        for spec in shard_specs(cfg, tp):
            holders = [r for r in range(tp) if spec.is_first_holder(r)]
            pieces = sorted(spec.piece(r) for r in holders)
            if spec.split_dim is None:
                assert holders == [0] and pieces == [(0, spec.shape[0])]
                continue
            assert spec.replicas == (kv_replicas_for(cfg.n_kv_heads, tp)
                                     if ".wk." in spec.name or ".wv." in spec.name else 1)
            assert len(holders) == spec.parts and spec.parts * spec.replicas == tp
            end = 0
            for offset, length in pieces:
                assert length == 0 or offset == end, (spec.name, tp, pieces)
                end += length
            assert end == spec.shape[spec.split_dim], (spec.name, tp, pieces)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_take_is_the_slice_each_rank_of_a_real_model_holds(name):
    """Build every rank's model at every tp (seeded init draws the full tensor whatever the tp)
    and compare each parameter with ``take`` of the tp=1 model's full tensor."""
    cfg = CONFIGS[name]
    full = dict(Transformer(cfg, seed=7).named_parameters())
    for tp in (1, 2, 4, 8, 16):
        if not _valid(cfg, tp):
            continue
        specs = {s.name: s for s in shard_specs(cfg, tp)}
        for r in range(tp):
            tpc = RankTP(n=tp, r=r, kv=kv_replicas_for(cfg.n_kv_heads, tp))
            model = Transformer(cfg, tpc, seed=7)
            for pname, p in model.named_parameters():
                spec = specs[pname]
                assert tuple(p.shape) == spec.local_shape(), (pname, tp, r)
                assert getattr(p, "partition_dim", None) == spec.split_dim
                assert getattr(p, "tp_replicas", 1) == spec.replicas
                assert torch.equal(spec.take(full[pname].detach(), r), p.detach()), (pname, tp, r)
            if r == 0:  # the planner's per-rank counts are the model's
                counts = layer_params(cfg, tp)
                assert counts["block"] == sum(p.numel() for p in model.layers[0].parameters())
                assert counts["output"] == model.output.weight.numel()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_distinct_slices_concatenate_to_the_padded_tensor(name):
    """What ``full_tensor`` assembles from an all-gather (every replicas-th rank's slice)."""
    cfg = CONFIGS[name]
    for tp in (2, 4, 8, 16):
        if not _valid(cfg, tp):
            continue
        for spec in shard_specs(cfg, tp):
            if spec.split_dim is None:
                continue
            t = torch.randn(spec.shape)
            parts = [spec.take(t, r) for r in range(tp)]
            for r in range(tp):  # replicas hold the same slice
                assert torch.equal(parts[r], parts[r - r % spec.replicas])
            cat = torch.cat(parts[::spec.replicas], dim=spec.split_dim)
            assert cat.shape[spec.split_dim] == spec.padded
            assert torch.equal(cat.narrow(spec.split_dim, 0, spec.shape[spec.split_dim]), t)
            assert not cat.narrow(spec.split_dim, spec.shape[spec.split_dim],
                                  spec.padded - spec.shape[spec.split_dim]).any()


def test_all_padding_slices_and_shape_checks():
    cfg = CONFIGS["small_vocab"]
    spec = shard_spec(cfg, "output.weight", 8)
    assert (spec.padded, spec.parts, spec.local_shape()) == (8, 8, (1, 64))
    assert [spec.piece(r) for r in range(8)] == [(r, 1) if r < 5 else (r, 0) for r in range(8)]
    t = torch.randn(5, 64)
    assert not spec.take(t, 6).any() and torch.equal(spec.take(t, 4), t[4:5])
    with pytest.raises(ValueError, match=r"output.weight: shape \[6, 64\], expected \[5, 64\]"):
        spec.take(torch.randn(6, 64), 0)
    kv = shard_spec(cfg, "layers.0.attention.wk.weight", 8)  # 2 KV heads over 8 ranks
    assert (kv.replicas, kv.parts) == (4, 2)
    assert [kv.slice_index(r) for r in range(8)] == [0] * 4 + [1] * 4
    assert [kv.is_first_holder(r) for r in range(8)] == [True, False, False, False] * 2
