"""Cross-entropy over vocab-parallel logits, without ever gathering the full vocabulary.

Each rank holds logits for vocabulary ids [start, start + V/tp). The softmax normaliser and the
target logit are assembled with two all-reduces of [batch, seq] tensors; gradients flow through
``reduce_from_tp`` (identity backward), which yields softmax - onehot on every shard. Columns past
the true vocabulary (padding for divisibility) are masked to -inf, so they never change the loss.
"""

from __future__ import annotations

import torch

from megallama.parallel import mappings
from megallama.parallel.mappings import Group

IGNORE_INDEX = -100


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group: Group,
    vocab_size: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean token loss over labels != ignore_index; logits [..., V_local], labels [...]."""
    per_rank = logits.size(-1)
    start = mappings.group_rank(group) * per_rank
    logits = logits.float()
    if start + per_rank > vocab_size:  # this shard holds padded columns
        pad = torch.arange(start, start + per_rank, device=logits.device) >= vocab_size
        logits = logits.masked_fill(pad, float("-inf"))

    row_max = mappings.all_reduce_max(logits.detach().amax(dim=-1), group)
    shifted = logits - row_max.unsqueeze(-1)

    valid = labels != ignore_index
    local = labels - start
    owned = valid & (local >= 0) & (local < per_rank)
    idx = local.masked_fill(~owned, 0).unsqueeze(-1)
    target = shifted.gather(-1, idx).squeeze(-1).masked_fill(~owned, 0.0)
    target = mappings.reduce_from_tp(target, group)
    sum_exp = mappings.reduce_from_tp(shifted.exp().sum(dim=-1), group)

    token_loss = (sum_exp.log() - target).masked_fill(~valid, 0.0)
    return token_loss.sum() / valid.sum().clamp(min=1)
