"""``megallama-plan``: the layout planner's command line (the formulas are in
:mod:`megallama.training.planner`, documented in docs/PLANNER.md)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from megallama.config import PRESETS, ConfigError, ModelConfig, preset
from megallama.config.arguments import os_error_message, report_error
from megallama.training.plan_ranking import CRITERION
from megallama.training.planner import (
    DEFAULT_OVERHEAD_GIB,
    GIB,
    Layout,
    MemoryEstimate,
    plan,
    resolved_optimizer,
)

# ---- command line --------------------------------------------------------------------------------
USAGE = """usage: megallama-plan model=NAME|params.json gpus=N [seq_len=4096] [global_batch=1024]
  [gpu_mem_gib=80] [precision=bf16|fp32] [zero_stage=0|1|2|3] [micro_batch=1,2] [tp=1,2,4,8] [pp=...]
  [optim_impl=fused|distributed (zero_stage=0)] [fp8=none|tensorwise|rowwise (trainer.fp8)]
  (default, as the trainer's optim.impl=auto: bf16 -> fused at dp 1, distributed at dp > 1;
   fp32 -> ZeRO-1)
  [activation_checkpointing=all|both|on|off|selective (all, the default: off, selective, on;
   both: off, on)]
  [sequence_parallel=both|on|off] [device=cuda|cpu] [overhead_gib=3 (cuda) / 0 (cpu)] [max_tp=8] [partition_method=balanced] [top=20] [json=PATH]
  [model.FIELD=VALUE ...]   (formulas: docs/PLANNER.md)"""
OPTIONS = ("model", "gpus", "seq_len", "global_batch", "gpu_mem_gib", "precision", "zero_stage",
           "micro_batch", "tp", "pp", "activation_checkpointing", "sequence_parallel", "device",
           "overhead_gib", "max_tp", "partition_method", "top", "json", "optim_impl",
           "fp8")
_CKPT = {"none": "off", "selective": "sel", "full": "on"}  # the table's ckpt column
OPTIM_IMPLS = ("fused", "distributed")  # megallama's optimizers (zero_stage=0)


def _optimizer(opts: dict[str, str], precision: str) -> tuple[int | None, str]:
    """(zero_stage, optim_impl) as given; what is not given the planner resolves per layout as the
    trainer's ``optim.impl=auto`` does (planner.resolved_optimizer): bf16 or zero_stage=0 plans
    the fused optimizer at dp 1 and the distributed one at dp > 1, fp32 DeepSpeed's ZeRO-1;
    ``optim_impl`` alone means zero_stage 0."""
    if "zero_stage" in opts:
        return _get(opts, "zero_stage", 1), opts.get("optim_impl", "auto")
    if "optim_impl" in opts:
        return 0, opts["optim_impl"]
    return None, "auto"


def _optimizer_label(precision: str, zero: int | None, impl: str) -> str:
    """The header's optimizer: what the trainer runs at dp = 1 and at dp > 1."""
    one = resolved_optimizer(precision, zero, impl, Layout(1, 1, 1))
    many = resolved_optimizer(precision, zero, impl, Layout(1, 1, 2))
    if one[0] != 0:
        return f"ZeRO-{one[0]}"
    if one == many:
        return f"optim.impl={one[1]}"
    return f"optim.impl=auto ({one[1]} at dp = 1, {many[1]} at dp > 1)"
_COLUMNS = [("weights", "weights"), ("grads", "gradients"), ("master", "master"),
            ("adam", "optimizer"), ("act", "activations"), ("logits", "logits"), ("step", "step"),
            ("ovh", "overhead")]


def _scalar(text: str) -> Any:
    """A command-line value as JSON would read it (40, 1.3, true, null), else the string."""
    try:
        return json.loads(text.lower() if text.lower() in ("true", "false", "null") else text)
    except json.JSONDecodeError:
        return None if text.lower() == "none" else text


