"""Weights saved at one TP/PP/DP layout load bit-exactly into others (gloo ranks).

Every rank builds the whole Transformer at the saving layout, perturbs it with seeded noise (so the
values are not the seeded init that any layout would reproduce anyway; vocabulary padding rows get
noise too, to prove they are not stored), records its full tensors with ``full_tensor`` and saves
only its pipeline stage's (prefix, module) subset. Each loading layout builds a model from another
seed, loads its stage, and compares every loaded full tensor with the record.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from megallama.checkpoint.atomic import CheckpointError, checkpoint_writer, latest_checkpoint
from megallama.checkpoint.weights import (
    VOCAB_PADDED,
    load_model_weights,
    named_layers,
    read_full_tensor,
    read_index,
    save_model_weights,
)
from megallama.config import preset
from megallama.model.llama import Transformer
from megallama.parallel.init import derive_seed, shard
from megallama.parallel.layers import full_tensor
from megallama.parallel.topology import Grid, build_topology, kv_replicas_for
from tests.distributed.harness import run_world

VOCAB = 1001  # divisible by no tp > 1: the head and embedding carry padding rows


def _build(cfg, grid: Grid, seed: int):
    topo = build_topology(grid, kv_replicas=kv_replicas_for(cfg.n_kv_heads, grid.tp))
    tpc = topo.tensor_parallel(cfg.n_kv_heads)
    return topo, tpc, Transformer(cfg, tpc, seed=seed)


def _stage(model, pp: int, pp_rank: int):
    """Contiguous pipeline stages over embedding, blocks, norm, head."""
    layers = named_layers(model)
    n = len(layers)
    return layers[pp_rank * n // pp:(pp_rank + 1) * n // pp]


def _params(layers):
    return [(f"{prefix}.{local}", p) for prefix, m in layers for local, p in m.named_parameters()]


@torch.no_grad()
def _perturb(model, tpc, seed: int) -> None:
    """Add noise drawn for the full padded tensor, so TP and KV replicas get consistent slices."""
    for name, p in _params(named_layers(model)):
        dim = getattr(p, "partition_dim", None)
        replicas = getattr(p, "tp_replicas", 1)
        parts = 1 if dim is None else tpc.size // replicas
        full_shape = list(p.shape)
        if dim is not None:
            full_shape[dim] *= parts
        gen = torch.Generator().manual_seed(derive_seed(seed, name))
        noise = torch.randn(full_shape, generator=gen) * 0.1
        p.add_(noise if dim is None else shard(noise, dim, tpc.rank // replicas, parts))


def _full(model, tpc) -> dict[str, torch.Tensor]:
    return {name: full_tensor(p.detach(), p, tpc).clone()
            for name, p in _params(named_layers(model))}


def _save(cfg, grid: Grid, ckpt_root, step: int):
    """Save a perturbed model at ``grid``; return its full (padded) tensors and the step dir."""
    topo, tpc, model = _build(cfg, grid, seed=3)
    _perturb(model, tpc, seed=11)
    ref = _full(model, tpc)
    stage = _stage(model, grid.pp, topo.pp_rank)
    with checkpoint_writer(ckpt_root, step, keep_last=None) as tmp:
        save_model_weights(stage, tpc, topo, tmp, cfg, extra={"grid": [grid.tp, grid.pp, grid.dp]})
    return ref, latest_checkpoint(ckpt_root)


def _check_load(cfg, grid: Grid, ckpt, ref, what: str) -> None:
    topo, tpc, model = _build(cfg, grid, seed=77)
    _perturb(model, tpc, seed=12)  # nonzero padding rows too: the load must zero them
    stage = _stage(model, grid.pp, topo.pp_rank)
    load_model_weights(stage, tpc, ckpt, cfg)
    for name, p in _params(stage):
        full = full_tensor(p.detach(), p, tpc)
        rows = cfg.vocab_size if name in VOCAB_PADDED else full.shape[0]
        assert torch.equal(full[:rows], ref[name][:rows]), f"{what}: {name} differs after load"
        assert not full[rows:].any(), f"{what}: {name} padding rows not zero after load"


def _plain_read(ckpt, name: str) -> torch.Tensor:
    """The reader of docs/CHECKPOINTS.md: json + safetensors only, no megallama."""
    index = json.loads((ckpt / "model.index.json").read_text())
    entry = index["tensors"][name]
    parts = []
    for piece in entry["pieces"]:
        with safe_open(ckpt / piece["file"], framework="pt") as f:
            parts.append(f.get_tensor(name))
    return parts[0] if entry["split_dim"] is None else torch.cat(parts, dim=entry["split_dim"])


def _pieces(index, name):
    return [(x["file"][6:15], x["offset"], x["length"]) for x in index["tensors"][name]["pieces"]]


def _check_index_layouts(ckpts) -> None:
    """What each layout wrote: DP rank 0 only, first KV replica only, norms once, no padding."""
    a, b, c = (read_index(p) for p in ckpts)
    assert sorted(a["files"]) == ["model-pp00-tp00.safetensors", "model-pp00-tp01.safetensors"]
    assert _pieces(a, "output.weight") == [("pp00-tp00", 0, 501), ("pp00-tp01", 501, 500)]
    assert a["tensors"]["output.weight"]["shape"] == [VOCAB, 128]
    assert a["saved_layout"] == {"tp": 2, "pp": 1, "dp": 2} and a["extra"] == {"grid": [2, 1, 2]}
    # tp=4 > 2 KV heads: wk/wv come from ranks 0 and 2 only; 251 rows per rank, 248 on the last
    wk = _pieces(b, "layers.1.attention.wk.weight")
    assert wk == [("pp00-tp00", 0, 16), ("pp00-tp02", 16, 16)]
    assert [x[2] for x in _pieces(b, "tok_embeddings.weight")] == [251, 251, 251, 248]
    assert _pieces(b, "layers.0.attention.wo.weight")[3] == ("pp00-tp03", 96, 32)
    assert _pieces(b, "norm.weight") == [("pp00-tp00", 0, 128)]
    assert b["tensors"]["layers.0.attention.wo.weight"]["split_dim"] == 1
    assert b["tensors"]["norm.weight"]["split_dim"] is None
    # pp=2: stage 1 holds layers 2-3 (7 entries: emb, 4 blocks | ..., norm, head)
    assert len(c["files"]) == 4
    assert _pieces(c, "norm.weight") == [("pp01-tp00", 0, 128)]
    w2_files = {f for f, _, _ in _pieces(c, "layers.1.feed_forward.w2.weight")}
    assert w2_files == {"pp00-tp00", "pp00-tp01"}
    for index in (a, b, c):
        assert list(index["tensors"])[0] == "tok_embeddings.weight"
        assert list(index["tensors"])[-1] == "output.weight"


def _check_failures(rank: int, cfg, root, good) -> None:
    """One rank failing makes every rank raise, and nothing is committed."""
    latest_before = (root / "latest").read_text()
    topo, tpc, model = _build(cfg, Grid(tp=2, dp=2), seed=3)
    with pytest.raises((RuntimeError, CheckpointError), match="disk full|not committed"):
        with checkpoint_writer(root, 999) as tmp:
            save_model_weights(named_layers(model), tpc, topo, tmp, cfg)
            if rank == 1:
                raise RuntimeError("disk full")
    assert not (root / "step_00000999").exists() and not (root / "step_00000999.tmp").exists()
    assert (root / "latest").read_text() == latest_before
    # a load that fails on one rank (a different directory there) fails on all of them
    bad = good if rank != 2 else root / "nowhere"
    with pytest.raises(CheckpointError, match="nowhere.*model.index.json"):
        load_model_weights(named_layers(model), tpc, bad, cfg)
    # strict: a tensor of the checkpoint loaded by no rank (all ranks leave out the final norm)
    without_norm = [(n, m) for n, m in named_layers(model) if n != "norm"]
    with pytest.raises(CheckpointError, match="not in the model: norm.weight"):
        load_model_weights(without_norm, tpc, good, cfg)
    load_model_weights(without_norm, tpc, good, cfg, strict=False)


def _world4(rank: int, world: int, root) -> None:
    torch.manual_seed(0)
    cfg = preset("tiny_gqa", vocab_size=VOCAB)
    cases = [
        (Grid(tp=2, dp=2), [Grid(tp=4), Grid(tp=1, dp=4), Grid(tp=2, pp=2)]),
        (Grid(tp=4), [Grid(tp=2, dp=2), Grid(tp=1, pp=2, dp=2)]),  # KV replicas in the saved model
        (Grid(tp=2, pp=2), [Grid(tp=4), Grid(tp=1, pp=4), Grid(tp=2, dp=2)]),
    ]
    ckpts = []
    for step, (save_grid, load_grids) in enumerate(cases, start=1):
        ref, ckpt = _save(cfg, save_grid, root, step)
        assert ckpt.name == f"step_{step:08d}"
        ckpts.append(ckpt)
        for grid in load_grids:
            _check_load(cfg, grid, ckpt, ref, f"save {save_grid} -> load {grid}")
        if rank == 0:  # the exporter view: full unpadded tensors, without any layout
            head = read_full_tensor(ckpt, "output.weight")
            assert torch.equal(head, ref["output.weight"][:VOCAB])
            for name, full in ref.items():
                rows = VOCAB if name in VOCAB_PADDED else full.shape[0]
                assert torch.equal(_plain_read(ckpt, name), full[:rows]), name
    if rank == 0:
        _check_index_layouts(ckpts)
        assert json.loads((ckpts[0] / "model.index.json").read_text())["format_version"] == 1
    _check_failures(rank, cfg, root, ckpts[0])


def _world8(rank: int, world: int, root) -> None:
    cfg = preset("tiny_gqa", vocab_size=VOCAB)
    ref, ckpt = _save(cfg, Grid(tp=2, pp=2, dp=2), root, 1)
    for grid in (Grid(tp=8), Grid(tp=4, pp=2), Grid(tp=1, pp=4, dp=2)):  # tp=8: 4 replicas per KV
        _check_load(cfg, grid, ckpt, ref, f"save tp2/pp2/dp2 -> load {grid}")
    if rank == 0:
        assert len(read_index(ckpt)["files"]) == 4


@pytest.mark.slow
def test_weights_across_layouts_world4(tmp_path):
    run_world(4, _world4, tmp_path)


@pytest.mark.slow
def test_weights_across_layouts_world8(tmp_path):
    run_world(8, _world8, tmp_path)
