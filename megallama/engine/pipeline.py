"""The model's ordered layer list as DeepSpeed pipeline stages.

Where the stages cut is :func:`megallama.model.layout.stage_cuts` -- the rule the resharder and the
planner use too -- not DeepSpeed's partitioner: :class:`LlamaPipeline` replaces
``_partition_layers`` with those cuts, and keeps the layers' global names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from megallama.config import ModelConfig
from megallama.model.layout import layer_names, stage_cuts
from megallama.model.llama import LayerDef


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
            layers=[LayerSpec(d.cls, *d.args, **d.kwargs) for d in defs],
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
