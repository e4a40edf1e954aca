"""An HF export made by megallama-reshard gives transformers' LlamaForCausalLM the logits that
megallama's own forward computes at tp=2 (two gloo ranks) from the megallama-layout conversion of
the same Meta checkpoint, within 1e-5 relative (fp32), and at pp=2 (the inference loader's
stages); in the same launch the same for a Llama-3-shaped model (GQA, Llama 3.1's RoPE scaling,
params.json's use_scaled_rope; its 128,256-id vocabulary and tied 3.2 head are checked against
transformers in tests/test_hf_parity.py and across TP in test_tensor_parallel.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megallama.checkpoint.weights import load_model_weights, read_index
from megallama.config import ModelConfig, preset
from megallama.inference.loader import load_for_inference
from megallama.interop.convert import convert
from megallama.model.llama import Transformer
from megallama.parallel.topology import Grid, build_topology, kv_replicas_for
from tests.distributed.harness import run_world

TOKENS = torch.randint(0, 1001, (2, 24), generator=torch.Generator().manual_seed(0))
# vocab 1001, odd: at tp=2 the head carries a padding row
CASES = [("tiny_gqa", {"vocab_size": 1001}), ("tiny_llama3", {"vocab_size": 1001})]


def _worker(rank: int, world: int, runs: list[tuple[str, str]]) -> None:
    for mg, out in runs:
        cfg = ModelConfig(**read_index(Path(mg))["model_config"])
        topo = build_topology(Grid(tp=world), kv_replicas=kv_replicas_for(cfg.n_kv_heads, world))
        tp = topo.tensor_parallel(cfg.n_kv_heads)
        model = Transformer(cfg, tp, seed=123).eval()  # another seed: every value from disk
        load_model_weights(model.named_layers(), tp, Path(mg), cfg)
        with torch.no_grad():
            logits = {"tp2": model.full_logits(TOKENS)}
        stage = load_for_inference(Path(mg), tp=1, pp=world)  # two stages
        with torch.no_grad():
            last = stage(TOKENS)
        if stage.is_last_stage:
            logits["pp2"] = last[..., :cfg.vocab_size]
            torch.save(logits, out)


def test_hf_export_matches_megallama_forward_at_tp2_and_pp2(tmp_path):
    transformers = pytest.importorskip("transformers")
    runs = []
    for name, over in CASES:
        cfg = preset(name, **over)
        meta, mg, hf = (tmp_path / name / d for d in ("meta", "mg", "hf"))
        meta.mkdir(parents=True)
        torch.save(Transformer(cfg, seed=7).state_dict(), meta / "consolidated.00.pth")
        (meta / "params.json").write_text(json.dumps(cfg.to_meta_params()))
        convert(f"meta:{meta}", f"megallama:{mg}", tp=2, progress=False)
        convert(f"megallama:{mg}", f"hf:{hf}", progress=False)
        runs.append((str(mg), str(tmp_path / name / "logits.pt")))
    run_world(2, _worker, runs)
    for (name, _), (_, out) in zip(CASES, runs, strict=True):
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / name / "hf",
                                                           attn_implementation="eager")
        with torch.no_grad():
            theirs = hf.eval()(TOKENS).logits
        assert theirs.dtype == torch.float32
        got = torch.load(out, weights_only=True)
        assert set(got) == {"tp2", "pp2"}
        for layout, ours in got.items():
            assert theirs.shape == ours.shape, (name, layout)
            err = ((ours - theirs).norm() / theirs.norm()).item()
            assert err < 1e-5, f"{name} at {layout}: relative logit error {err:.2e}"
