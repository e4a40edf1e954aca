"""Attention restricted to documents: block-diagonal causal masking and per-document RoPE positions
for packed samples (``data.packing=documents|padded``).

A packed sample carries ``segments`` [b, s], one integer per token that changes where a new
document (or the padding) starts. Each token attends only to earlier tokens of its own segment,
and its RoPE position counts from the start of its segment -- what Megatron's
``--reset-attention-mask`` / ``--reset-position-ids`` and torchtitan's block-causal attention do --
so a packed document is computed exactly as if it were alone in the window.

Two kernels, one rule (query q sees key kv iff kv <= q and both lie in one segment):
* CUDA: FlexAttention with a block mask built from the segments (no dense seq x seq mask; blocks
  that no query can see are skipped), compiled once per process;
* elsewhere (CPU, tests): the reference -- SDPA under a dense boolean mask.
Both are cached per ``segments`` tensor, so the layers of one forward share one mask.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

_CACHE_ATTR = "_megallama_documents"  # per-segments-tensor cache of positions and masks


def document_positions(segments: torch.Tensor) -> torch.Tensor:
    """RoPE position of every token: its distance from the first token of its segment, [b, s]."""
    seq = segments.shape[-1]
    index = torch.arange(seq, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - last_start


def _cached(segments: torch.Tensor) -> dict[str, Any]:
    cache = getattr(segments, _CACHE_ATTR, None)
    if cache is None:
        cache = {}
        setattr(segments, _CACHE_ATTR, cache)
    return cache


@torch.compiler.disable  # a Python-side cache: run eagerly inside compiled blocks
def cached_positions(segments: torch.Tensor) -> torch.Tensor:
    """:func:`document_positions`, computed once per segments tensor."""
    cache = _cached(segments)
    if "positions" not in cache:
        cache["positions"] = document_positions(segments)
    return cache["positions"]


@torch.compiler.disable
def dense_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] boolean mask (True = attend) of the rule: the reference path."""
    cache = _cached(segments)
    if "dense" not in cache:
        seq = segments.shape[-1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=segments.device).tril()
        same = segments[:, :, None] == segments[:, None, :]
        cache["dense"] = (same & causal).unsqueeze(1)
    return cache["dense"]


@functools.cache
def _flex(compiled: bool) -> Any:
    """FlexAttention, compiled (its fast path; CUDA) or eager (a slow check of the mask on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


@torch.compiler.disable
def block_mask(segments: torch.Tensor) -> Any:
    """FlexAttention's BlockMask of the rule for ``segments``."""
    cache = _cached(segments)
    if "block" not in cache:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, kv):
            return (segments[b, q] == segments[b, kv]) & (kv <= q)

        bsz, seq = segments.shape
        cache["block"] = create_block_mask(mask_mod, B=bsz, H=None, Q_LEN=seq, KV_LEN=seq,
                                           device=segments.device)
    return cache["block"]


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       segments: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """Attention of q/k/v [b, heads, s, head_dim] within documents. ``kernel``: ``flex``,
    ``dense`` or ``auto`` (flex on CUDA, dense elsewhere)."""
    if kernel == "auto":
        kernel = "flex" if q.is_cuda else "dense"
    if kernel == "flex":
        return _flex(q.is_cuda)(q, k, v, block_mask=block_mask(segments))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(segments))
