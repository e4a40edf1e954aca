"""The planner's figures beside tools/gpu_check.py's measurements: the peak memory
megallama.training.planner predicts for a benchmark's shape (what ``megallama-plan`` prints, less its
fixed CUDA overhead, which ``torch.cuda.max_memory_allocated`` does not see), and its first choice
for the full model on one card (fits or not, with activation checkpointing or not).

The planner is extended beside this tool: options this planner does not take are dropped and
named (``planner_ignores``) rather than failing the run.
"""

from __future__ import annotations

import inspect
from typing import Any

GIB = 2**30
OPTIM = {"ml_fused": "fused", "ml_distributed": "distributed", "ml_fp8": "fused",
         "ml_fp8_rowwise": "fused"}
FP8 = {"ml_fp8": "tensorwise", "ml_fp8_rowwise": "rowwise"}


# ---- the planner -----------------------------------------------------------------------------
def _planner_kwargs(variant: str, **kwargs: Any) -> tuple[dict, list[str]]:
    """The planner's arguments for ``variant``, less any this planner does not take (feature
    detection: the planner is being extended beside this tool); returns (kwargs, dropped)."""
    from megallama.training import planner

    kwargs.update(precision="bf16", zero_stage=0, optim_impl=OPTIM[variant],
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
    out = {"planner_peak_gib": est.total / GIB, "planner_gib": terms_gib(est)}
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
           "activation_checkpointing": pick.activation_checkpointing,
           "planner_gib": terms_gib(pick), "micro_batches": micro_batches,
           "layers": cfg.n_layers}
    if dropped:
        out["planner_ignores"] = dropped
    if not pick.fits:
        t = out["planner_gib"]
        out["not_run"] = (f"does not fit: the planner needs {t['total']:.1f} GiB at best "
                          f"(checkpointing {'on' if pick.activation_checkpointing else 'off'}: "
                          f"weights {t['weights']:.1f}, gradients {t['gradients']:.1f}, master "
                          f"{t['master']:.1f}, Adam {t['optimizer']:.1f}, activations "
                          f"{t['activations']:.1f}, overhead {t['overhead']:.1f}) > "
                          f"{capacity_gib:.1f} GiB")
    return out
