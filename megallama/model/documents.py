"""Attention restricted to documents: block-diagonal causal masking and per-document RoPE positions
for packed samples (``data.packing=documents|padded``).

A packed sample carries ``segments`` [b, s], one integer per token that changes where a new
document (or the padding) starts. Each token attends only to earlier tokens of its own segment,
and its RoPE position counts from the start of its segment -- what Megatron's
``--reset-attention-mask`` / ``--reset-position-ids`` and torchtitan's block-causal attention do --
so a packed document is computed exactly as if it were alone in the window.

Two kernels, one rule (query q sees key kv iff kv <= q and both lie in one segment):

* ``flex``: FlexAttention, compiled, with a ``BlockMask`` built from the segments' per-block
  ranges (:func:`block_mask`): no dense seq x seq mask is ever built (torch's eager
  ``create_block_mask`` builds one: 619 MiB for one 8192-token window), and blocks that no query
  can see are skipped;
* ``sdpa``: the reference -- SDPA under a dense boolean mask [b, 1, s, s].

Which one runs: the environment variable ``MEGALLAMA_ATTENTION`` (the rule of
:mod:`megallama.optim.kernels` for the optimizer's kernels): ``auto`` (default, or unset) is flex
on CUDA tensors and sdpa elsewhere; ``flex`` or ``sdpa`` force one on any device -- how the tests
run the GPU's path on a CPU. FlexAttention has no backward on CPU in torch 2.13 ("FlexAttention
does not support backward on CPU"), so on a CPU ``flex`` runs forward passes only (evaluation,
the tests); its backward runs on GPUs. Both kernels take K/V with fewer heads than Q (GQA,
``enable_gqa``): no copy of K/V per query head. Masks and positions are cached per ``segments``
tensor, so the layers of one forward share them.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F

from megallama.config import ConfigError

ENV = "MEGALLAMA_ATTENTION"
MODES = ("auto", "flex", "sdpa")
BLOCK = 128  # FlexAttention's block size (its default): the BlockMask's granularity
_CACHE_ATTR = "_megallama_documents"  # per-segments-tensor cache of positions and masks


def attention_kernel(device: torch.device) -> str:
    """``flex`` or ``sdpa``: the kernel of document attention on ``device`` under
    ``MEGALLAMA_ATTENTION`` (see the module docstring); ConfigError for an unknown value."""
    mode = os.environ.get(ENV, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ConfigError(f"{ENV}={os.environ[ENV]!r}: choose one of {list(MODES)} "
                          "(or leave it unset for auto)")
    if mode == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return mode


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


def block_classes(segments: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full): [b, n, n] booleans over (query block, key block) pairs, n = ceil(s /
    block), from each block's lowest and highest segment id -- O(b n^2), not O(b s^2). A pair is
    visible when it is causal (key block <= query block) and the two blocks' segment ranges meet;
    full (every query sees every key: no mask_mod needed) when the key block lies strictly before
    the query block, both are whole and both hold one and the same segment. For segments that
    never decrease along the sequence (what packing writes) this is exact: a causal pair whose
    ranges meet shares a segment; for any other segments it is conservative (a visible pair may
    hold no visible element: the kernel's mask_mod still masks element-wise), so always correct."""
    bsz, seq = segments.shape
    n = -(-seq // block)
    padded = F.pad(segments, (0, n * block - seq), value=0).view(bsz, n, block)
    valid = (torch.arange(n * block, device=segments.device) < seq).view(n, block)
    big = torch.iinfo(segments.dtype).max
    lo = torch.where(valid, padded, big).amin(-1)  # [b, n]
    hi = torch.where(valid, padded, -big).amax(-1)
    causal = torch.ones(n, n, dtype=torch.bool, device=segments.device).tril()
    meet = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])
    visible = meet & causal
    whole = valid.all(-1)  # only the last block can be cut short
    single = (lo == hi) & whole
    full = (visible & single[:, :, None] & single[:, None, :] & (lo[:, :, None] == lo[:, None, :])
            & causal.tril(-1))
    return visible & ~full, full


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block: how many key blocks are set, and their indices first (BlockMask's
    ``kv_num_blocks`` / ``kv_indices`` layout, as torch's ``_dense_to_ordered`` writes it)."""
    dense = blocks.to(torch.int32)
    order = torch.argsort(dense, dim=-1, descending=True, stable=True)
    return dense.sum(-1).to(torch.int32).unsqueeze(1), order.to(torch.int32).unsqueeze(1)


@torch.compiler.disable
def block_mask(segments: torch.Tensor, block: int = BLOCK) -> Any:
    """FlexAttention's BlockMask of the rule for ``segments``, built from
    :func:`block_classes` without any [s, s] tensor (its size: b n^2 int32 entries per index
    table, docs/PERFORMANCE.md)."""
    cache = _cached(segments)
    if "block" not in cache:
        from torch.nn.attention.flex_attention import BlockMask

        def mask_mod(b, h, q, kv):
            return (segments[b, q] == segments[b, kv]) & (kv <= q)

        partial, full = block_classes(segments, block)
        seq = segments.shape[-1]
        cache["block"] = BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full),
                                                  BLOCK_SIZE=block, mask_mod=mask_mod,
                                                  seq_lengths=(seq, seq))
    return cache["block"]


@functools.cache
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def _flex() -> Any:
    """FlexAttention compiled (its fast path; eager FlexAttention is a slow reference loop):
    inside a compiled region (``parallel.compile_blocks``) the call itself, traced into the
    block's graph; elsewhere compiled once per process, for every device."""
    if torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention
        return flex_attention
    return _compiled_flex()


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       segments: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
    """Attention of q [b, heads, s, head_dim] over k/v [b, kv_heads, s, head_dim] (kv_heads
    dividing heads: GQA) within documents. ``kernel``: ``flex`` or ``sdpa``; None: the rule of
    :func:`attention_kernel`."""
    kernel = kernel or attention_kernel(q.device)
    gqa = k.shape[1] != q.shape[1]
    if kernel == "flex":
        return _flex()(q, k, v, block_mask=block_mask(segments), enable_gqa=gqa)
    if kernel != "sdpa":
        raise ValueError(f"unknown attention kernel {kernel!r}: choose flex or sdpa")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(segments), enable_gqa=gqa)
