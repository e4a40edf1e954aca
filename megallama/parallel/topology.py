"""The rank grid: tensor parallel innermost, then data parallel, then pipeline parallel.

global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

This is the order of Megatron and of DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data,
model with model varying fastest), so the groups built here coincide with the ones DeepSpeed's
PipelineEngine builds for itself from the same (pp, tp, dp).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from megallama.config.grid import Grid
from megallama.config.model_config import ConfigError, kv_replicas_for
from megallama.parallel.layers import TensorParallel


@dataclass
class Topology:
    """The process groups of this rank, built collectively by :func:`build_topology`."""

    grid: Grid
    rank: int
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    kv_groups: dict[int, dist.ProcessGroup | None] = field(default_factory=dict)

    @property
    def tp_rank(self) -> int:
        return self.grid.coords(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.grid.coords(self.rank)[1]

    @property
    def pp_rank(self) -> int:
        return self.grid.coords(self.rank)[2]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.grid.pp - 1

    def tensor_parallel(self, n_kv_heads: int, sequence_parallel: bool = False) -> TensorParallel:
        """The TP context the model layers take, for a model with ``n_kv_heads``."""
        replicas = kv_replicas_for(n_kv_heads, self.grid.tp)
        return TensorParallel(group=self.tp_group, sequence_parallel=sequence_parallel,
                              kv_group=self.kv_group(replicas))

    def kv_group(self, replicas: int) -> dist.ProcessGroup | None:
        """The group of TP ranks sharing this rank's KV head(s); None when heads are not replicated."""
        if replicas == 1:
            return None
        if replicas not in self.kv_groups:
            raise RuntimeError(
                f"KV replica groups of size {replicas} were not built; pass kv_replicas to build_topology"
            )
        return self.kv_groups[replicas]


def build_topology(grid: Grid, kv_replicas: int = 1) -> Topology:
    """Create the TP, DP, PP (and KV-replica) groups. Collective: every rank calls it identically.

    Works without an initialised process group when the world is one rank.
    """
    if not dist.is_initialized():
        if grid.world_size != 1:
            raise ConfigError(f"a {grid} layout needs torch.distributed; launch with torchrun")
        return Topology(grid=grid, rank=0)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != grid.world_size:
        raise ConfigError(
            f"world size {world} != tp*pp*dp = {grid.tp}*{grid.pp}*{grid.dp}; "
            f"launch {grid.world_size} ranks or change parallel.tp/pp"
        )
    topo = Topology(grid=grid, rank=rank)
    for attr, groups in (("tp_group", grid.tp_groups()), ("dp_group", grid.dp_groups()),
                         ("pp_group", grid.pp_groups())):
        for ranks in groups:
            g = dist.new_group(ranks)
            if rank in ranks:
                setattr(topo, attr, g)
    if kv_replicas > 1:
        for ranks in grid.kv_replica_groups(kv_replicas):
            g = dist.new_group(ranks)
            if rank in ranks:
                topo.kv_groups[kv_replicas] = g
    return topo


__all__ = ["Grid", "Topology", "build_topology", "kv_replicas_for"]
