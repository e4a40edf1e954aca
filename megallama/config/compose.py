"""Compose a :class:`TrainConfig` from ``conf/`` and command-line overrides with Hydra.

Hydra's compose API is used rather than ``@hydra.main``: under torchrun every rank would run the
decorated main and create its own output directory, and the run directory is ``trainer.output_dir``
anyway. The model group's options are registered from ``megallama.config.PRESETS`` (there
are no conf/model/*.yaml copies). The dataclass tree of :mod:`megallama.config.train_config` is registered in Hydra's ConfigStore as
``train_schema`` (the first entry of ``conf/config.yaml``'s defaults list), so every override is
type-checked against it and unknown keys fail. Every Hydra/OmegaConf error is turned into one
:class:`~megallama.config.ConfigError` line that names the option, so a typo on a 64-rank launch
reads as a sentence instead of a traceback per rank.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

import megallama
from megallama.config.model_config import ConfigError, ModelConfig
from megallama.config.presets import PRESETS
from megallama.config.train_config import TrainConfig

SCHEMA_NAME = "train_schema"
CONF_DIR_ENV = "MEGALLAMA_CONF_DIR"

ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)
# The model group's options are the presets themselves (model=llama2_7b ...): one place, no YAML copy.
for _name, _fields in PRESETS.items():
    ConfigStore.instance().store(group="model", name=_name, node=ModelConfig(**_fields))


def default_config_dir() -> Path:
    """``$MEGALLAMA_CONF_DIR`` when set, else the repository's ``conf/`` next to the package."""
    env = os.environ.get(CONF_DIR_ENV)
    if env:
        return Path(env)
    return Path(megallama.__file__).resolve().parents[1] / "conf"


def load_config(
    overrides: list[str] | None = None, config_dir: str | Path | None = None
) -> TrainConfig:
    """Compose ``config.yaml`` of ``config_dir`` with Hydra ``overrides`` into a TrainConfig.

    The result is a real dataclass tree (``OmegaConf.to_object``), so ModelConfig's own checks
    (heads divide dim, ...) have run. Raises ConfigError with one line on any unknown group option,
    unknown key, value of the wrong type, missing value or invalid model.
    """
    overrides = list(overrides or [])
    conf_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    conf_dir = conf_dir.expanduser().resolve()
    if not (conf_dir / "config.yaml").is_file():
        raise ConfigError(
            f"config directory {conf_dir} has no config.yaml; pass config_dir or set "
            f"{CONF_DIR_ENV}"
        )
    # compose needs a fresh GlobalHydra; a previous initialisation (another load) is dropped.
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        try:
            with initialize_config_dir(
                version_base="1.3", config_dir=str(conf_dir), job_name="megallama"
            ):
                composed = compose(config_name="config", overrides=overrides)
        except (AssertionError, AttributeError) as exc:  # Hydra internals, on null nodes
            raise ConfigError(_describe_internal(exc, overrides)) from None
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), composed)
        _reject_unknown_keys(composed, TrainConfig, "")
        missing = sorted(OmegaConf.missing_keys(composed))  # merge() would hide '???'
        if missing:
            raise ConfigError(
                f"no value given for {', '.join(missing)}; set it (e.g. {missing[0]}=...)"
            )
        return _to_object(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_describe(exc, overrides)) from None
    finally:
        GlobalHydra.instance().clear()


