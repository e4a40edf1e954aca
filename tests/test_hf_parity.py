"""Logit parity with transformers' LlamaForCausalLM on the same random weights (fp32).

Our weights are in Meta's layout (interleaved RoPE); they reach HF through the q/k row permutation,
so this also checks the permutation per head with the KV-head count for k (GQA).
"""

from __future__ import annotations

import pytest
import torch

from megallama.checkpoint.names import (
    meta_to_hf_state_dict,
    permute_hf_to_meta,
    permute_meta_to_hf,
)
from megallama.config import preset
from megallama.model.llama import Transformer

transformers = pytest.importorskip("transformers")


def hf_model_from(model: Transformer):
    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_config())
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(meta_to_hf_state_dict(model.state_dict(), cfg), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


CASES = [
    ("tiny", {}, 32),
    ("tiny_gqa", {}, 32),
    ("tiny_70b_shape", {}, 24),
    ("tiny_gqa", {"rope_scaling": {"type": "linear", "factor": 4.0}}, 32),
    # dynamic NTK only changes anything beyond max_seq_len: run past it
    ("tiny_gqa", {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_seq_len": 32}, 48),
    ("tiny", {"rope_theta": 500000.0, "norm_eps": 1e-6}, 32),
]


@pytest.mark.parametrize("name,over,seq", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_logits_match_transformers(name, over, seq):
    cfg = preset(name, vocab_size=512, **over)
    model = Transformer(cfg, seed=11).eval()
    hf = hf_model_from(model)
    tokens = torch.randint(0, 512, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.full_logits(tokens)
        theirs = hf(tokens).logits
    err = ((ours - theirs).norm() / theirs.norm()).item()
    assert err < 1e-5, f"relative logit error {err:.2e}"


def test_permutation_is_needed_and_invertible():
    cfg = preset("tiny_gqa", vocab_size=512)
    model = Transformer(cfg, seed=11).eval()
    hf = hf_model_from(model)
    sd = meta_to_hf_state_dict(model.state_dict(), cfg)
    # without the permutation the logits are wrong: the test above would catch a missing permute
    sd["model.layers.0.self_attn.q_proj.weight"] = model.state_dict()["layers.0.attention.wq.weight"]
    hf.load_state_dict(sd, strict=False)
    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(model.full_logits(tokens), hf(tokens).logits, atol=1e-4)
    w = torch.randn(cfg.n_kv_heads * cfg.head_dim, cfg.dim)
    assert torch.equal(permute_hf_to_meta(permute_meta_to_hf(w, cfg.n_kv_heads), cfg.n_kv_heads), w)
