"""Configuration: the model (Meta's params.json fields), the named presets (:mod:`.presets`), the
training dataclasses Hydra fills (:mod:`.training`, :mod:`.compose`), the rank grid (:mod:`.grid`) and the
checks run before any collective (:mod:`.validate`). The ground layer: imports nothing else of
megallama and never torch.distributed."""

from megallama.config.model_config import (
    ConfigError,
    ModelConfig,
    RopeScaling,
    check_tp_layout,
    kv_replicas_for,
)
from megallama.config.presets import PRESETS, preset

__all__ = ["ConfigError", "ModelConfig", "RopeScaling", "PRESETS", "check_tp_layout",
           "kv_replicas_for", "preset"]
