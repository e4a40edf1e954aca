"""The sections of tools/gpu_check.py that time, on one GPU, the code paths CI can only count
(docs/PERFORMANCE.md, "What a GPU run must still time"), and the list of what needs more GPUs:

  recompute  parallel.activation_checkpointing none | selective | full: step time and peak
             max_memory_allocated at Llama-2-7B widths, 8 layers, seq 4096, 2 micro-batches per
             step, with the 7B pretraining preset's optimizer (optim.impl=distributed) and blocks
             (eager: bf16 runs do not compile by default), each beside the planner's peak and
             recomputed FLOPs for the same shape;
  fp8cache   FP8 tensorwise at the same shape with the fused optimizer: eager with the per-step
             weight casts (fp8.weights_fixed), eager without them (bench_gpu's
             ml_fp8_nocache_eager), and compiled (fp8.step_casts): step time, peak, the
             peak's difference against fp8.weight_cache_bytes x layers, and the losses (the
             cache is bit-identical on CPU);
  preset     each planner-chosen preset that one GPU can hold a slice of (tp = pp = 1: the 7B
             pretraining preset, tp 1 x dp 8, no recomputation): its 8-layer slice at dp 1 (the
             recompute section's row of the preset's mode, else a run of its own) against the
             planner for that slice at dp 1 and at the preset's dp, and the whole preset's plan.

:func:`multi_gpu_rows` lists what a GPU run must time that one GPU cannot, in every report
("needs >= N GPUs"), each with the planner's figure where it has one.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

GIB = 2**30
SECTIONS = ("recompute", "fp8cache", "preset")
LAYERS, MICRO_BATCHES = 8, 2  # the bench part's 8 layers (a quarter of the 7B)
MODES = ("none", "selective", "full")
FP8_VARIANTS = ("ml_fp8_eager", "ml_fp8_nocache_eager", "ml_fp8")  # cache on, off, compiled
# (section, variant, bench_gpu argv) -> the benchmark's row; and the argv of one benchmark
Bench = Callable[[str, str, list[str]], dict]
Argv = Callable[..., list[str]]

MULTI_GPU = (
    {"item": "sp_sequence_linears", "gpus": 2,
     "what": "SP column linears (wq/wk/wv, w1/w3) keep their sequence shard and re-gather it in "
             "backward, overlapped (megallama/parallel/sequence_linears.py), against the old "
             "path compiled blocks run (TensorParallel.enter, then each linear): step time with "
             "SP at tp 2 and tp 8 (8 GPUs)"},
    {"item": "partial_grads_once_per_step", "gpus": 2,
     "what": "SP norm and KV-replica gradients summed over TP once per step, one flat "
             "all-reduce per group (megallama/parallel/partial_grads.py), against a sum per "
             "micro-batch: step time at tp 8 + SP (8 GPUs; tp 2 shows the norms' sum)"},
    {"item": "distributed_optimizer_nccl", "gpus": 2,
     "what": "optim.impl=distributed at dp > 1 over NCCL: the in-place reduce-scatter (never run "
             "yet: Gloo stages it) and the deferred parameter all-gather behind the next "
             "forward; how much of each is exposed"},
    {"item": "compiled_tp_blocks_nccl", "gpus": 2,
     "what": "compiled TP blocks over NCCL: whether Inductor overlaps the functional collectives "
             "with the matmuls, and whether it keeps SP's gathered input"},
    {"item": "preset_step_time_vs_runner_up", "gpus": 8,
     "what": "the presets' first choices against their runners-up: llama2_7b_pretrain tp 1 x "
             "dp 8 vs tp 2 x dp 4 + SP (8 GPUs); llama2_70b_pretrain tp 8 x dp 8 + SP vs "
             "tp 8 x pp 2 x dp 4 + SP (64 GPUs)"},
)


def recompute_section(bench: Bench, argv: Argv, rows: list[dict], smoke: bool) -> list[dict]:
    """The three recomputation modes, then each mode's step time and peak over ``none``'s beside
    the planner's (1 + recomputed FLOPs, and its peaks' ratio)."""
    variant = _preset_variant()
    out = [bench("recompute", variant, argv(MICRO_BATCHES, layers=LAYERS, ckpt=mode, eager=True))
           for mode in MODES]
    base = out[0]
    for row in out[1:]:
        mode = row.get("activation_checkpointing")
        out.append(_ratio(f"{mode} / none step time", row, base, "step_ms_median",
                          planner=1 + row["planner_recomputed"]
                          if "planner_recomputed" in row else None))
        out.append(_ratio(f"{mode} / none peak", row, base, "peak_mem_gib",
                          planner=_div(row.get("planner_peak_gib"),
                                       base.get("planner_peak_gib"))))
    return out


def fp8cache_section(bench: Bench, argv: Argv, rows: list[dict], smoke: bool) -> list[dict]:
    """FP8 eager with and without the per-step weight casts, and compiled: time, peak, the
    cache's bytes against the planner's (fp8.weight_cache_bytes x layers) and the losses."""
    out = [bench("fp8cache", v, argv(MICRO_BATCHES, layers=LAYERS)) for v in FP8_VARIANTS]
    cache, nocache, compiled = out
    out.append(_ratio("fp8 no cache / cache step time", nocache, cache, "step_ms_median"))
    out.append(_ratio("fp8 compiled / eager cache step time", compiled, cache, "step_ms_median"))
    out.append(_ratio("fp8 compiled / eager cache peak", compiled, cache, "peak_mem_gib"))
    held = _sub(cache.get("peak_mem_gib"), nocache.get("peak_mem_gib"))
    out.append({"kind": "comparison", "section": "fp8cache", "comparison":
                "fp8 cache peak - no cache peak (GiB)", "micro_batches": MICRO_BATCHES,
                "value": held, "planner": cache.get("planner_weight_cache_gib"),
                "target": None, "met": None,
                "loss_max_abs_diff": _loss_diff(cache, nocache)})
    return out


def preset_section(bench: Bench, argv: Argv, rows: list[dict], smoke: bool) -> list[dict]:
    """Each preset with tp = pp = 1: its slice's peak at dp 1 beside the planner's slice at dp 1
    and at the preset's dp, and the whole preset's plan (presets at tp or pp > 1 are listed by
    :func:`multi_gpu_rows`)."""
    plans = _plans()
    out = []
    for name in plans.PRESET_GPUS:
        s = plans.preset_settings(name)
        if s["layout"].tp * s["layout"].pp > 1:
            continue
        if s["variant"] is None or s["layout"].micro_batch != 1:
            raise ValueError(f"{name}: optim.impl={s['optim_impl']}, micro_batch_size "
                             f"{s['layout'].micro_batch}: this section runs only "
                             f"{sorted(plans.SLICE_VARIANT)} with micro-batches of one sequence")
        row = next((r for r in rows if r.get("section") == "recompute"
                    and r.get("variant") == s["variant"]
                    and r.get("activation_checkpointing") == s["activation_checkpointing"]
                    and "tokens_per_s" in r), None)
        if row is None:
            row = bench("preset", s["variant"], argv(
                MICRO_BATCHES, layers=LAYERS, ckpt=s["activation_checkpointing"], eager=True))
        keep = ("variant", "micro_batches", "layers", "seq", "vocab", "activation_checkpointing",
                "tokens_per_s", "step_ms_median", "peak_mem_gib", "error", "not_run")
        out.append({"kind": "preset", "preset": name, **{k: row[k] for k in keep if k in row},
                    "measured_in": row.get("section"),
                    **(plans.preset_slice(s, row, smoke) if "tokens_per_s" in row else {})})
    return out


def multi_gpu_rows() -> list[dict]:
    """What a GPU run must time that one GPU cannot: MULTI_GPU, and every preset at tp or pp > 1
    with the planner's per-GPU figure for it (its peak on its own GPUs is what is to be seen)."""
    out = [{"kind": "needs_gpus", **item} for item in MULTI_GPU]
    plans = _plans()
    for name in plans.PRESET_GPUS:
        try:
            s = plans.preset_settings(name)
            lay = s["layout"]
            if lay.tp * lay.pp == 1:
                continue
            out.append({"kind": "needs_gpus", "item": f"{name}_peak_memory",
                        "gpus": lay.tp * lay.pp,
                        "what": f"{name}'s peak per GPU (tp {lay.tp}, pp {lay.pp}, dp {lay.dp}"
                                f"{' + SP' if s['sequence_parallel'] else ''}, "
                                f"{s['activation_checkpointing']}) against the planner",
                        "planner_full_preset_gib": plans.preset_plan(s).total / GIB})
        except Exception as exc:  # noqa: BLE001 -- the list must come out whatever the planner
            out.append({"kind": "needs_gpus", "item": f"{name}_peak_memory", "gpus": None,
                        "what": f"{name}'s peak per GPU", "error": _error(exc)["error"]})
    return out


