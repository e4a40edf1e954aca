"""tools/gpu_check.py's tables: the checks, one speed table per part (each megallama row's peak
beside the planner's), the presets' slices, what needs more GPUs, parts that failed, and the
comparisons. Printed, and appended to the report's .md beside its JSON lines."""

from __future__ import annotations

import textwrap
from typing import Any


def _num(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _worst(r: dict) -> str:
    """A check's largest error field, or why it did not pass."""
    if r.get("skipped") or r.get("error"):
        return r.get("skipped") or r["error"]
    errs = {k: v for k, v in r.items() if isinstance(v, float) and ("err" in k or "diff" in k)
            and not k.startswith(("sdpa_", "causal_only"))}
    if not errs:
        return ""
    key = max(errs, key=errs.get)
    return f"worst {key} {errs[key]:.2e}"


SPEED_TABLES = {  # section -> title (on a CPU, --smoke: tiny shapes whatever the title says)
    "bench": "speed and memory, 7B widths, 8 layers",
    "recompute": "activation_checkpointing modes, 7B widths, 8 layers, 2 micro-batches, eager",
    "fp8cache": "FP8 tensorwise: per-step weight casts, none, compiled; 8 layers, 2 micro-batches",
    "preset": "the 7B preset's slice, 8 layers",
    "h200": "the full model"}


def speed_lines(rows: list[dict]) -> list[str]:
    """One table of benchmark rows (tokens/s, step time, peak beside the planner's)."""
    lines = [f"{'variant':<20} {'mb':>2} {'packing':<9} {'ckpt':<9} {'tokens/s':>9} {'MFU':>6} "
             f"{'step ms':>8} {'peak GiB':>8} {'planner':>8} {'ratio':>6}"]
    for r in rows:
        head = (f"{r['variant']:<20} {r.get('micro_batches', '-'):>2} "
                f"{r.get('packing', '-'):<9} {str(r.get('activation_checkpointing', '-')):<9}")
        if "tokens_per_s" not in r:
            why = r.get("not_run") or ("OOM " if r.get("oom") else "ERROR ") + r.get("error", "")
            lines.append(f"{head} {why}")
            continue
        lines.append(f"{head} {r['tokens_per_s']:>9.0f} {r['mfu']:>6.3f} "
                     f"{r['step_ms_median']:>8.1f} {_num(r.get('peak_mem_gib'), '8.2f')} "
                     f"{_num(r.get('planner_peak_gib'), '8.2f')} "
                     f"{_num(r.get('peak_over_planner'), '6.2f')}"
                     + (f"  ({r['layers']} layers)" if r["kind"] == "full_model" else ""))
    return lines


def tables(rows: list[dict], card: str) -> str:
    """The report's tables: checks, one speed table per part, presets, what needs more GPUs,
    failed parts, comparisons."""
    lines = [f"== correctness ({card}) =="]
    for r in (r for r in rows if r["kind"] == "check"):
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[r["ok"]]
        lines.append(f"{r['check']:<18} {status:<5} {r['seconds']:>7.1f} s  {_worst(r)}")
    for section, title in SPEED_TABLES.items():
        mine = [r for r in rows if r["kind"] in ("bench", "full_model")
                and r.get("section", "bench") == section]
        if mine:
            shapes = ", tiny shapes: --smoke" if card == "cpu" else ""
            lines += [f"== {title} ({card}{shapes}) ==", *speed_lines(mine)]
    lines += preset_lines(rows)
    lines.append("== comparisons (planner: its figure for the same ratio; met: - on a CPU, "
                 "with a side missing or no target) ==")
    for r in (r for r in rows if r["kind"] == "comparison"):
        value = r.get("tokens_per_s_ratio", r.get("ratio", r.get("value")))
        lines.append(f"{r['comparison']:<46} mb {_num(r['micro_batches'], '>2')} "
                     f"{_num(value, '7.3f')} planner {_num(r.get('planner'), '7.3f')} "
                     f"target {r['target'] if r['target'] is not None else '-'}  met "
                     f"{'-' if r['met'] is None else r['met']}"
                     + (f"  max |dloss| {r['loss_max_abs_diff']:.2e}"
                        if r.get("loss_max_abs_diff") is not None else ""))
    return "\n".join(lines)


def preset_lines(rows: list[dict]) -> list[str]:
    """The preset rows and the needs-more-GPUs list, for gpu_check's stdout."""
    lines = ["== presets: a few-layer slice on one GPU against the planner (GiB) =="]
    for r in (r for r in rows if r["kind"] == "preset"):
        if "tokens_per_s" not in r:
            lines.append(f"{r['preset']}: " + (r.get("not_run") or f"ERROR {r.get('error')}"))
            continue
        lines += textwrap.wrap(
            f"{r['preset']} ({r['optim_impl']}, {r['activation_checkpointing']}): slice peak "
            f"{_num(r.get('peak_mem_gib'), '.2f')} at dp 1, planner "
            f"{r['planner_slice_dp1_gib']:.2f} "
            f"(ratio {_num(r.get('peak_over_planner'), '.3f')}); at dp {r['dp']}: planner "
            f"{r['planner_slice_dp_gib']:.2f}, measured less the sharded state "
            f"{_num(r.get('peak_at_dp_gib'), '.2f')}; whole preset planned "
            f"{r['planner_full_preset_gib']:.2f} (with the fixed overhead)", 100,
            subsequent_indent="    ")
    lines.append("== not measured here: needs more GPUs ==")
    for r in (r for r in rows if r["kind"] == "needs_gpus"):
        plan = r.get("planner_full_preset_gib")
        lines += textwrap.wrap(f"needs >= {r['gpus']} GPUs: {r['item']}: {r['what']}"
                               + (f" (planner {plan:.2f} GiB)" if plan else ""), 100,
                               subsequent_indent="    ")
    for r in (r for r in rows if r["kind"] == "section_error"):
        lines.append(f"SECTION ERROR {r['section']}: {r['error']}")
    return lines
