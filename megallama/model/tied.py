"""Tied input/output embeddings (Llama 3.2, ``model.tie_embeddings``): how the output head finds
the table it multiplies by.

At pp = 1 the head multiplies by its stage's own embedding, so autograd sums both uses' gradients
into the one parameter. At pp > 1 the head is on the last stage and the embedding on the first:
the last stage holds a copy (:func:`embedding_copy`) -- Megatron's embedding group; the engine sums
the two copies' gradients before every step (:mod:`megallama.engine.pipeline`), checkpoints load
the copy as ``tok_embeddings.weight`` and never save it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

from torch import nn


class _Def(Protocol):  # model.llama.LayerDef (imported there from here)
    name: str
    kwargs: dict[str, Any]

    def build(self) -> nn.Module: ...


class EmbeddingRef:
    """The embedding a tied output head multiplies by: set when the embedding (or its copy,
    :func:`embedding_copy`) is built (``layer_defs`` hands one to both), read at each forward (so
    a weight replaced after building, e.g. materialised from the meta device, is the one used)."""

    def __init__(self) -> None:
        self.module: nn.Module | None = None


def embedding_copy(defs: Sequence[_Def], names: Collection[str]) -> nn.Module | None:
    """A tied head's copy of the embedding on a stage ``names`` without it (the last at pp > 1),
    else None: built by the embedding's own LayerDef (the same seeded values, drawn from (seed,
    ``tok_embeddings.weight``)), it becomes the head's weight through their shared
    :class:`EmbeddingRef`; loaded as ``tok_embeddings``, never saved."""
    by_name = {d.name: d for d in defs}
    if "ref" not in by_name["output"].kwargs or "output" not in names or "tok_embeddings" in names:
        return None
    return by_name["tok_embeddings"].build()
