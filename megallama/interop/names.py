"""Parameter-name tables between Meta's layout (the model's own names) and Hugging Face's, and the
q/k row permutation between Meta's interleaved RoPE and HF's rotate-half RoPE.

Meta rotates pairs (x[2i], x[2i+1]); HF rotates (x[i], x[i + d/2]). Converting a q or k projection
therefore reorders the rows of every head: within a head, Meta row 2i goes to HF row i and Meta row
2i+1 to HF row i + d/2. For k the head count is n_kv_heads (GQA), not n_heads.
"""

from __future__ import annotations

import re

import torch

from megallama.config import ModelConfig
from megallama.model import layout

_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_TOP_INV = {v: k for k, v in _TOP.items()}


def meta_to_hf_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if not m or m.group(2) not in _LAYER:
        raise KeyError(f"{name!r} is not a Llama parameter name")
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"


def hf_to_meta_name(name: str) -> str:
    if name in _TOP_INV:
        return _TOP_INV[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m or m.group(2) not in _LAYER_INV:
        raise KeyError(f"{name!r} is not a LlamaForCausalLM parameter name")
    return f"layers.{m.group(1)}.{_LAYER_INV[m.group(2)]}"


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from Meta's interleaved order to HF's half-split order."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_meta_to_hf`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _heads_for(name: str, cfg: ModelConfig) -> int | None:
    if name.endswith("attention.wq.weight"):
        return cfg.n_heads
    if name.endswith("attention.wk.weight"):
        return cfg.n_kv_heads
    return None


def meta_tensor_to_hf(name: str, w: torch.Tensor, cfg: ModelConfig) -> tuple[str, torch.Tensor]:
    heads = _heads_for(name, cfg)
    return meta_to_hf_name(name), (permute_meta_to_hf(w, heads) if heads else w)


def hf_tensor_to_meta(name: str, w: torch.Tensor, cfg: ModelConfig) -> tuple[str, torch.Tensor]:
    meta = hf_to_meta_name(name)
    heads = _heads_for(meta, cfg)
    return meta, (permute_hf_to_meta(w, heads) if heads else w)


def meta_to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return dict(meta_tensor_to_hf(k, v, cfg) for k, v in sd.items())


def hf_to_meta_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return dict(hf_tensor_to_meta(k, v, cfg) for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq"))


# ---- layout tables (used by the reshard tool) ----------------------------------------------------
# fairscale (Meta's model-parallel code) splits the embedding along the hidden dimension
# (ParallelEmbedding) and the output head along the vocabulary (ColumnParallelLinear); the
# projections as megallama does (model.layout).
_META_TOP_SPLIT = {"tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None}


def meta_split_dim(name: str) -> int | None:
    """The dimension Meta's consolidated.NN.pth shards split ``name`` along, or None (replicated)."""
    if name in _META_TOP_SPLIT:
        return _META_TOP_SPLIT[name]
    try:
        return layout.tp_split_dim(name)
    except KeyError:
        return None  # not a parameter (rope.freqs): stored whole in every shard


def model_tensor_shapes(cfg: ModelConfig) -> list[tuple[str, list[int]]]:
    """Every parameter of the unpadded model as (Meta name, shape), in model (forward) order --
    what a complete checkpoint of ``cfg`` must contain, whatever its format (model.layout's specs)."""
    return [(spec.name, list(spec.shape)) for spec in layout.shard_specs(cfg, 1)]
