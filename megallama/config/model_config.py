"""Model configuration: Meta's params.json fields, the Llama 2 presets, and HF config.json mapping.

The field names are Meta's (``dim``, ``n_layers``, ...) so a params.json loads as-is; the FFN width is
derived exactly as Meta's reference code derives it, never stored, so a preset cannot drift from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model or layout; the message says what to fix."""


@dataclass
class RopeScaling:
    """RoPE context extension: ``linear`` divides positions by ``factor``; ``dynamic`` is NTK-aware
    scaling of the base when the sequence exceeds ``max_seq_len`` (as transformers implements it)."""

    type: str = "linear"
    factor: float = 1.0

    def __post_init__(self) -> None:
        if self.type not in ("linear", "dynamic"):
            raise ConfigError(f"rope_scaling.type={self.type!r}: expected 'linear' or 'dynamic'")
        if self.factor < 1.0:
            raise ConfigError(f"rope_scaling.factor={self.factor}: must be >= 1")


_POSITIVE_INTS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                  "max_seq_len")
_POSITIVE_FLOATS = ("ffn_dim_multiplier", "norm_eps", "rope_theta", "init_std")


@dataclass
class ModelConfig:
    """Llama 2 architecture, in the vocabulary of Meta's params.json."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    rope_scaling: RopeScaling | None = None
    pad_token_id: int | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self._check_values()
        if self.vocab_size <= 0:
            raise ConfigError(
                f"vocab_size={self.vocab_size}: set it from the tokenizer "
                "(Meta's params.json ships -1; pass the tokenizer's vocab size)"
            )
        if self.dim % self.n_heads:
            raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")

    def _check_values(self) -> None:
        """Each field's type and range (a params.json / config.json value of the wrong kind is
        refused here rather than copied into an export or failing deep inside the model)."""
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}={value!r}: expected an integer")
            if value < 1 and not (name == "vocab_size" and value < 0):  # Meta ships -1
                raise ConfigError(f"{name}={value}: must be >= 1")
        for name in _POSITIVE_FLOATS:
            value = getattr(self, name)
            if value is None and name == "ffn_dim_multiplier":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name}={value!r}: expected a number")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name}={value}: must be a finite number > 0")
        if self.pad_token_id is not None and (isinstance(self.pad_token_id, bool) or
                                              not isinstance(self.pad_token_id, int)):
            raise ConfigError(f"pad_token_id={self.pad_token_id!r}: expected an integer or null")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width, derived as Meta's FeedForward does (7B: 11008, 13B: 13824, 70B: 28672)."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_parameters(self, include_embedding: bool = True) -> int:
        """Exact parameter count of the unpadded model."""
        d, f, hd = self.dim, self.ffn_hidden_dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        block = attn + 3 * d * f + 2 * d
        total = self.n_layers * block + d + self.vocab_size * d  # blocks, final norm, output head
        return total + (self.vocab_size * d if include_embedding else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- Meta params.json -------------------------------------------------------------------
    def to_meta_params(self) -> dict[str, Any]:
        """The params.json Meta ships with its consolidated checkpoints."""
        out: dict[str, Any] = {
            "dim": self.dim,
            "multiple_of": self.multiple_of,
            "n_heads": self.n_heads,
            "n_layers": self.n_layers,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
        }
        if self.n_kv_heads != self.n_heads:
            out["n_kv_heads"] = self.n_kv_heads
        if self.ffn_dim_multiplier is not None:
            out["ffn_dim_multiplier"] = self.ffn_dim_multiplier
        if self.rope_theta != 10000.0:
            out["rope_theta"] = self.rope_theta
        return out

    @classmethod
    def from_meta_params(
        cls, params: dict[str, Any], vocab_size: int | None = None, max_seq_len: int = 4096
    ) -> ModelConfig:
        """Build from a params.json dict; ``vocab_size`` overrides Meta's -1 placeholder."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in known}
        if vocab_size is not None:
            kwargs["vocab_size"] = vocab_size
        kwargs.setdefault("max_seq_len", max_seq_len)
        return cls(**kwargs)

    @classmethod
    def from_meta_params_file(cls, path: str | Path, vocab_size: int | None = None) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: params.json not found (Meta checkpoints ship one)")
        try:
            params = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(params, dict):
            raise ConfigError(f"{path}: expected a JSON object of model fields, got "
                              f"{type(params).__name__}")
        try:
            return cls.from_meta_params(params, vocab_size=vocab_size)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    # ---- Hugging Face config.json -----------------------------------------------------------
    def to_hf_config(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """LlamaForCausalLM's config.json fields."""
        scaling = None
        if self.rope_scaling is not None:
            scaling = {
                "type": self.rope_scaling.type,
                "rope_type": self.rope_scaling.type,
                "factor": self.rope_scaling.factor,
            }
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "hidden_act": "silu",
            "initializer_range": self.init_std,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": self.pad_token_id,
            "pretraining_tp": 1,
            "use_cache": True,
            "torch_dtype": torch_dtype,
        }

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_hf_config`; ``multiple_of``/``ffn_dim_multiplier`` are solved so that
        the derived FFN width equals ``intermediate_size`` exactly."""
        dim = hf["hidden_size"]
        n_heads = hf["num_attention_heads"]
        positive = all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                       for v in (dim, n_heads))
        if positive and hf.get("head_dim") not in (None, dim // n_heads):
            raise ConfigError(f"config.json head_dim={hf['head_dim']} != hidden_size/heads")
        scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
        rope = None
        rope_theta = hf.get("rope_theta", 10000.0)
        if scaling:
            rope_theta = scaling.get("rope_theta", rope_theta)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind in ("linear", "dynamic"):
                rope = RopeScaling(kind, float(scaling["factor"]))
            elif kind != "default":
                raise ConfigError(f"config.json rope_scaling type {kind!r} is not supported")
        cfg = cls(
            dim=dim,
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads", n_heads),
            vocab_size=hf["vocab_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            max_seq_len=hf.get("max_position_embeddings", 4096),
            rope_scaling=rope,
            pad_token_id=hf.get("pad_token_id"),
        )
        cfg.multiple_of, cfg.ffn_dim_multiplier = _solve_ffn(dim, hf["intermediate_size"])
        return cfg


def _solve_ffn(dim: int, intermediate: int) -> tuple[int, float | None]:
    """Find Meta-style (multiple_of, ffn_dim_multiplier) that reproduce ``intermediate``."""
    for multiple_of in (256, 4096, 1024, 512, 128, 64, 32, 16, 8, 4, 2, 1):
        probe = ModelConfig(dim=dim, n_heads=1, multiple_of=multiple_of)
        if probe.ffn_hidden_dim == intermediate:
            return multiple_of, None
    base = int(2 * (4 * dim) / 3)
    for multiple_of in (4096, 1024, 256, 1):
        for mult in (1.3, 1.5, 2.0, 4.0, 8.0 / 3, intermediate / base):
            probe = ModelConfig(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=mult)
            if probe.ffn_hidden_dim == intermediate:
                return multiple_of, mult
    raise ConfigError(f"intermediate_size={intermediate} cannot be expressed for hidden_size={dim}")


def check_tp_layout(cfg: ModelConfig, tp: int) -> None:
    """Raise one clear error when ``tp`` cannot split this model."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"parallel.tp={tp}: must be an integer >= 1")
    if cfg.n_heads % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide n_heads={cfg.n_heads}")
    if tp <= cfg.n_kv_heads and cfg.n_kv_heads % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide n_kv_heads={cfg.n_kv_heads}")
    if tp > cfg.n_kv_heads and tp % cfg.n_kv_heads:
        raise ConfigError(
            f"parallel.tp={tp} > n_kv_heads={cfg.n_kv_heads} must be a multiple of it "
            "(each KV head is then replicated on tp/n_kv_heads ranks)"
        )
    if cfg.ffn_hidden_dim % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide the FFN width {cfg.ffn_hidden_dim}")


def kv_replicas_for(n_kv_heads: int, tp: int) -> int:
    """How many TP ranks share one KV head: 1 when tp <= n_kv_heads."""
    return max(1, tp // n_kv_heads)


# ---- presets ------------------------------------------------------------------------------------
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
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset (``llama2_7b``, ``llama2_13b``, ``llama2_70b``, ``tiny``...) with overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


__all__ = ["ConfigError", "ModelConfig", "RopeScaling", "PRESETS", "check_tp_layout",
           "kv_replicas_for", "preset"]
