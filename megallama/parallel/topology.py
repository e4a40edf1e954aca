"""The rank grid: tensor parallel innermost, then data parallel, then pipeline parallel.

global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

This is the order of Megatron and of DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data,
model with model varying fastest), so the groups built here coincide with the ones DeepSpeed's
PipelineEngine builds for itself from the same (pp, tp, dp).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from megallama.config import ConfigError
from megallama.parallel.layers import TensorParallel


@dataclass(frozen=True)
class Grid:
    """Pure rank arithmetic for a tp x dp x pp world (no process groups; usable without a job)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)}: must be >= 1")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank."""
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.dp * self.tp + dp_rank * self.tp + tp_rank

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for t in range(self.tp)]
                for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for d in range(self.dp)]
                for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for p in range(self.pp)]
                for d in range(self.dp) for t in range(self.tp)]

    def kv_replica_groups(self, replicas: int) -> list[list[int]]:
        """Consecutive runs of ``replicas`` ranks inside each TP group: the ranks that hold the same
        KV head when tp > n_kv_heads."""
        return [g[i:i + replicas] for g in self.tp_groups() for i in range(0, self.tp, replicas)]

    @classmethod
    def from_world(cls, world_size: int, tp: int = 1, pp: int = 1, dp: int | None = None) -> Grid:
        """Derive dp from the world size (or check a given one); one clear error when it does not fit."""
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}; "
                "launch tp*pp*dp ranks (torchrun --nproc-per-node x --nnodes)"
            )
        derived = world_size // (tp * pp)
        if dp is not None and dp != derived:
            raise ConfigError(
                f"world size {world_size} != tp*pp*dp = {tp}*{pp}*{dp}; "
                f"launch {tp * pp * dp} ranks or set parallel.dp={derived}"
            )
        return cls(tp=tp, pp=pp, dp=derived)


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


def kv_replicas_for(n_kv_heads: int, tp: int) -> int:
    """How many TP ranks share one KV head: 1 when tp <= n_kv_heads."""
    return max(1, tp // n_kv_heads)
