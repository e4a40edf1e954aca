"""Model configuration: Meta's params.json fields, the Llama 2 and 3 presets, HF config.json mapping.

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


ROPE_TYPES = ("linear", "dynamic", "llama3")


@dataclass
class RopeScaling:
    """RoPE context extension: ``linear`` divides positions by ``factor``; ``dynamic`` is NTK-aware
    scaling of the base when the sequence exceeds ``max_seq_len`` (as transformers implements it);
    ``llama3`` (Llama 3.1+, Meta's ``apply_scaling``) divides the frequencies whose wavelength
    exceeds ``original_max_seq_len / low_freq_factor`` by ``factor``, keeps those shorter than
    ``original_max_seq_len / high_freq_factor`` and blends linearly in between. The last three
    fields are read only by ``llama3``."""

    type: str = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling.type={self.type!r}: expected one of {list(ROPE_TYPES)}")
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value)):
                raise ConfigError(f"rope_scaling.{name}={value!r}: expected a finite number")
        if self.factor < 1.0:
            raise ConfigError(f"rope_scaling.factor={self.factor}: must be >= 1")
        if self.type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError(f"rope_scaling: low_freq_factor={self.low_freq_factor}, high_freq_"
                              f"factor={self.high_freq_factor}: need 0 < low < high")
        if self.type == "llama3" and self.original_max_seq_len < 1:
            raise ConfigError(f"rope_scaling.original_max_seq_len={self.original_max_seq_len}: "
                              "must be >= 1")

    def to_hf(self) -> dict[str, Any]:
        """config.json's ``rope_scaling`` object."""
        if self.type != "llama3":
            return {"type": self.type, "rope_type": self.type, "factor": self.factor}
        return {"rope_type": "llama3", "factor": self.factor,
                "low_freq_factor": self.low_freq_factor, "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_seq_len}

    @classmethod
    def from_hf(cls, scaling: dict[str, Any]) -> RopeScaling | None:
        """From config.json's ``rope_scaling`` (None for the default rope type)."""
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind in ("linear", "dynamic"):
            return cls(kind, float(scaling["factor"]))
        if kind == "llama3":
            return cls("llama3", scaling["factor"], scaling["low_freq_factor"],
                       scaling["high_freq_factor"], scaling["original_max_position_embeddings"])
        if kind != "default":
            raise ConfigError(f"config.json rope_scaling type {kind!r} is not supported")
        return None


_POSITIVE_INTS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                  "max_seq_len")
_POSITIVE_FLOATS = ("ffn_dim_multiplier", "norm_eps", "rope_theta", "init_std")


@dataclass
class ModelConfig:
    """Llama 2 / 3 architecture, in the vocabulary of Meta's params.json. ``tie_embeddings``
    (Llama 3.2 1B/3B): the output head multiplies by the embedding table (one weight)."""

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
    tie_embeddings: bool = False

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
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"tie_embeddings={self.tie_embeddings!r}: expected true or false")

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
        """Exact parameter count of the unpadded model (tied embeddings: the one table counts as
        the output head, with or without ``include_embedding``)."""
        d, f, hd = self.dim, self.ffn_hidden_dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        block = attn + 3 * d * f + 2 * d
        total = self.n_layers * block + d + self.vocab_size * d  # blocks, final norm, output head
        return total + (self.vocab_size * d if include_embedding and not self.tie_embeddings else 0)

    def bos_eos_ids(self) -> tuple[int, int]:
        """The begin/end-of-text ids an export declares: Llama 3's tiktoken vocabulary of 128,256
        ids has <|begin_of_text|> 128000 and <|end_of_text|> 128001, Llama 2's <s> 1 and </s> 2."""
        return (128000, 128001) if self.vocab_size == 128256 else (1, 2)

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
        out.update(self._meta_rope_scaling())
        if self.tie_embeddings:  # not Meta's field (its code ignores it; output.weight is written)
            out["tie_word_embeddings"] = True
        return out

    def _meta_rope_scaling(self) -> dict[str, Any]:
        """params.json's RoPE scaling fields: ``use_scaled_rope`` (Meta's Llama 3.1 code, factor
        8, high_freq_factor 4) and Llama 4's names for another factor; ConfigError otherwise."""
        s = self.rope_scaling
        if s is None:
            return {}
        if s.type != "llama3" or s.low_freq_factor != 1.0 or s.original_max_seq_len != 8192:
            raise ConfigError(f"rope_scaling {s} cannot be expressed in Meta's params.json "
                              "(only llama3 scaling with low_freq_factor 1 and original 8192)")
        out: dict[str, Any] = {"use_scaled_rope": True}
        if s.factor != 8.0:
            out["rope_scaling_factor"] = s.factor
        if s.high_freq_factor != 4.0:
            out["rope_high_freq_factor"] = s.high_freq_factor
        return out

    @classmethod
    def from_meta_params(
        cls, params: dict[str, Any], vocab_size: int | None = None, max_seq_len: int = 4096
    ) -> ModelConfig:
        """Build from a params.json dict; ``vocab_size`` overrides Meta's -1 placeholder."""
        known = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling", "tie_embeddings"}
        kwargs = {k: v for k, v in params.items() if k in known}
        if params.get("use_scaled_rope"):  # Meta's apply_scaling: factor 8, high 4 unless named
            kwargs["rope_scaling"] = RopeScaling(
                "llama3", params.get("rope_scaling_factor") or 8.0, 1.0,
                params.get("rope_high_freq_factor") or 4.0, 8192)
            kwargs.setdefault("rope_theta", 500000.0)
        if "tie_word_embeddings" in params:
            kwargs["tie_embeddings"] = params["tie_word_embeddings"]
        if params.get("use_scaled_rope"):  # no context length in params.json: Llama 3.1's 128k
            max_seq_len = 131072
        elif params.get("vocab_size") == 128256:  # Llama 3.0: 8k
            max_seq_len = 8192
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
        scaling = None if self.rope_scaling is None else self.rope_scaling.to_hf()
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
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_eos_ids()[0],
            "eos_token_id": self.bos_eos_ids()[1],
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
            rope = RopeScaling.from_hf(scaling)
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
            tie_embeddings=hf.get("tie_word_embeddings", False),
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


__all__ = ["ConfigError", "ModelConfig", "RopeScaling", "ROPE_TYPES", "check_tp_layout",
           "kv_replicas_for"]
