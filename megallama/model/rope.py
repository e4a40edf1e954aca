"""Rotary position embedding as Meta's reference code applies it: interleaved pairs
(x[2i], x[2i+1]) rotate together; frequencies from ``rope_theta`` with linear, dynamic (NTK) or
Llama 3.1's ``llama3`` scaling, as transformers computes them. One concern: positions."""

from __future__ import annotations

import math

import torch

from megallama.config import ModelConfig, RopeScaling


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1's RoPE scaling of the frequencies (Meta's ``apply_scaling``, transformers'
    ``llama3`` rope type, the same fp32 operations): wavelengths longer than
    original/low_freq_factor are divided by ``factor``, those shorter than original/high_freq_factor
    kept, and the band between blends the two linearly in original/wavelength."""
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old = scaling.original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(cfg: ModelConfig, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, [seq_len, head_dim/2], fp32, with linear, dynamic
    (NTK) or llama3 scaling as transformers computes them."""
    dim, base = cfg.head_dim, cfg.rope_theta
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    scaling = cfg.rope_scaling
    if scaling is not None and scaling.type == "dynamic" and seq_len > cfg.max_seq_len:
        ratio = scaling.factor * seq_len / cfg.max_seq_len - (scaling.factor - 1)
        base = base * ratio ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim))
    if scaling is not None and scaling.type == "linear":
        inv_freq = inv_freq / scaling.factor
    if scaling is not None and scaling.type == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [b, s, heads, head_dim] (Meta's layout) in fp32. cos/sin are
    [s, head_dim/2] (positions 0..s-1, training) or [b, s, head_dim/2] (per-sequence positions)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)
