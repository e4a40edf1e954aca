"""Logit parity with transformers' LlamaForCausalLM on the same random weights (fp32).

Our weights are in Meta's layout (interleaved RoPE); they reach HF through the q/k row permutation,
so this also checks the permutation per head with the KV-head count for k (GQA).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from megallama.config import ModelConfig, preset
from megallama.interop.names import (
    hf_to_meta_state_dict,
    meta_tensor_to_hf,
    meta_to_hf_state_dict,
    permute_hf_to_meta,
    permute_meta_to_hf,
)
from megallama.model.llama import Transformer
from megallama.model.rope import llama3_inv_freq, rope_cos_sin


def hf_model_from(model: Transformer):
    transformers = pytest.importorskip("transformers")
    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_config())
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(meta_to_hf_state_dict(model.state_dict(), cfg), strict=False)
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    assert not unexpected and all("rotary" in k or k in tied for k in missing), (missing, unexpected)
    if cfg.tie_embeddings:  # transformers' tied head is its embedding, as ours is
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
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
    # Llama 3's shape: 128,256-id vocabulary, GQA, llama3 RoPE scaling (3.1), tied (3.2)
    ("tiny_llama3", {"vocab_size": 128256}, 32),
    ("tiny_llama3_tied", {"vocab_size": 128256}, 32),
]


@pytest.mark.parametrize("name,over,seq", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_logits_match_transformers(name, over, seq):
    cfg = preset(name, **{"vocab_size": 512, **over})
    model = Transformer(cfg, seed=11).eval()
    hf = hf_model_from(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
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


def meta_llama3_reference() -> types.ModuleType:
    """``llama_models.llama3.model`` (Meta's reference: ``apply_scaling``, ``precompute_freqs_cis``)
    imported without fairscale, which only its parallel layers need (empty stand-in modules, removed
    again afterwards)."""
    pytest.importorskip("llama_models")
    names = ["fairscale", "fairscale.nn", "fairscale.nn.model_parallel",
             "fairscale.nn.model_parallel.initialize", "fairscale.nn.model_parallel.layers"]
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for n in names:
            sys.modules[n] = types.ModuleType(n)
        layers = sys.modules["fairscale.nn.model_parallel.layers"]
        layers.ColumnParallelLinear = layers.RowParallelLinear = layers.VocabParallelEmbedding = object
        sys.modules["fairscale.nn.model_parallel"].initialize = sys.modules[names[3]]
        import llama_models.llama3.model as reference
    finally:
        for n, module in saved.items():
            if module is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = module
    return reference


def _base_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


@pytest.mark.parametrize("name", ["llama3_1_8b", "llama3_1_405b", "llama3_2_1b", "llama3_2_3b",
                                  "tiny_llama3"])
def test_llama3_rope_frequencies_match_meta_and_transformers(name):
    """Llama 3.1's RoPE scaling: our frequencies equal transformers' ``llama3`` rope type and, for
    Meta's factor 8, Meta's ``apply_scaling``; the cos/sin table equals Meta's
    ``precompute_freqs_cis(use_scaled=True)`` to fp32 round-off; every one of the three bands
    (kept, scaled, blended) is present, so a wrong band rule cannot pass."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = preset(name)
    base, s = _base_inv_freq(cfg), cfg.rope_scaling
    ours = llama3_inv_freq(base, s)
    hf = LlamaRotaryEmbedding(transformers.LlamaConfig(**cfg.to_hf_config()))
    assert hf.attention_scaling == 1.0
    torch.testing.assert_close(ours, hf.inv_freq, rtol=1e-6, atol=0)
    kept, scaled = ours == base, torch.isclose(ours, base / s.factor, rtol=1e-6, atol=0)
    assert kept.any() and scaled.any() and (~kept & ~scaled).any(), (kept, scaled)
    if s.factor == 8.0:  # Meta's llama3 reference hard-codes factor 8 (3.1); 3.2's config says 32
        meta = meta_llama3_reference()
        torch.testing.assert_close(ours, meta.apply_scaling(base), rtol=1e-6, atol=0)
        cis = meta.precompute_freqs_cis(cfg.head_dim, 1024, cfg.rope_theta, True)
        cos, sin = rope_cos_sin(cfg, 1024, torch.device("cpu"))
        torch.testing.assert_close(cos, cis.real, rtol=0, atol=2e-6)
        torch.testing.assert_close(sin, cis.imag, rtol=0, atol=2e-6)


def test_llama3_presets_are_metas_shapes():
    """Parameter counts and FFN widths of the Llama 3 presets are those Meta publishes
    (HF intermediate_size 14336 / 28672 / 53248 / 8192); 3.2's heads are tied."""
    widths = {"llama3_8b": 14336, "llama3_1_70b": 28672, "llama3_1_405b": 53248,
              "llama3_2_1b": 8192, "llama3_2_3b": 8192}
    counts = {"llama3_8b": 8_030_261_248, "llama3_1_70b": 70_553_706_496,
              "llama3_1_405b": 405_853_388_800, "llama3_2_1b": 1_235_814_400,
              "llama3_2_3b": 3_212_749_824}
    for name, width in widths.items():
        cfg = preset(name)
        assert cfg.ffn_hidden_dim == width and cfg.vocab_size == 128256, name
        assert cfg.num_parameters() == counts[name], (name, cfg.num_parameters())
        assert cfg.tie_embeddings == name.startswith("llama3_2"), name
    assert preset("llama3_8b").rope_scaling is None and preset("llama3_8b").max_seq_len == 8192
    assert preset("llama3_1_8b").max_seq_len == 131072
