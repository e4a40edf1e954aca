"""The checks of the lm-eval model ``megallama``'s arguments (``--model_args`` and lm-eval's own
``--batch_size`` / ``--device``), each failure one ConfigError naming the key as the user typed
it (``--model_args tp=0``, ``--device cuda:0``), before any checkpoint is loaded or
torch.distributed is started.

Kept apart from :mod:`megallama.inference.harness` so that it needs no lm-eval: lm-eval builds
the model with ``cls(**model_args, **lm_eval_options)``, where an unknown or repeated key would be
a TypeError traceback; :func:`check_keys` names it first.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megallama.config import ConfigError, ModelConfig
from megallama.inference.loader import FORMATS, check_layout, inspect_checkpoint
from megallama.parallel.runtime import resolve_device, world_info

LM_EVAL_OPTIONS = ("batch_size", "max_batch_size", "device")  # passed by lm-eval, not model_args


def model_arg_keys(init: Callable[..., Any]) -> list[str]:
    """The ``--model_args`` keys a model's ``__init__`` takes (lm-eval's own options apart)."""
    params = inspect.signature(init).parameters
    return [name for name in params if name != "self" and name not in LM_EVAL_OPTIONS]


def check_keys(model_args: Mapping[str, Any], lm_eval_options: Mapping[str, Any],
               known: list[str]) -> None:
    """Unknown keys, keys given both in ``--model_args`` and as lm-eval options, and a missing
    ``checkpoint``: one ConfigError naming the key (instead of the TypeError of ``cls(...)``)."""
    for key in model_args:
        if key in LM_EVAL_OPTIONS and key in lm_eval_options:
            raise ConfigError(f"--model_args {key}=...: give it once, as lm-eval's --{key}")
        if key not in known and key not in LM_EVAL_OPTIONS:
            raise ConfigError(f"--model_args: unknown key {key!r} for the megallama model; the "
                              f"keys are {', '.join(known)}")
    if "checkpoint" not in model_args:
        raise ConfigError("--model_args needs checkpoint=DIR (a megallama step, checkpoints or "
                          "run directory, or a Meta / HF directory with format=meta|hf)")


def int_arg(key: str, value: object, low: int, default: str = "") -> int:
    """``value`` of ``--model_args key=value`` as an integer >= ``low`` (lm-eval has already
    turned digits into an int, and a signed number into a float; a string of digits from Python
    callers is accepted too)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int and not (isinstance(value, str) and text.lstrip("+-").isdigit()):
        raise ConfigError(f"--model_args {key}={value!r}: expected an integer >= {low}{default}")
    number = int(text)
    if number < low:
        raise ConfigError(f"--model_args {key}={number}: must be >= {low}{default}")
    return number


def bool_arg(key: str, value: object) -> bool | None:
    """``value`` of an optional boolean key (None: unset)."""
    if value is None or isinstance(value, bool):
        return value
    raise ConfigError(f"--model_args {key}={value!r}: expected true or false")


def batch_size_arg(value: int | str) -> int:
    """lm-eval's ``--batch_size`` as a number >= 1 (``auto`` is HFLM's, not supported here)."""
    if isinstance(value, int) or str(value).isdigit():
        if int(value) >= 1:
            return int(value)
    raise ConfigError(f"--batch_size {value}: the megallama model needs a number >= 1 "
                      "(no 'auto'), e.g. --batch_size 8")


def device_arg(name: str | None) -> torch.device:
    """lm-eval's ``--device`` (cuda, cuda:N, cpu; none: CUDA when there is one). A CUDA rank uses
    the GPU of its LOCAL_RANK, whatever the index says: every rank gets the same option."""
    kind = str(name or "auto").split(":")[0]
    if kind not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {name}: the megallama model runs on cuda or cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is visible (lm-eval's --device "
                          "defaults to cuda:0); pass --device cpu")
    return resolve_device(kind)


def checked_model(checkpoint: str, fmt: str, tp: object, pp: object) -> tuple[ModelConfig, int, int]:
    """The checkpoint's model config and ``(tp, pp)``, checked against the model and the world
    (one pipeline of tp * pp ranks: lm-eval runs every request on every rank, no DP)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--model_args format={fmt!r}: expected one of {', '.join(FORMATS)}")
    tp, pp = int_arg("tp", tp, 1), int_arg("pp", pp, 1)
    cfg = inspect_checkpoint(Path(checkpoint), fmt).cfg
    world = dist.get_world_size() if dist.is_initialized() else world_info()[1]
    try:
        check_layout(cfg, tp, pp, world, exact=True, names=("tp=", "pp="))
    except ConfigError as e:
        raise ConfigError(f"--model_args {e}") from None
    return cfg, tp, pp


def max_length_arg(value: object, cfg: ModelConfig) -> int:
    """``max_length`` (default: the model's context), between 1 and the model's context."""
    if value is None:
        return cfg.max_seq_len
    length = int_arg("max_length", value, 1, f" (default: the model's context, {cfg.max_seq_len})")
    if length > cfg.max_seq_len:
        raise ConfigError(f"--model_args max_length={length} exceeds the model's context of "
                          f"{cfg.max_seq_len}")
    return length


__all__ = ["batch_size_arg", "bool_arg", "check_keys", "checked_model", "device_arg",
           "int_arg", "max_length_arg", "model_arg_keys"]
