"""Cut the model's ordered layer list into DeepSpeed pipeline stages.

``balanced`` partitioning weighs each layer by its forward FLOPs per token (the output head's
vocabulary matmul and the loss included; the embedding lookup costs memory but almost no compute,
so it gets a small weight) and places the contiguous cuts that minimise the costliest stage, with
every stage holding at least one transformer block. Uneven layer counts follow naturally. No layer
is built to find its cost.

The at-least-one-block rule is not cosmetic: every stage then has both matrices (weight decay)
and norm weights (no decay), so every rank's optimizer has the same two parameter groups, which
DeepSpeed's ZeRO requires (it issues one collective per group for the gradient norm).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from megallama.config import ModelConfig
from megallama.model.llama import LayerDef


def layer_costs(cfg: ModelConfig, seq_len: int, names: list[str]) -> list[int]:
    """Relative forward cost per token of each layer (integers for DeepSpeed's partitioner)."""
    d, hd = cfg.dim, cfg.head_dim
    block = 2 * (2 * d * cfg.n_heads * hd + 2 * d * cfg.n_kv_heads * hd + 3 * d * cfg.ffn_hidden_dim)
    block += 4 * seq_len * cfg.n_heads * hd // 2  # causal attention scores and values
    head = 2 * d * cfg.vocab_size + 5 * cfg.vocab_size  # matmul + softmax/loss
    cost = {"tok_embeddings": max(1, block // 50), "norm": max(1, block // 100), "output": head}
    return [cost.get(n, block) for n in names]


def balanced_cuts(costs: list[int], is_block: list[bool], stages: int) -> list[int]:
    """Stage boundaries [0, ..., len(costs)] minimising the largest stage cost, each stage holding
    at least one block (dynamic programming over contiguous splits)."""
    n = len(costs)
    if sum(is_block) < stages:
        raise ValueError(f"{stages} pipeline stages need at least {stages} blocks")
    prefix = [0]
    blocks = [0]
    for c, b in zip(costs, is_block, strict=True):
        prefix.append(prefix[-1] + c)
        blocks.append(blocks[-1] + int(b))
    inf = float("inf")
    # best[k][i]: minimal max-cost of splitting layers [0, i) into k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(1, n + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == inf or blocks[i] - blocks[j] == 0:
                    continue
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds = [n]
    for k in range(stages, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]


class LlamaPipeline(PipelineModule):
    """DeepSpeed PipelineModule over the project's layer list, keeping the global layer names."""

    def __init__(self, defs: list[LayerDef], loss_fn: Callable[..., torch.Tensor], *,
                 pp: int, tp: int, dp: int, costs: list[int], partition_method: str) -> None:
        object.__setattr__(self, "_layer_costs", costs)
        object.__setattr__(self, "_layer_names", [d.name for d in defs])
        object.__setattr__(self, "_is_block", [d.name.startswith("layers.") for d in defs])
        if partition_method == "uniform":
            object.__setattr__(self, "_layer_costs", [1] * len(defs))
        super().__init__(
            layers=[LayerSpec(d.cls, *d.args, **d.kwargs) for d in defs],
            loss_fn=loss_fn,
            topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp),
            partition_method="balanced",
            activation_checkpoint_interval=0,  # blocks checkpoint themselves
        )

    def _partition_layers(self, method: str = "balanced") -> None:
        self.parts = balanced_cuts(self._layer_costs, self._is_block, self.num_stages)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def local_layers(self) -> list[tuple[str, nn.Module]]:
        """(global name, module) of the layers this stage owns, in forward order."""
        return [(self._layer_names[i], getattr(self, str(i)))
                for i in range(self._local_start, self._local_stop)]

    def stage_bounds(self) -> list[int]:
        """Layer index where each stage starts, plus the total (DeepSpeed's ``parts``)."""
        return list(self.parts)
