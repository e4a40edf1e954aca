"""Tensor-parallel building blocks: column/row-parallel linear and vocab-parallel embedding.

The linear layers are local matmuls on shards; entering and leaving the parallel region (the
collectives) is done once per sub-layer by :meth:`TensorParallel.enter` / :meth:`TensorParallel.exit`,
so attention's three input projections share one all-gather under sequence parallelism.

Sharded parameters carry ``tensor_model_parallel = model_parallel = True`` (the attributes
DeepSpeed's gradient-norm code reads); replicated ones carry neither, so DeepSpeed counts them once.
The linears' matmul can be swapped for an FP8 one (``fp8_matmul``, set by
:func:`megallama.parallel.fp8.convert_to_float8`) without touching their parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megallama.parallel import mappings, partial_grads
from megallama.parallel.init import full_normal, shard
from megallama.parallel.mappings import Group


@dataclass(frozen=True)
class TensorParallel:
    """How this rank takes part in tensor parallelism.

    ``kv_group`` holds the TP ranks that share one KV head when tp > n_kv_heads (None otherwise).
    """

    group: Group = None
    sequence_parallel: bool = False
    kv_group: Group = None

    @property
    def size(self) -> int:
        return mappings.group_size(self.group)

    @property
    def rank(self) -> int:
        return mappings.group_rank(self.group)

    @property
    def kv_replicas(self) -> int:
        return mappings.group_size(self.kv_group)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Make the full input available to column-parallel matmuls (under SP the blocks' column
        linears gather through :func:`megallama.parallel.sequence_linears.gathered_linears`
        instead, which keeps only the shard for backward; this path keeps the gathered input)."""
        if self.sequence_parallel:
            return mappings.gather_from_sequence(x, self.group)
        return mappings.copy_to_tp(x, self.group)

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        """Combine the partial outputs of row-parallel matmuls."""
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence(x, self.group)
        return mappings.reduce_from_tp(x, self.group)


def mark_tensor_parallel(param: nn.Parameter, dim: int, tp_size: int, replicas: int = 1,
                         rank: int = 0) -> None:
    """Tag a split parameter: ``partition_dim`` and ``tp_replicas`` tell checkpoint writers how to
    reassemble it; ``tensor_model_parallel``/``model_parallel`` (read by DeepSpeed's gradient norm)
    are set on one replica of each slice only, so every element is counted exactly once."""
    unique = tp_size > 1 and rank % replicas == 0
    param.tensor_model_parallel = unique
    param.model_parallel = unique
    param.partition_dim = dim
    param.tp_replicas = replicas


def full_tensor(t: torch.Tensor, param: nn.Parameter, tp: TensorParallel) -> torch.Tensor:
    """Reassemble the full (padded) tensor of a parameter (or of its gradient) from all TP ranks.

    Reads only the parameter's own tags: slice i of ``tp / tp_replicas`` lives on the TP ranks from
    ``i * tp_replicas`` (``megallama.model.layout.ShardSpec`` states the rule; parallel cannot
    import model), so every ``tp_replicas``-th gathered chunk is a distinct slice."""
    dim = getattr(param, "partition_dim", None)
    if dim is None or tp.size == 1:
        return t
    full = mappings.all_gather_tensor(t, dim, tp.group)
    replicas = getattr(param, "tp_replicas", 1)
    if replicas > 1:
        full = torch.cat(full.chunk(tp.size, dim=dim)[::replicas], dim=dim)
    return full


