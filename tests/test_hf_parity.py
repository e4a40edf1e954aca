"""Logit parity with transformers' LlamaForCausalLM on the same random weights (fp32).

Our weights are in Meta's layout (interleaved RoPE); they reach HF through the q/k row permutation,
so this also checks the permutation per head with the KV-head count for k (GQA).
"""

from __future__ import annotations

import pytest
import torch

from megallama.config import preset
from megallama.interop.names import (
    hf_to_meta_state_dict,
    meta_tensor_to_hf,
    meta_to_hf_state_dict,
    permute_hf_to_meta,
    permute_meta_to_hf,
)
from megallama.model.llama import Transformer


def hf_model_from(model: Transformer):
    transformers = pytest.importorskip("transformers")
    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_config())
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(meta_to_hf_state_dict(model.state_dict(), cfg), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


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
    err = relative_error(ours, theirs)
    assert err < 1e-5, f"relative logit error {err:.2e}"


def test_permutation_is_needed_and_invertible():
    """transformers is the oracle: with the permuted q and k its logits are ours; loading either
    projection of one layer as Meta stores it (unpermuted) makes them differ; the state dict read
    back from transformers' model and permuted back is the original, bit for bit."""
    cfg = preset("tiny_gqa", vocab_size=512)
    model = Transformer(cfg, seed=11).eval()
    meta = model.state_dict()
    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    hf = hf_model_from(model)
    with torch.no_grad():
        ours = model.full_logits(tokens)
        err = relative_error(ours, hf(tokens).logits)
        assert err < 1e-5, f"permuted weights: relative logit error {err:.2e}"
        for hf_proj, meta_proj in (("q_proj", "wq"), ("k_proj", "wk")):
            unpermuted = hf_model_from(model)
            as_meta_stores_it = meta[f"layers.0.attention.{meta_proj}.weight"]
            unpermuted.load_state_dict(
                {f"model.layers.0.self_attn.{hf_proj}.weight": as_meta_stores_it}, strict=False)
            err = relative_error(ours, unpermuted(tokens).logits)
            assert err > 1e-3, f"{hf_proj} unpermuted still matches ({err:.2e}): a no-op permutation"
    back = hf_to_meta_state_dict({k: v for k, v in hf.state_dict().items() if "rotary" not in k}, cfg)
    assert set(back) == set(meta)
    for name, t in meta.items():
        assert torch.equal(back[name], t), name


def test_permutation_row_order():
    """The q/k permutation moves Meta row 2i of a head to HF row i and row 2i+1 to row i + d/2
    (rotate-half pairs (x[i], x[i + d/2]) from interleaved pairs (x[2i], x[2i+1])); k uses the
    KV-head count. The expected order is written out here, not taken from the code under test."""
    cfg = preset("tiny_gqa", vocab_size=512)
    d = cfg.head_dim
    g = torch.Generator().manual_seed(0)
    for meta_name, heads in (("layers.1.attention.wq.weight", cfg.n_heads),
                             ("layers.1.attention.wk.weight", cfg.n_kv_heads)):
        w = torch.randn(heads * d, cfg.dim, generator=g)
        # HF row (h, j * d/2 + i) holds Meta row (h, 2i + j)
        order = [h * d + 2 * i + j for h in range(heads) for j in (0, 1) for i in range(d // 2)]
        assert order != sorted(order)
        assert torch.equal(permute_meta_to_hf(w, heads), w[order]), meta_name
        assert torch.equal(permute_hf_to_meta(w[order], heads), w), meta_name
        assert torch.equal(meta_tensor_to_hf(meta_name, w, cfg)[1], w[order]), meta_name
