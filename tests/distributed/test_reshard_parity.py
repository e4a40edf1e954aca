"""An HF export made by megallama-reshard gives transformers' LlamaForCausalLM the logits that
megallama's own forward computes at tp=2 (two gloo ranks) from the megallama-layout conversion of
the same Meta checkpoint, within 1e-5 relative (fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megallama.checkpoint.weights import load_model_weights, read_index
from megallama.config import ModelConfig, preset
from megallama.interop.convert import convert
from megallama.model.llama import Transformer
from megallama.parallel.topology import Grid, build_topology, kv_replicas_for
from tests.distributed.harness import run_world

TOKENS = torch.randint(0, 1001, (2, 24), generator=torch.Generator().manual_seed(0))


def _worker(rank: int, world: int, mg: str, out: str) -> None:
    cfg = ModelConfig(**read_index(Path(mg))["model_config"])
    topo = build_topology(Grid(tp=world), kv_replicas=kv_replicas_for(cfg.n_kv_heads, world))
    tp = topo.tensor_parallel(cfg.n_kv_heads)
    model = Transformer(cfg, tp, seed=123).eval()  # another seed: every value must come from disk
    load_model_weights(model.named_layers(), tp, Path(mg), cfg)
    with torch.no_grad():
        logits = model.full_logits(TOKENS)
    if rank == 0:
        torch.save(logits, out)


def test_hf_export_matches_megallama_forward_at_tp2(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = preset("tiny_gqa", vocab_size=1001)  # odd: at tp=2 the head carries a padding row
    meta = tmp_path / "meta"
    meta.mkdir()
    torch.save(Transformer(cfg, seed=7).state_dict(), meta / "consolidated.00.pth")
    (meta / "params.json").write_text(json.dumps(cfg.to_meta_params()))
    convert(f"meta:{meta}", f"megallama:{tmp_path / 'mg'}", tp=2, progress=False)
    convert(f"megallama:{tmp_path / 'mg'}", f"hf:{tmp_path / 'hf'}", progress=False)
    run_world(2, _worker, str(tmp_path / "mg"), str(tmp_path / "logits.pt"))
    ours = torch.load(tmp_path / "logits.pt", weights_only=True)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    with torch.no_grad():
        theirs = hf.eval()(TOKENS).logits
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
    err = ((ours - theirs).norm() / theirs.norm()).item()
    assert err < 1e-5, f"relative logit error {err:.2e}"
