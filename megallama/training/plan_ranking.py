"""How the layout planner ranks the layouts that fit: first by the compute time a layout adds to
an ideal step (recomputed FLOPs and the pipeline bubble), then by the communication bytes it
cannot hide (exposed), then by its peak memory, then by the layout itself.

Only quantities the planner computes exactly from the model and the schedule enter the key; no
FLOP rate, link bandwidth or tokens/s is assumed. docs/PLANNER.md ("Ranking") says why the order
is compute first, bytes second, and what the criterion does not see.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from megallama.config import ModelConfig
from megallama.model import layout as model_layout
from megallama.optim.grad_buckets import plan_buckets
from megallama.training.metrics import flops_per_token
from megallama.training.state_bytes import DIST_BUCKET

RECOMPUTE_ORDER = {"none": 0, "selective": 1, "full": 2}  # ties: the less recomputation first


def block_forward_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of one transformer block, counted as
    :func:`megallama.training.metrics.flops_per_token` counts them (weight matmuls 2 per weight,
    attention scores and values ``4 h s`` without a causal discount; norms, RoPE and the SwiGLU
    product are element-wise and not counted)."""
    h, hd = cfg.dim, cfg.head_dim
    weights = 2 * h * cfg.n_heads * hd + 2 * h * cfg.n_kv_heads * hd + 3 * h * cfg.ffn_hidden_dim
    return 2 * weights + attention_core_flops(cfg, seq_len)


def attention_core_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of one block's attention core (``q k^T`` and ``p v``):
    ``4 a hd s``, what selective recomputation runs again."""
    return 4 * cfg.n_heads * cfg.head_dim * seq_len


def recomputed_fraction(cfg: ModelConfig, seq_len: int, mode: str) -> float:
    """Recomputed FLOPs of a step over its useful FLOPs (:func:`flops_per_token`): ``full``
    re-runs every block's forward, ``selective`` every block's attention core (the RMSNorms and
    the SwiGLU product it also re-runs are element-wise), ``none`` nothing."""
    per_block = {"none": 0, "selective": attention_core_flops(cfg, seq_len),
                 "full": block_forward_flops(cfg, seq_len)}[mode]
    return cfg.n_layers * per_block / flops_per_token(cfg, seq_len)


def extra_compute(recomputed: float, bubble: float) -> float:
    """Step time over the time of its useful FLOPs, minus 1, at one FLOP rate for every layout:
    each micro-batch takes ``1 + recomputed`` and 1F1B runs ``m + p - 1`` micro-batch slots for
    ``m`` micro-batches, i.e. ``(1 + recomputed) / (1 - bubble) - 1``."""
    return (1.0 + recomputed) / (1.0 - bubble) - 1.0


def tp_comm_bytes(*, gas: int, blocks: int, ends: int, full: bool, sp: bool, tokens: int,
                  h: int, tp: int, element: int, regather_element: int,
                  gather_element: int) -> tuple[int, int]:
    """(sent, exposed) TP bytes per step of a stage: ring collectives of a ``[tokens, h]``
    activation, in units of ``(t - 1)/t`` of it (an all-reduce 2, an all-gather or
    reduce-scatter 1). Per block and micro-batch: 2 all-reduces forward, 2 backward (under SP
    the same volume as all-gathers + reduce-scatters), +4 units when full recomputation re-runs
    the forward (selective regions have no collectives); 2 for the embedding and 2 for the head
    (``ends`` of them on the stage). Under SP the column linears' backward also re-gathers their
    saved sequence shard (+2 gathers per block, of ``regather_element`` bytes), behind the
    grad-input gemms, and reduce-scatters the input gradient behind the grad-weight gemms
    (:mod:`megallama.parallel.sequence_linears`): those 4 units are sent but not exposed. The
    column groups' forward all-gathers under SP (2 per block, 2 more under full recomputation)
    move ``gather_element`` bytes per element (FP8 tensorwise: 1, the fp8 cast of the shard).
    Everything else blocks the compute stream."""
    if tp == 1:
        return 0, 0
    units = (8 + 4 * full) * blocks + 2 * ends
    unit = element * tokens * h * (tp - 1) // tp
    gathers = (2 + 2 * full) * blocks if sp else 0  # the column groups' forward all-gathers
    blocking = (units - gathers) * unit + gathers * gather_element * tokens * h * (tp - 1) // tp
    regather = 2 * blocks * regather_element * tokens * h * (tp - 1) // tp if sp else 0
    hidden = 2 * blocks * unit if sp else 0  # the column groups' input-gradient reduce-scatters
    return gas * (blocking + regather), gas * (blocking - hidden)


def first_bucket_elements(cfg: ModelConfig, tp: int, stage_layers: list[str],
                          bucket_bytes: int = DIST_BUCKET) -> int:
    """Elements of the distributed optimizer's bucket that holds the stage's first parameters:
    buckets are cut over the parameters in reverse (the order backward produces them,
    :meth:`megallama.optim.distributed_adamw.DistributedAdamW._make_buckets`; fp32 gradients), so
    this bucket is the last to complete in backward and the first waited for in the next
    forward."""
    sizes: dict[str, list[int]] = {}  # local numels per layer kind, in registration order
    for spec in model_layout.shard_specs(dataclasses.replace(cfg, n_layers=1), tp):
        kind = model_layout.layer_of(spec.name)
        key = "block" if model_layout.is_block(kind) else kind
        sizes.setdefault(key, []).append(math.prod(spec.local_shape()))
    numels = [n for name in stage_layers
              for n in sizes.get("block" if model_layout.is_block(name) else name, [])]
    order = list(reversed(numels))
    last = plan_buckets(order, max(1, bucket_bytes // 4))[-1]
    return sum(order[i] for i in last)


def exposed_dp_bytes(dp_comm: int, *, impl: str, zero_stage: int, first_bucket: int, dp: int,
                     element: int) -> int:
    """DP bytes a rank sends per step that no computation hides: the distributed optimizer
    starts each bucket's reduce-scatter in backward and waits for each all-gather in the next
    forward, so only the bucket of the stage's first parameters (reduce-scattered after the last
    gradient, gathered before the first layer) is exposed: ``(4 + e) B1 (d - 1) / d``. The fused
    optimizer all-reduces in the step and DeepSpeed after backward: all of ``dp_comm``."""
    if zero_stage == 0 and impl == "distributed":
        return (4 + element) * first_bucket * (dp - 1) // dp
    return dp_comm


def rank_key(est: Any) -> tuple:
    """Sort key of a :class:`megallama.training.planner.MemoryEstimate`: does not fit, extra
    compute, exposed communication bytes, peak bytes, then (tp, pp, micro-batch, recomputation,
    no SP first) so that equal figures still give one order."""
    lay = est.layout
    return (not est.fits, est.extra_compute, est.exposed_comm, est.total, lay.tp, lay.pp,
            lay.micro_batch, RECOMPUTE_ORDER[est.recompute], not est.sequence_parallel)


CRITERION = ("ranked by: 1. extra compute time (recomputed FLOPs + pipeline bubble, "
             "(1 + r)/(1 - bubble) - 1), 2. exposed communication bytes (TP + PP + DP not "
             "overlapped), 3. peak memory, 4. smaller tp, pp, micro-batch (docs/PLANNER.md, "
             "'Ranking')")