def run_section(name: str, bench: Bench, argv: Argv, rows: list[dict],
                smoke: bool) -> list[dict]:
    """One of SECTIONS by name."""
    fn = {"recompute": recompute_section, "fp8cache": fp8cache_section,
          "preset": preset_section}[name]
    return fn(bench, argv, rows, smoke)


def section_error(name: str, exc: BaseException) -> dict:
    """The row a section that raised leaves in the report (the run goes on)."""
    return {"kind": "section_error", "section": name, **_error(exc)}


# ---- helpers ---------------------------------------------------------------------------------
def _plans():
    import gpu_check_plan  # tools/ is on sys.path: gpu_check.tool() put it there

    return gpu_check_plan


def _preset_variant() -> str:
    """The bench variant of the 7B pretraining preset's slice (its optimizer at dp 8)."""
    return _plans().preset_settings("llama2_7b_pretrain")["variant"] or "ml_fused_eager"


def _div(a: Any, b: Any) -> float | None:
    return a / b if a is not None and b else None


def _sub(a: Any, b: Any) -> float | None:
    return a - b if a is not None and b is not None else None


def _loss_diff(a: dict, b: dict) -> float | None:
    if "losses" not in a or "losses" not in b:
        return None
    return max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=False))


def _ratio(name: str, num: dict, den: dict, key: str, planner: float | None = None) -> dict:
    """``num[key] / den[key]`` (None where a side has no figure: errors, a CPU's peak) beside
    the planner's ratio; no target is set, nothing is judged."""
    return {"kind": "comparison", "section": num.get("section"), "comparison": name,
            "micro_batches": num.get("micro_batches"),
            "ratio": _div(num.get(key), den.get(key)), "planner": planner, "target": None,
            "met": None, "loss_max_abs_diff": _loss_diff(num, den)}


def _error(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}"[:500],
            "traceback": traceback.format_exc().strip().splitlines()[-6:]}