# (x, weight, the layer's per-step weight casts or None) -> x @ weight.T
Matmul = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _linear(x: torch.Tensor, weight: torch.Tensor, fp8_matmul: Matmul | None,
            casts: nn.Module | None) -> torch.Tensor:
    """``x @ weight.T``: in bf16/fp32, or through the FP8 matmul :mod:`megallama.parallel.fp8`
    gave the layer (``trainer.fp8``), with the step's weight casts ``casts`` when made."""
    return F.linear(x, weight) if fp8_matmul is None else fp8_matmul(x, weight, casts)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split along its output rows; the output stays split (no gather).

    ``replicas`` > 1 means several consecutive TP ranks hold the same slice (KV heads when
    tp > n_kv_heads): their gradients are summed over ``replica_group`` (once per step by the
    optimizer, :mod:`megallama.parallel.partial_grads`) and only the first replica is marked
    model-parallel so the gradient norm counts the slice once.
    """

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, *, seed: int,
                 key: str, std: float, replicas: int = 1, replica_group: Group = None,
                 pad_rows_to: int | None = None) -> None:
        super().__init__()
        parts = tp.size // replicas
        rows = pad_rows_to or out_features
        if rows % parts:
            raise ValueError(f"{key}: {rows} output features not divisible by {parts} TP partitions")
        full = full_normal((out_features, in_features), std, seed, key)
        if rows > out_features:  # padded vocabulary rows start (and stay) at zero
            full = torch.cat([full, full.new_zeros(rows - out_features, in_features)])
        self.weight = nn.Parameter(shard(full, 0, tp.rank // replicas, parts))
        self.replica_group = replica_group if replicas > 1 else None
        partial_grads.mark(self.weight, self.replica_group)
        mark_tensor_parallel(self.weight, 0, tp.size, replicas, tp.rank)
        self.fp8_matmul: Matmul | None = None  # set by megallama.parallel.fp8.convert_to_float8
        self.fp8_casts: nn.Module | None = None  # its per-step weight casts (idem)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.matmul_weight(), self.fp8_matmul, self.fp8_casts)

    def matmul_weight(self) -> torch.Tensor:
        """The weight as the matmul uses it (KV replicas: gradient summed over the replicas);
        also called by :func:`megallama.parallel.sequence_linears.gathered_linears`."""
        return partial_grads.use(self.weight)


class RowParallelLinear(nn.Module):
    """Partial y = x_i W_i^T with W split along its input columns; the caller sums over ranks."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, *, seed: int,
                 key: str, std: float) -> None:
        super().__init__()
        if in_features % tp.size:
            raise ValueError(f"{key}: {in_features} input features not divisible by tp={tp.size}")
        full = full_normal((out_features, in_features), std, seed, key)
        self.weight = nn.Parameter(shard(full, 1, tp.rank, tp.size))
        mark_tensor_parallel(self.weight, 1, tp.size)
        self.fp8_matmul: Matmul | None = None  # set by megallama.parallel.fp8.convert_to_float8
        self.fp8_casts: nn.Module | None = None  # its per-step weight casts (idem)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight, self.fp8_matmul, self.fp8_casts)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the (padded) vocabulary; each rank looks up the ids it owns and
    the partial rows are summed (or reduce-scattered along the sequence under SP)."""

    def __init__(self, vocab_size: int, padded_vocab: int, dim: int, tp: TensorParallel, *,
                 seed: int, key: str, std: float, padding_idx: int | None = None) -> None:
        super().__init__()
        self.tp = tp
        per_rank = padded_vocab // tp.size
        self.vocab_start = tp.rank * per_rank
        self.vocab_end = self.vocab_start + per_rank
        full = full_normal((vocab_size, dim), std, seed, key)
        full = torch.cat([full, full.new_zeros(padded_vocab - vocab_size, dim)])
        if padding_idx is not None:
            full[padding_idx] = 0.0
        self.weight = nn.Parameter(shard(full, 0, tp.rank, tp.size))
        mark_tensor_parallel(self.weight, 0, tp.size)
        self.local_padding_idx = None
        if padding_idx is not None and self.vocab_start <= padding_idx < self.vocab_end:
            self.local_padding_idx = padding_idx - self.vocab_start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(tokens, self.weight, padding_idx=self.local_padding_idx)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        h = F.embedding(local, self.weight, padding_idx=self.local_padding_idx)
        h = h.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.exit(h)


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 1) -> int:
    """Smallest size >= vocab_size divisible by tp * multiple."""
    unit = tp * multiple
    return ((vocab_size + unit - 1) // unit) * unit
