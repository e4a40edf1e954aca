"""The model's ordered layer list as DeepSpeed pipeline stages.

Where the stages cut is :func:`megallama.model.layout.stage_cuts` -- the rule the resharder and the
planner use too -- not DeepSpeed's partitioner: :class:`LlamaPipeline` replaces
``_partition_layers`` with those cuts, and keeps the layers' global names.

Packed documents (``data.packing=documents|padded``): the first stage reads ``(tokens,
segments)`` and every activation between layers and stages is ``(hidden, segments)`` -- DeepSpeed
sends the integer tensor along and gives it no gradient -- until the final norm, after which only
the hidden states go on. The layers are the model's own classes, subclassed (:func:`carrying`) so
parameter names stay those of the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from megallama.config import ModelConfig
from megallama.model.layout import layer_names, stage_cuts
from megallama.model.llama import FinalNorm, LayerDef, TransformerBlock


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

    def _partition_layers(self, method: str = "balanced") -> None:
        self.parts = list(self._cuts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def local_layers(self) -> list[tuple[str, nn.Module]]:
        """(global name, module) of the layers this stage owns, in forward order."""
        return [(self._layer_names[i], getattr(self, str(i)))
                for i in range(self._local_start, self._local_stop)]

    def stage_bounds(self) -> list[int]:
        """Layer index where each stage starts, plus the total (DeepSpeed's ``parts``)."""
        return list(self.parts)
