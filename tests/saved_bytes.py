"""Saved-activation bytes of one transformer block, counted exactly: every tensor autograd saves
for backward (``torch.autograd.graph.saved_tensors_hooks``) plus every tensor a checkpointed
region keeps as its input (the non-reentrant checkpoint keeps those by reference, and its own
hooks hide the region's saves from ours), one count per storage, parameters and buffers
excluded. Used by tests/test_recompute.py (tp 1) and tests/distributed/test_tensor_parallel.py
(tp 2, tp 2 + SP)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from megallama.model import llama, recompute


@contextlib.contextmanager
def _checkpoint_inputs_counted(record) -> Iterator[None]:  # noqa: ANN001 -- a callable(tensor)
    real = recompute.checkpoint

    def counting(fn, *args, **kwargs):  # noqa: ANN001, ANN202 -- torch's checkpoint signature
        for a in args:
            if isinstance(a, torch.Tensor):
                record(a)
        return real(fn, *args, **kwargs)

    llama.checkpoint = recompute.checkpoint = counting
    try:
        yield
    finally:
        llama.checkpoint = recompute.checkpoint = real


def saved_block_bytes(block: nn.Module, x: torch.Tensor, segments: torch.Tensor | None = None) -> int:
    """Bytes that ``block(x)``'s autograd graph keeps alive until backward (see module doc)."""
    state = {t.untyped_storage().data_ptr() for t in [*block.parameters(), *block.buffers()]}
    seen: dict[int, int] = {}

    def record(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in state and storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        record(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            _checkpoint_inputs_counted(record):
        out = block(x, None, segments)
    del out
    return sum(seen.values())
