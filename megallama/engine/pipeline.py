"""The model's ordered layer list as DeepSpeed pipeline stages.

Where the stages cut is :func:`megallama.model.layout.stage_cuts` -- the rule the resharder and the
planner use too -- not DeepSpeed's partitioner: :class:`LlamaPipeline` replaces
``_partition_layers`` with those cuts, and keeps the layers' global names.

Packed documents (``data.packing=documents|padded``): the first stage reads ``(tokens,
segments)`` and every activation between layers and stages is ``(hidden, segments)`` -- DeepSpeed
sends the integer tensor along and gives it no gradient -- until the final norm, after which only
the hidden states go on. The layers are the model's own classes, subclassed (:func:`carrying`) so
parameter names stay those of the model.

Tied embeddings (``model.tie_embeddings``) at pp > 1, as Megatron's embedding group: the first
stage holds ``tok_embeddings.weight``, the last stage a copy of it (same TP slice, built with the
same seeded initialisation, loaded from the same checkpoint tensor) that its output head
multiplies by. Both are tagged ``tied_group`` (the two-rank group of the first and last stage at
the same (dp, tp) coordinates, over which their gradients are summed before every optimizer
step), the copy also ``tied_copy`` (counted once in the gradient norm, never saved). DeepSpeed's
own optimizers sum them in its ``ReduceTiedGrads`` instruction (:meth:`get_tied_weights_and_groups`);
megallama's fused and distributed optimizers sum them in their step. With equal gradients and
equal optimizer state, the two copies stay bit-identical.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from megallama.config import ModelConfig
from megallama.config.grid import Grid
from megallama.model.layout import layer_names, stage_cuts
from megallama.model.llama import FinalNorm, LayerDef, TransformerBlock
from megallama.model.tied import embedding_copy


@functools.cache
def carrying(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` taking and passing on ``(hidden, segments)`` when given a tuple: a block attends
    within the segments, the final norm drops them, the embedding passes them on."""

    class Carrying(cls):  # type: ignore[misc, valid-type]
        def forward(self, x):  # noqa: ANN001 -- a tensor or DeepSpeed's activation tuple
            if not isinstance(x, tuple):
                return super().forward(x)
            h, segments = x
            if issubclass(cls, TransformerBlock):
                return super().forward(h, None, segments), segments
            if issubclass(cls, FinalNorm):
                return super().forward(h)
            return super().forward(h), segments

    Carrying.__name__ = Carrying.__qualname__ = cls.__name__
    return Carrying


class LlamaPipeline(PipelineModule):
    """DeepSpeed PipelineModule over the project's layer list, keeping the global layer names."""

    def __init__(self, defs: list[LayerDef], loss_fn: Callable[..., torch.Tensor], *,
                 cfg: ModelConfig, pp: int, tp: int, dp: int, seq_len: int,
                 partition_method: str) -> None:
        names = [d.name for d in defs]
        if names != layer_names(cfg):
            raise ValueError(f"layer list {names[:3]}... is not the model's layer list")
        # set before PipelineModule.__init__, which calls _partition_layers
        object.__setattr__(self, "_layer_names", names)
        object.__setattr__(self, "_cuts", stage_cuts(cfg, pp, seq_len, partition_method))
        super().__init__(
            layers=[LayerSpec(carrying(d.cls), *d.args, **d.kwargs) for d in defs],
            loss_fn=loss_fn,
            topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp),
            partition_method="balanced",  # ignored: _partition_layers below uses _cuts
            activation_checkpoint_interval=0,  # blocks checkpoint themselves
        )

        # set by the engine: whether DeepSpeed's optimizer (not megallama's) sums the tied grads
        self.tied_grads_by_deepspeed = True
        self._tied: list[tuple[nn.Parameter, dist.ProcessGroup]] = []
        if cfg.tie_embeddings:
            self._tie(defs, Grid(tp=tp, dp=dp, pp=pp), names)

    def _tie(self, defs: list[LayerDef], grid: Grid, names: list[str]) -> None:
        """Build the last stage's copy of the embedding table and tag both copies (module
        docstring). Collective: every rank creates every embedding group."""
        group = embedding_group(grid, self.global_rank)
        held = names[self._local_start:self._local_stop]
        copy = embedding_copy(defs, held)
        if copy is not None:  # registered after the layers: last in parameters()
            self.tied_embedding = copy.to(next(self.parameters()).device)
            copy.weight.tied_copy = True
            copy.weight.ds_pipe_replicated = True  # DeepSpeed's norms count it once, too
            self._tied = [(copy.weight, group)]
        elif "tok_embeddings" in held:
            self._tied = [(getattr(self, "0").weight, group)]
        for weight, g in self._tied:
            weight.tied_group = g

    def get_tied_weights_and_groups(self) -> list[tuple[nn.Parameter, dist.ProcessGroup]]:
        """What DeepSpeed's ``ReduceTiedGrads`` all-reduces: the tied weight of this stage and
        its embedding group, unless megallama's optimizer sums them itself."""
        return list(self._tied) if self.tied_grads_by_deepspeed else []

    def _partition_layers(self, method: str = "balanced") -> None:
        self.parts = list(self._cuts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def local_layers(self) -> list[tuple[str, nn.Module]]:
        """(global name, module) of the layers this stage owns, in forward order."""
        return [(self._layer_names[i], getattr(self, str(i)))
                for i in range(self._local_start, self._local_stop)]

    def checkpoint_layers(self) -> list[tuple[str, nn.Module]]:
        """:meth:`local_layers`, and on the last stage of a tied model the embedding's copy as
        ``tok_embeddings`` (loaded as that tensor; writers skip it, see ``tied_copy``)."""
        copy = getattr(self, "tied_embedding", None)
        return self.local_layers() + ([("tok_embeddings", copy)] if copy is not None else [])

    def stage_bounds(self) -> list[int]:
        """Layer index where each stage starts, plus the total (DeepSpeed's ``parts``)."""
        return list(self.parts)


def embedding_group(grid: Grid, rank: int) -> dist.ProcessGroup | None:
    """Megatron's embedding group of ``rank``: the first and last pipeline stage's ranks at its
    (dp, tp) coordinates (None on a middle stage). Collective: every rank creates every group, in
    the same order."""
    mine = None
    for dp in range(grid.dp):
        for tp in range(grid.tp):
            ranks = [grid.rank(tp, dp, 0), grid.rank(tp, dp, grid.pp - 1)]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = group
    return mine
