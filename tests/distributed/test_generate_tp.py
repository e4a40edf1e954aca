"""Generation at tp = 2 (two gloo ranks): greedy equals transformers' greedy ``generate`` token for
token on the same weights (MHA and GQA, a left-padded batch of prompts of different lengths, 32 new
tokens), seeded sampling picks the same tokens as at tp = 1 on both ranks, and an HF directory
loads through the reshard reader into the right TP shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megallama.config import preset
from megallama.inference.generation import Sampling, generate
from megallama.inference.loader import load_from_source
from megallama.interop.hf import HFSource
from megallama.model.llama import Transformer
from megallama.parallel.mappings import all_gather_tensor
from megallama.parallel.topology import Grid, build_topology, kv_replicas_for
from tests.distributed.harness import run_world
from tests.test_generate import NEW, PROMPTS, VOCAB, hf_greedy, hf_model_from

pytest.importorskip("transformers")

SAMPLING = Sampling(temperature=0.9, top_k=40, top_p=0.95, seed=11)


def _config(name: str):
    return preset(name, vocab_size=VOCAB + 1, n_layers=2)  # odd vocabulary: TP pads it


def _worker(rank: int, world: int, hf_dir: str) -> None:
    for name in ("tiny", "tiny_gqa"):
        cfg = _config(name)
        topo = build_topology(Grid(tp=world, dp=1), kv_replicas_for(cfg.n_kv_heads, world))
        tpc = topo.tensor_parallel(cfg.n_kv_heads)
        ref = Transformer(cfg, seed=5).eval()  # tp = 1, built locally: init is TP-invariant
        model = Transformer(cfg, tpc, seed=5).eval()
        greedy = generate(model, PROMPTS, NEW)
        assert greedy == hf_greedy(hf_model_from(ref), PROMPTS, NEW), f"{name}: greedy != HF"
        sampled = generate(model, PROMPTS, 16, SAMPLING)
        assert sampled == generate(ref, PROMPTS, 16, SAMPLING), f"{name}: sampling tp=2 != tp=1"
        mine = torch.tensor(sampled)
        both = all_gather_tensor(mine[None], 0, tpc.group)
        assert torch.equal(both[0], both[1]), f"{name}: ranks disagree"
    # the GQA model's HF directory, streamed into fresh (differently seeded) TP shards
    cfg = _config("tiny_gqa")
    topo = build_topology(Grid(tp=world, dp=1), kv_replicas_for(cfg.n_kv_heads, world))
    model = Transformer(cfg, topo.tensor_parallel(cfg.n_kv_heads), seed=99).eval()
    load_from_source(model, HFSource(Path(hf_dir)))
    ref = Transformer(cfg, seed=5).eval()
    assert generate(model, PROMPTS, 12) == generate(ref, PROMPTS, 12), "HF dir load at tp=2"


def test_generate_tp2_matches_transformers(tmp_path) -> None:
    hf_dir = tmp_path / "hf"
    hf_model_from(Transformer(_config("tiny_gqa"), seed=5)).save_pretrained(hf_dir)
    run_world(2, _worker, str(hf_dir))
