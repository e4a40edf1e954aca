"""One AdamW update of one parameter, in fp32 against a master copy: the torch reference (any
device) and a fused Triton kernel (CUDA; on CPU tensors under Triton's interpreter, for tests).
Which of the two runs is decided in one place, :mod:`megallama.optim.kernels`.

Both compute exactly torch's ``AdamW`` (decoupled weight decay, bias-corrected moments) on fp32
values, with the gradient first multiplied by the clipping coefficient:

    g = float(grad) * coef
    p = p * (1 - lr * wd)
    m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

``p`` is the fp32 master weight. For a bf16 parameter it is stored *split*: its upper 16 bits are
the bf16 weight the model computes with, rounded to nearest (:func:`split_fp32`), and a 16-bit
integer holds the exact remainder, so ``master == join_fp32(weight, lo)`` bit for bit. The master
is thus a true fp32 value at 2 extra bytes per parameter instead of 4, and the bf16 weight needs
no separate copy-back; the one difference from a separate fp32 copy rounded to bf16 is that exact
ties (low 16 bits 0x8000, 1 in 65536 values) round away from zero instead of to even.

The Triton kernel does all of it in one pass over memory: it reads the gradient (bf16, or fp32
from an accumulation buffer, which it then zeroes), the weight, the remainder and both moments, and
writes them back: 26 bytes per bf16 parameter, against ~5 passes for a DeepSpeed-style cast,
accumulate, clip, step and copy-back.

``coef`` and ``ok`` are 0-d device tensors (clip coefficient, and 1.0 when the global gradient
norm is finite): the kernel reads them on the device, so the update needs no host sync, and a
non-finite step leaves every tensor untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megallama.optim.kernels import interpreting


@dataclass(frozen=True)
class AdamWScalars:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: int  # 1-based Adam step of this update

    @property
    def step_size(self) -> float:
        return self.lr / (1.0 - self.beta1 ** self.step)

    @property
    def sqrt_bc2(self) -> float:
        return math.sqrt(1.0 - self.beta2 ** self.step)


def split_fp32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (bf16 rounded to nearest, ties away from zero; int16 remainder), exactly
    invertible by :func:`join_fp32`."""
    bits = x.contiguous().view(torch.int32)
    hi = (bits + 0x8000) >> 16
    lo = bits - (hi << 16)  # in [-32768, 32767]
    return hi.to(torch.int16).view(torch.bfloat16), lo.to(torch.int16)


