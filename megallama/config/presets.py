"""The named model presets (``model=llama2_7b``, ``llama3_1_8b``, ``tiny``...): Meta's published
architectures of the Llama 2 and Llama 3 families, and tiny test configs that keep their
structural ratios (head grouping, FFN rounding, tied embeddings)."""

from __future__ import annotations

from typing import Any

from megallama.config.model_config import ConfigError, ModelConfig

_LLAMA3: dict[str, Any] = dict(n_kv_heads=8, vocab_size=128256, rope_theta=500000.0,
                               max_seq_len=8192)
_ROPE_3_1: dict[str, Any] = dict(type="llama3", factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_seq_len=8192)
_LLAMA3_1: dict[str, Any] = dict(_LLAMA3, max_seq_len=131072, rope_scaling=_ROPE_3_1)
_LLAMA3_2: dict[str, Any] = dict(_LLAMA3_1, rope_scaling=dict(_ROPE_3_1, factor=32.0),
                                 multiple_of=256, tie_embeddings=True)
_FFN_8B: dict[str, Any] = dict(multiple_of=1024, ffn_dim_multiplier=1.3)  # 14336
_FFN_70B: dict[str, Any] = dict(multiple_of=4096, ffn_dim_multiplier=1.3)  # 28672
PRESETS: dict[str, dict[str, Any]] = {
    "llama2_7b": dict(dim=4096, n_layers=32, n_heads=32),
    "llama2_13b": dict(dim=5120, n_layers=40, n_heads=40),
    "llama2_70b": dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096
    ),
    # Tiny configs for tests and the CPU demo; they keep the real structural ratios.
    "tiny": dict(dim=128, n_layers=4, n_heads=8, n_kv_heads=8, multiple_of=32, max_seq_len=256),
    "tiny_gqa": dict(dim=128, n_layers=4, n_heads=8, n_kv_heads=2, multiple_of=32, max_seq_len=256),
    # 70B's head structure (64 query heads over 8 KV heads) at tiny width.
    "tiny_70b_shape": dict(
        dim=256, n_layers=2, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=64,
        max_seq_len=256,
    ),
    # Llama 3 (tiktoken vocabulary of 128,256 ids, GQA 8 KV heads at every size, rope_theta 5e5):
    # 3.0 has 8k context; 3.1 (and 3.3 70B, the same architecture) scale RoPE to 128k.
    "llama3_8b": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, **_FFN_8B),
    "llama3_70b": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, **_FFN_70B),
    "llama3_1_8b": dict(_LLAMA3_1, dim=4096, n_layers=32, n_heads=32, **_FFN_8B),
    "llama3_1_70b": dict(_LLAMA3_1, dim=8192, n_layers=80, n_heads=64, **_FFN_70B),
    "llama3_1_405b": dict(_LLAMA3_1, dim=16384, n_layers=126, n_heads=128, multiple_of=4096,
                          ffn_dim_multiplier=1.2),
    # 3.2: small, tied input/output embeddings, RoPE factor 32 (as their config.json says)
    "llama3_2_1b": dict(_LLAMA3_2, dim=2048, n_layers=16, n_heads=32, ffn_dim_multiplier=1.5),
    "llama3_2_3b": dict(_LLAMA3_2, dim=3072, n_layers=28, n_heads=24, ffn_dim_multiplier=1.0),
    # Llama 3's shape at tiny width (tests): the full vocabulary, GQA, 3.1's scaled RoPE (head_dim
    # 16 puts frequencies in each of its three bands), and 3.2's tied embeddings
    "tiny_llama3": dict(_LLAMA3_1, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32,
                        max_seq_len=256),
    "tiny_llama3_tied": dict(_LLAMA3_2, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                             multiple_of=32, max_seq_len=256),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset (``llama2_7b``, ``llama3_1_8b``, ``tiny``...) with overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


__all__ = ["PRESETS", "preset"]
