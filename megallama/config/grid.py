"""The rank grid as pure arithmetic: tensor parallel innermost, then data parallel, then pipeline.

global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

No process groups here (see :mod:`megallama.parallel.topology`), so a config can be checked
against a world size before torch.distributed starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from megallama.config.model_config import ConfigError


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
