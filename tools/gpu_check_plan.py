"""The planner's figures beside tools/gpu_check.py's measurements: the peak memory
megallama.training.planner predicts for a benchmark's shape (what ``megallama-plan`` prints, less its
fixed CUDA overhead, which ``torch.cuda.max_memory_allocated`` does not see), its first choice
for the full model on one card (fits or not, with which recomputation), and the planner-chosen
presets' figures beside a one-GPU run of a few-layer slice of them.

The planner is extended beside this tool: options this planner does not take are dropped and
named (``planner_ignores``) rather than failing the run.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

GIB = 2**30
REPO = Path(__file__).resolve().parents[1]
FP8 = {"ml_fp8": "tensorwise", "ml_fp8_rowwise": "rowwise", "ml_fp8_eager": "tensorwise",
       "ml_fp8_nocache_eager": "tensorwise"}


# ---- the planner -----------------------------------------------------------------------------
def _planner_kwargs(variant: str, **kwargs: Any) -> tuple[dict, list[str]]:
    """The planner's arguments for ``variant``, less any this planner does not take (feature
    detection: the planner is being extended beside this tool); returns (kwargs, dropped)."""
    from megallama.training import planner

    optim = "distributed" if variant == "ml_distributed" else "fused"
    kwargs.update(precision="bf16", zero_stage=0, optim_impl=optim,
                  fp8=FP8.get(variant, "none"), device="cuda")
    known = inspect.signature(planner.estimate_stages).parameters
    dropped = [k for k in kwargs if k not in known]
    return {k: v for k, v in kwargs.items() if k in known}, dropped


def model_config(smoke: bool, layers: int, seq: int, vocab: int):
    """The model tools/bench_gpu.py builds for these shapes."""
    from megallama.config import preset

    return preset("tiny" if smoke else "llama2_7b", vocab_size=vocab, n_layers=layers,
                  max_seq_len=seq)


def terms_gib(est) -> dict[str, float]:
    return {k: round(getattr(est, k) / GIB, 3) for k in (
        "weights", "gradients", "master", "optimizer", "activations", "logits", "step",
        "overhead", "total")}


def planner_peak(variant: str, row: dict, smoke: bool) -> dict:
    """The planner's peak for a benchmark row's shape at tp = pp = dp = 1, without the fixed
    overhead, next to the measured max_memory_allocated."""
    from megallama.training import planner

    cfg = model_config(smoke, row["layers"], row["seq"], row["vocab"])
    kwargs, dropped = _planner_kwargs(variant, seq_len=row["seq"], overhead_bytes=0,
                                      global_batch=row["micro_batches"],
                                      activation_checkpointing=row["activation_checkpointing"])
    est = planner.estimate(cfg, planner.Layout(1, 1, 1, 1), **kwargs)
    out = {"planner_peak_gib": est.total / GIB, "planner_gib": terms_gib(est),
           "planner_recomputed": est.recomputed}
    if variant in FP8:  # in the total: the per-step casts eager blocks keep (compiled: none)
        from megallama.parallel import fp8

        out["planner_weight_cache_gib"] = row["layers"] * fp8.weight_cache_bytes(
            cfg, tp=1, recipe=FP8[variant]) / GIB
    if dropped:
        out["planner_ignores"] = dropped
    if row.get("peak_mem_gib"):
        out["peak_over_planner"] = row["peak_mem_gib"] / out["planner_peak_gib"]
    return out


def full_model_plan(cfg, variant: str, seq: int, micro_batches: int, capacity_gib: float) -> dict:
    """The planner's first choice (checkpointing or not) for ``cfg`` on one GPU of
    ``capacity_gib``, with its default CUDA overhead: what megallama-plan would print."""
    from megallama.training import planner

    kwargs, dropped = _planner_kwargs(variant, capacity_bytes=int(capacity_gib * GIB))
    rows = planner.plan(cfg, 1, seq_len=seq, global_batch=micro_batches, tp=[1], pp=[1],
                        micro_batch=[1], sequence_parallel=(False,), **kwargs)
    pick = rows[0]
    out = {"variant": variant, "fits": pick.fits, "capacity_gib": capacity_gib,
           "activation_checkpointing": pick.recompute,
           "planner_gib": terms_gib(pick), "micro_batches": micro_batches,
           "layers": cfg.n_layers}
    if dropped:
        out["planner_ignores"] = dropped
    if not pick.fits:
        t = out["planner_gib"]
        out["not_run"] = (f"does not fit: the planner needs {t['total']:.1f} GiB at best "
                          f"(checkpointing {pick.recompute}: "
                          f"weights {t['weights']:.1f}, gradients {t['gradients']:.1f}, master "
                          f"{t['master']:.1f}, Adam {t['optimizer']:.1f}, activations "
                          f"{t['activations']:.1f}, overhead {t['overhead']:.1f}) > "
                          f"{capacity_gib:.1f} GiB")
    return out


# ---- the planner-chosen presets ----------------------------------------------------------------
PRESET_GPUS = {"llama2_7b_pretrain": 8, "llama2_70b_pretrain": 64}  # as their comments plan them
SLICE_VARIANT = {"distributed": "ml_distributed", "fused": "ml_fused_eager"}


def preset_settings(name: str) -> dict:
    """What conf/experiment/<name>.yaml sets (model, tp, pp, SP, micro-batch, global batch,
    recomputation, seq_len), its dp on the GPUs its comment plans for, the optimizer
    optim.impl=auto resolves to there, and the tools/bench_gpu.py variant that runs its slice
    on one GPU (bf16 presets run eager: compile_blocks=null is off without FP8)."""
    import yaml

    from megallama.config.train_config import checkpointing_mode
    from megallama.training import planner

    doc = yaml.safe_load((REPO / "conf" / "experiment" / f"{name}.yaml").read_text())
    model = next(d["override /model"] for d in doc["defaults"]
                 if isinstance(d, dict) and "override /model" in d)
    par, gpus = doc["parallel"], PRESET_GPUS[name]
    layout = planner.Layout(par["tp"], par["pp"], gpus // (par["tp"] * par["pp"]),
                            par["micro_batch_size"])
    _, optim = planner.resolved_optimizer(doc["trainer"]["precision"], par.get("zero_stage"),
                                          doc.get("optim", {}).get("impl", "auto"), layout)
    return {"preset": name, "model": model, "gpus": gpus, "layout": layout,
            "sequence_parallel": bool(par["sequence_parallel"]), "optim_impl": optim,
            "global_batch": par["global_batch_size"], "seq": doc["data"]["seq_len"],
            "activation_checkpointing": checkpointing_mode(par["activation_checkpointing"]),
            "variant": SLICE_VARIANT.get(optim)}


def preset_plan(settings: dict, cfg=None, seq: int | None = None, dp: int | None = None,
                global_batch: int | None = None, overhead: bool = True):
    """The planner's estimate of a preset: its whole model, or ``cfg`` (a slice of it) at
    ``seq``; ``dp`` and ``global_batch`` another data-parallel size; with the planner's fixed
    CUDA overhead unless ``overhead`` is False."""
    from megallama.config import preset
    from megallama.training import planner

    lay = settings["layout"]
    return planner.estimate(
        cfg or preset(settings["model"]),
        planner.Layout(lay.tp, lay.pp, dp or lay.dp, lay.micro_batch),
        seq_len=seq or settings["seq"], global_batch=global_batch or settings["global_batch"],
        precision="bf16", zero_stage=0, optim_impl=settings["optim_impl"],
        activation_checkpointing=settings["activation_checkpointing"],
        sequence_parallel=settings["sequence_parallel"], device="cuda",
        **({} if overhead else {"overhead_bytes": 0}))


def preset_slice(settings: dict, row: dict, smoke: bool) -> dict:
    """The planner beside a one-GPU run (``row``: dp 1, ``row['micro_batches']`` per step) of a
    preset's few-layer slice: the slice at dp 1 (what ran), the slice at the preset's dp (what
    one of its GPUs holds: they differ only by the sharded master and Adam state, 10 (1 - 1/dp)
    bytes per parameter, counted from the tensors on CPU), the measured peak less that
    difference, and the whole preset (megallama-plan's figure, with its fixed overhead)."""
    from megallama.config import preset

    mb, dp, seq = row["micro_batches"], settings["layout"].dp, row["seq"]
    cfg = preset("tiny" if smoke else settings["model"], vocab_size=row["vocab"],
                 n_layers=row["layers"], max_seq_len=seq)  # what tools/bench_gpu.py built
    one = preset_plan(settings, cfg, seq, dp=1, global_batch=mb, overhead=False)
    many = preset_plan(settings, cfg, seq, dp=dp, global_batch=mb * dp, overhead=False)
    out = {"preset": settings["preset"], "gpus": settings["gpus"], "dp": dp,
           "optim_impl": settings["optim_impl"],
           "planner_full_preset_gib": preset_plan(settings).total / GIB,
           "planner_slice_dp1_gib": one.total / GIB, "planner_slice_dp_gib": many.total / GIB,
           "sharding_gib": (one.total - many.total) / GIB}
    if row.get("peak_mem_gib"):
        out["peak_over_planner"] = row["peak_mem_gib"] / out["planner_slice_dp1_gib"]
        out["peak_at_dp_gib"] = row["peak_mem_gib"] - out["sharding_gib"]
    return out
