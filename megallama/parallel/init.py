"""Seeded initialisation that gives the same full weights at any tensor-parallel size.

Every parameter draws its *full* tensor from a generator seeded by (seed, the parameter's global
name) and keeps its own slice; the random stream therefore never depends on tp, pp or rank order.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, key: str) -> int:
    """A 63-bit seed that depends only on the run seed and the parameter's global name."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_normal(shape: tuple[int, ...], std: float, seed: int, key: str) -> torch.Tensor:
    """The full (unsharded) N(0, std^2) tensor for parameter ``key``, on CPU in fp32."""
    gen = torch.Generator().manual_seed(derive_seed(seed, key))
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def shard(full: torch.Tensor, dim: int, index: int, parts: int) -> torch.Tensor:
    """Slice ``index`` of ``parts`` equal slices along ``dim``."""
    if full.size(dim) % parts:
        raise ValueError(f"size {full.size(dim)} along dim {dim} is not divisible by {parts}")
    return full.chunk(parts, dim=dim)[index].clone()