def to_yaml(cfg: TrainConfig) -> str:
    """The full resolved configuration as YAML (every field, the way it will be used)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write :func:`to_yaml` to ``path`` atomically (temporary file, fsync, rename), so a crash
    never leaves a half-written config next to a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(to_yaml(cfg))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def config_from_yaml(text: str) -> TrainConfig:
    """Parse YAML written by :func:`to_yaml` back into a TrainConfig, with the same type checks
    as :func:`load_config` (missing keys take the dataclass defaults)."""
    try:
        loaded = OmegaConf.create(text)
        if not isinstance(loaded, DictConfig):
            raise ConfigError("a saved training config must be a YAML mapping")
        _reject_unknown_keys(loaded, TrainConfig, "")
        missing = sorted(OmegaConf.missing_keys(loaded))
        if missing:
            raise ConfigError(f"no value given for {', '.join(missing)}")
        return _to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), loaded))
    except ConfigError:
        raise
    except (OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(_describe(exc, [])) from None


def load_saved_config(path: str | Path) -> TrainConfig:
    """Read a config saved by :func:`save_config` (e.g. from a run's output directory)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"saved config not found: {path}")
    try:
        return config_from_yaml(path.read_text(encoding="utf-8"))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# ---- helpers -------------------------------------------------------------------------------------
def _to_object(cfg: DictConfig) -> TrainConfig:
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError as exc:  # ModelConfig / RopeScaling __post_init__
        raise ConfigError(f"model: {exc}") from None
    assert isinstance(obj, TrainConfig)
    return obj


def _reject_unknown_keys(node: Any, schema: type, path: str) -> None:
    """Fail on keys that are not dataclass fields. Hydra's ``+key=value`` adds keys even to a
    structured config and ``to_object`` then drops them silently: a typo must not vanish."""
    if not isinstance(node, DictConfig) or not dataclasses.is_dataclass(schema):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        full = f"{path}{key}"
        if key not in fields:
            raise ConfigError(_unknown_key_message(full, schema))
        value = node._get_node(key)
        sub = OmegaConf.get_type(value) if isinstance(value, DictConfig) else None
        if sub is not None and dataclasses.is_dataclass(sub):
            _reject_unknown_keys(value, sub, f"{full}.")


def _unknown_key_message(full_key: str, schema: type | None) -> str:
    known = sorted(f.name for f in dataclasses.fields(schema)) if schema else []
    where = f" ({schema.__name__} fields: {', '.join(known)})" if known else ""
    return f"unknown config key '{full_key}'{where}"


def _schema_at(full_key: str) -> type | None:
    """The dataclass that holds ``full_key``'s last component (``model.foo`` -> ModelConfig)."""
    schema: Any = TrainConfig
    for part in full_key.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(schema)} if schema else {}
        default = fields.get(part)
        if default is None or default.default_factory is dataclasses.MISSING:
            return None
        schema = type(default.default_factory())
        if not dataclasses.is_dataclass(schema):
            return None
    return schema


def _first_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _describe(exc: BaseException, overrides: list[str]) -> str:
    """One line for a Hydra or OmegaConf error."""
    if isinstance(exc, MissingConfigException):
        missing = exc.missing_cfg_file or ""
        group, _, name = missing.rpartition("/")
        if exc.options is not None and group:
            what = "model preset" if group == "model" else f"{group} option"
            return f"unknown {what} '{name}'; choose one of {sorted(exc.options)}"
        return f"config not found: {_first_line(str(exc))}"
    if isinstance(exc, OverrideParseException):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return "; ".join(lines[:2])
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        key = cause.full_key
        if isinstance(cause, ConfigAttributeError | ConfigKeyError) and "not in" in str(cause):
            return _unknown_key_message(key, _schema_at(key))
        detail = _first_line(cause.msg or str(cause))
        hint = " (write lists as key=[a,b])" if "ListConfig" in detail else ""
        return f"bad value for {key}: {detail}{hint}"
    detail = _first_line(str(exc))
    return f"invalid configuration (overrides {overrides}): {detail}" if overrides else detail


def _describe_internal(exc: BaseException, overrides: list[str]) -> str:
    detail = _first_line(str(exc)) or type(exc).__name__
    hint = ""
    if "NoneType" in detail:
        hint = (
            "; an override sets a field inside a node that is null (e.g. model.rope_scaling): "
            "set the whole node in a YAML file (e.g. an experiment) instead"
        )
    return f"could not apply overrides {overrides}: {detail}{hint}"


__all__ = [
    "CONF_DIR_ENV",
    "SCHEMA_NAME",
    "config_from_yaml",
    "default_config_dir",
    "load_config",
    "load_saved_config",
    "save_config",
    "to_yaml",
]
