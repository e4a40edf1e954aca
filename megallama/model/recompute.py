"""Selective recomputation (``parallel.activation_checkpointing=selective``): the element-wise and
attention parts of a block (no matmul weights) run under a non-reentrant checkpoint, so backward
recomputes them from their inputs instead of reading what their forward saved. The rest of the block keeps its activations; ``full`` checkpoints the whole block
(:class:`megallama.model.llama.TransformerBlock`). Why these parts: docs/PERFORMANCE.md,
"Selective recomputation"; the bytes each mode keeps: docs/PLANNER.md, "Activations".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megallama.config.train_config import checkpointing_mode

__all__ = ["checkpointing_mode", "recompute", "swiglu"]


def recompute(on: bool, fn: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
    """``fn(*args)``; with ``on`` and autograd recording, under a non-reentrant checkpoint: its
    forward saves nothing (the tensors in ``args`` stay referenced) and backward reruns it. The
    regions hold no collectives or random numbers (an RMSNorm's weight at most), so the rerun is
    the same arithmetic on the same inputs (no RNG state to restore). Inside a compiled block
    (``parallel.compile_blocks``) the region is traced inline: Inductor's partitioner chooses
    what to save and already recomputes cheap element-wise work."""
    if on and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: SwiGLU's element-wise product (w1's and w3's outputs in, w2's input out)."""
    return F.silu(gate) * up