def load_model(spec: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """A preset name or a Meta params.json / HF config.json path, with ModelConfig overrides."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(f"unknown model field(s) {sorted(unknown)}: not in ModelConfig")
    if spec in PRESETS:
        return preset(spec, **overrides)
    path = Path(spec)
    if not (path.suffix == ".json" and path.is_file()):
        raise ConfigError(f"unknown model {spec!r}: neither a preset ({', '.join(PRESETS)}) nor "
                          "an existing params.json / config.json")
    raw = _read_json(path)
    try:
        if "hidden_size" in raw:
            return dataclasses.replace(ModelConfig.from_hf_config(raw), **overrides)
        raw.update(overrides)
        vocab = raw.get("vocab_size", -1)
        if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
            raise ConfigError(f"{path} has vocab_size={vocab!r}: pass the tokenizer's, e.g. "
                              "model.vocab_size=32000")
        return ModelConfig.from_meta_params(raw)
    except KeyError as exc:  # a field the format needs
        raise ConfigError(f"{path}: missing field {exc}") from None
    except TypeError as exc:  # a field of the wrong JSON type
        raise ConfigError(f"{path}: {exc}") from None


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; one line naming the file for anything else."""
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}); give a Meta params.json or an HF config.json") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"model={os_error_message(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a JSON {type(raw).__name__}, expected an object (a Meta "
                          "params.json or an HF config.json)")
    return raw


def _parse(argv: list[str]) -> tuple[dict[str, str], dict[str, Any]]:
    opts: dict[str, str] = {}
    overrides: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        if not sep:
            raise ConfigError(f"argument {arg!r}: expected key=value (e.g. gpus=8)")
        if key.startswith("model."):
            overrides[key[len("model."):]] = _scalar(value)
        elif key in OPTIONS:
            opts[key] = value
        else:
            raise ConfigError(f"unknown option {key!r}; known: {', '.join(OPTIONS)}, model.FIELD")
    return opts, overrides


# the smallest value each numeric option may take (sizes of 0 or below, negative memory are refused)
_MINIMUM = {"gpus": 1, "seq_len": 1, "global_batch": 1, "max_tp": 1, "top": 0, "zero_stage": 0,
            "tp": 1, "pp": 1, "micro_batch": 1, "gpu_mem_gib": 1e-9, "overhead_gib": 0.0}


def _get(opts: dict[str, str], key: str, default: Any, kind: Any = int) -> Any:
    """``opts[key]`` converted by ``kind`` (int, float, or list for comma-separated ints) and
    checked against its minimum."""
    if key not in opts:
        return default
    try:
        value = [int(x) for x in opts[key].split(",")] if kind is list else kind(opts[key])
    except ValueError:
        what = {list: "integers separated by commas", int: "an integer"}.get(kind, "a number")
        raise ConfigError(f"{key}={opts[key]!r}: expected {what}") from None
    low = _MINIMUM.get(key)
    values = value if kind is list else [value]
    if low is not None and any(not v >= low for v in values):  # also refuses nan
        bound = "> 0" if low == 1e-9 else f">= {low}"
        raise ConfigError(f"{key}={opts[key]}: must be {bound}")
    if kind is float and value == math.inf:
        raise ConfigError(f"{key}={opts[key]}: must be a finite number of GiB")
    return value


def _check_output(path: str) -> None:
    """``json=PATH`` must be writable where it is named, before the estimates are computed."""
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"json={path}: directory {parent} does not exist")
    if Path(path).expanduser().is_dir():
        raise ConfigError(f"json={path}: a directory; name the file to write, e.g. "
                          f"json={Path(path) / 'plan.jsonl'}")


def _switch(opts: dict[str, str], key: str) -> tuple[bool, ...]:
    value = opts.get(key, "both").lower()
    choices = {"both": (False, True), "on": (True,), "off": (False,)}
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: choose both, on or off")
    return choices[value]


def _recompute(opts: dict[str, str]) -> tuple[str, ...]:
    """``activation_checkpointing=``: the recomputation modes to plan (on = full, off = none;
    ``selective`` = parallel.activation_checkpointing=selective, ``all`` the three, the default:
    the ranking chooses the recomputation too)."""
    value = opts.get("activation_checkpointing", "all").lower()
    choices = {"both": ("none", "full"), "on": ("full",), "off": ("none",), "full": ("full",),
               "none": ("none",), "selective": ("selective",),
               "all": ("none", "selective", "full")}
    if value not in choices:
        raise ConfigError(f"activation_checkpointing={value!r}: choose both, on, off, selective "
                          "or all")
    return choices[value]


def format_table(rows: list[MemoryEstimate], top: int | None = None) -> str:
    """One line per layout, memory in GiB; layouts over capacity are marked NO."""
    head = (f"{'fits':4} {'tp':>3} {'pp':>3} {'dp':>4} {'mb':>3} {'gas':>5} {'ckpt':>4} {'sp':>3} "
            f"{'stage':>5} |" + "".join(f"{name:>8}" for name, _ in _COLUMNS)
            + f" | {'total':>7} {'peak':>4} {'bubble':>6} {'recomp':>6} {'extra':>6}"
            f" {'TP-comm':>8} {'DP-comm':>8} {'PP-comm':>8} {'exposed':>8}")
    lines = [head, "-" * len(head)]
    for r in rows[:top] if top else rows:
        lay = r.layout
        lines.append(
            f"{'yes' if r.fits else 'NO':4} {lay.tp:>3} {lay.pp:>3} {lay.dp:>4} "
            f"{lay.micro_batch:>3} {r.gas:>5} {_CKPT[r.recompute]:>4} "
            f"{'on' if r.sequence_parallel else 'off':>3} {r.stage:>5} |"
            + "".join(f"{getattr(r, field) / GIB:8.2f}" for _, field in _COLUMNS)
            + f" | {r.total / GIB:7.2f} {r.peak_phase:>4} {r.bubble:6.3f} {r.recomputed:6.3f}"
            f" {r.extra_compute:6.3f} {r.tp_comm / GIB:8.1f} {r.dp_comm / GIB:8.1f}"
            f" {r.pp_comm / GIB:8.1f} {r.exposed_comm / GIB:8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``megallama-plan``: print the layout table (and write JSON lines with ``json=PATH``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return 0 if argv else 2
    try:
        opts, overrides = _parse(argv)
        if "model" not in opts or "gpus" not in opts:
            raise ConfigError("model=... and gpus=... are required (e.g. model=llama2_7b gpus=8)")
        cfg = load_model(opts["model"], overrides)
        device, precision = opts.get("device", "cuda"), opts.get("precision", "bf16")
        gpus, capacity = _get(opts, "gpus", 1), _get(opts, "gpu_mem_gib", 80.0, float)
        overhead = _get(opts, "overhead_gib", DEFAULT_OVERHEAD_GIB.get(device, 0.0), float)
        seq_len, batch = _get(opts, "seq_len", cfg.max_seq_len), _get(opts, "global_batch", 1024)
        zero, impl = _optimizer(opts, precision)
        top = _get(opts, "top", 20)
        if impl not in (*OPTIM_IMPLS, "auto"):
            raise ConfigError(f"optim_impl={impl!r}: choose {' or '.join(OPTIM_IMPLS)}")
        if impl == "distributed" and zero not in (0, None):
            raise ConfigError(f"optim_impl=distributed with zero_stage={zero}: the distributed "
                              "optimizer runs with zero_stage=0")
        if "json" in opts:
            _check_output(opts["json"])
        if seq_len > cfg.max_seq_len:
            raise ConfigError(f"seq_len={seq_len} > model.max_seq_len={cfg.max_seq_len}")
        rows = plan(cfg, gpus, seq_len=seq_len, global_batch=batch,
                    tp=_get(opts, "tp", None, list), pp=_get(opts, "pp", None, list),
                    micro_batch=_get(opts, "micro_batch", [1, 2], list),
                    activation_checkpointing=_recompute(opts),
                    sequence_parallel=_switch(opts, "sequence_parallel"),
                    max_tp=_get(opts, "max_tp", 8), precision=precision, zero_stage=zero,
                    overhead_bytes=int(overhead * GIB), device=device,
                    capacity_bytes=int(capacity * GIB),
                    partition_method=opts.get("partition_method", "balanced"), optim_impl=impl,
                    fp8=opts.get("fp8", "none"))
    except ConfigError as exc:
        report_error("megallama-plan", exc)
        return 2
    print(f"{opts['model']}: {cfg.num_parameters() / 1e9:.2f}B parameters (dim {cfg.dim}, "
          f"{cfg.n_layers} layers, {cfg.n_heads} heads / {cfg.n_kv_heads} KV, FFN "
          f"{cfg.ffn_hidden_dim}, vocab {cfg.vocab_size})")
    print(f"{gpus} x {capacity:g} GiB ({device}), seq_len {seq_len}, global batch {batch} "
          f"({batch * seq_len / 1e6:.2f}M tokens), {precision}, "
          f"{'' if opts.get('fp8', 'none') == 'none' else 'fp8 ' + opts['fp8'] + ', '}"
          f"{_optimizer_label(precision, zero, impl)}, overhead "
          f"{overhead:g} GiB: {sum(r.fits for r in rows)} of {len(rows)} layouts fit")
    print("GiB per GPU, worst pipeline stage; total = peak over the step, set by the backward "
          "('bwd') or the optimizer step ('step'); recomp: recomputed / useful FLOPs; extra: "
          "(1 + recomp) / (1 - bubble) - 1; TP-/DP-/PP-comm: GiB sent per GPU per step, exposed: "
          "the part no computation hides")
    print(CRITERION)
    print(format_table(rows, top))
    if top and len(rows) > top:
        print(f"... {len(rows) - top} more (top=0 prints all)")
    if "json" in opts:
        try:
            with open(opts["json"], "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r.to_dict()) + "\n" for r in rows)
        except OSError as exc:
            report_error("megallama-plan", f"json={opts['json']}: {exc.strerror}")
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