def join_fp32(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The fp32 value whose split is (``hi``, ``lo``)."""
    bits = (hi.contiguous().view(torch.int16).to(torch.int32) << 16) + lo.to(torch.int32)
    return bits.view(torch.float32)


@torch.no_grad()
def adamw_reference(weight: torch.Tensor, grad: torch.Tensor, lo: torch.Tensor | None,
                    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, coef: torch.Tensor,
                    s: AdamWScalars) -> None:
    """The update with torch ops, op for op as torch's single-tensor AdamW (the oracle of the
    kernel, and the path on CPU). ``lo`` is the master's remainder for a bf16 weight (None: the
    weight is fp32 and is its own master). The caller skips it when the step is not finite."""
    p = weight if lo is None else join_fp32(weight, lo)
    g = grad.float() * coef
    p.mul_(1.0 - s.lr * s.weight_decay)
    exp_avg.lerp_(g, 1.0 - s.beta1)
    exp_avg_sq.mul_(s.beta2).addcmul_(g, g, value=1.0 - s.beta2)
    denom = (exp_avg_sq.sqrt() / s.sqrt_bc2).add_(s.eps)
    p.addcdiv_(exp_avg, denom, value=-s.step_size)
    if lo is not None:
        hi, new_lo = split_fp32(p)
        weight.copy_(hi)
        lo.copy_(new_lo)


def _build_kernels():
    # Triton ships with CUDA builds of torch only: imported when a kernel is first needed.
    # @triton.jit reads TRITON_INTERPRET when it decorates: built here, not at import
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_kernel(w_ptr, g_ptr, lo_ptr, m_ptr, v_ptr, coef_ptr, ok_ptr, n,
                     lr, beta1, beta2, eps, decay, step_size, sqrt_bc2,
                     SPLIT: tl.constexpr, ZERO_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n
        # ok as a block, from a float block: Triton's interpreter cannot AND a block of bools
        # with a scalar bool, and its broadcast_to of a bool yields floats (free when compiled)
        ok = (tl.zeros((BLOCK,), tl.float32) + tl.load(ok_ptr)) != 0.0
        coef = tl.load(coef_ptr)
        g = tl.load(g_ptr + offs, mask=live, other=0.0).to(tl.float32) * coef
        if SPLIT:  # w_ptr: the bf16 weight's bits as int16; master = (w << 16) + lo
            hi = tl.load(w_ptr + offs, mask=live, other=0).to(tl.int32)
            lo = tl.load(lo_ptr + offs, mask=live, other=0).to(tl.int32)
            p = ((hi << 16) + lo).to(tl.float32, bitcast=True)
        else:
            p = tl.load(w_ptr + offs, mask=live, other=0.0)
        m = tl.load(m_ptr + offs, mask=live, other=0.0)
        v = tl.load(v_ptr + offs, mask=live, other=0.0)
        p = p * decay
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        p = p - step_size * (m / (tl.sqrt(v) / sqrt_bc2 + eps))
        store = live & ok
        tl.store(m_ptr + offs, m, mask=store)
        tl.store(v_ptr + offs, v, mask=store)
        if SPLIT:
            bits = p.to(tl.int32, bitcast=True)
            new_hi = (bits + 0x8000) >> 16
            tl.store(w_ptr + offs, new_hi.to(tl.int16), mask=store)
            tl.store(lo_ptr + offs, (bits - (new_hi << 16)).to(tl.int16), mask=store)
        else:
            tl.store(w_ptr + offs, p, mask=store)
        if ZERO_GRAD:
            tl.store(g_ptr + offs, tl.zeros_like(g).to(g_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def sumsq_kernel(g_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(g * g, axis=0))

    return adamw_kernel, sumsq_kernel


_KERNELS: dict[bool, tuple] = {}  # interpreted or compiled -> (adamw_kernel, sumsq_kernel)
BLOCK = 2048
NUM_WARPS = 8
NORM_BLOCK = 8192


def kernels() -> tuple:
    """(adamw_kernel, sumsq_kernel), built once per mode: compiled, or under Triton's
    interpreter when ``TRITON_INTERPRET=1`` is set when they are first needed in that mode."""
    mode = interpreting()
    if mode not in _KERNELS:
        _KERNELS[mode] = _build_kernels()
    return _KERNELS[mode]


def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum(t^2) over all elements of all tensors as a float64 0-d tensor: one Triton launch per
    tensor writing per-block fp32 partial sums (no atomics, so the result is deterministic),
    which are added in float64 (an fp32 sum of many blocks would drop the small ones, see
    :func:`megallama.optim.master_step.local_sum_of_squares`)."""
    kernel = kernels()[1]
    blocks = [max(1, -(-t.numel() // NORM_BLOCK)) for t in tensors]
    partial = torch.empty(sum(blocks), dtype=torch.float32, device=tensors[0].device)
    start = 0
    for t, nb in zip(tensors, blocks, strict=True):
        kernel[(nb,)](t, partial[start:], t.numel(), BLOCK=NORM_BLOCK, num_warps=8)
        start += nb
    return partial.sum(dtype=torch.float64)


def adamw_fused(weight: torch.Tensor, grad: torch.Tensor, lo: torch.Tensor | None,
                exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, coef: torch.Tensor,
                ok: torch.Tensor, s: AdamWScalars, zero_grad: bool = False) -> None:
    """The update as one Triton kernel launch (all tensors contiguous on one device: CUDA, or
    CPU under Triton's interpreter)."""
    n = weight.numel()
    grid = (max(1, -(-n // BLOCK)),)
    split = lo is not None
    kernels()[0][grid](weight.view(torch.int16) if split else weight, grad,
                        lo if split else weight, exp_avg, exp_avg_sq, coef, ok, n, s.lr, s.beta1,
                        s.beta2, s.eps, 1.0 - s.lr * s.weight_decay, s.step_size, s.sqrt_bc2,
                        SPLIT=split, ZERO_GRAD=zero_grad, BLOCK=BLOCK, num_warps=NUM_WARPS)
