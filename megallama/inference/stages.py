"""What pipeline inference needs beyond the layers: a KV cache of one stage's blocks and the
point-to-point traffic between stages.

Inference runs every micro-batch (or decoding step) through the stages in order, with blocking
``send``/``recv`` of the hidden state [b, s, dim] between the same TP rank of consecutive stages
(activations are replicated over TP without sequence parallelism). A stage that loops over
several micro-batches sends one and goes on with the next while the following stage works, so a
forward-only pipeline fills by itself; no schedule is needed.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from megallama.config import ModelConfig
from megallama.model.llama import KVCache
from megallama.parallel.layers import TensorParallel
from megallama.parallel.topology import Topology


class StageKVCache(KVCache):
    """A :class:`KVCache` holding only the blocks ``first_layer .. first_layer + n_layers - 1``
    of one pipeline stage: each stage stores its own layers' keys and values, so the cache of a
    pp-stage model costs every rank 1/pp of the whole (a 70B model at pp=8 keeps 10 of the 80
    layers per rank). Blocks still address it by their global ``layer_id``."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, first_layer: int, n_layers: int,
                 batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(dataclasses.replace(cfg, n_layers=max(1, n_layers)), tp, batch,
                         max_len, device, dtype)
        self.cfg = cfg  # RoPE reads the real config (n_layers only sized the buffers)
        self.first_layer, self.n_layers = first_layer, n_layers

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = layer_id - self.first_layer
        if not 0 <= local < self.n_layers:
            raise IndexError(f"layer {layer_id} is not in this stage's cache (layers "
                             f"{self.first_layer}..{self.first_layer + self.n_layers - 1})")
        return super().update(local, k, v)


def _stage_rank(topo: Topology, pp_rank: int) -> int:
    """Global rank of this rank's (tp, dp) position at pipeline stage ``pp_rank``."""
    return topo.grid.rank(topo.tp_rank, topo.dp_rank, pp_rank)


def send_to_next(h: torch.Tensor, topo: Topology) -> None:
    """Send the hidden state to the same TP rank of the next stage (blocking)."""
    dist.send(h.contiguous(), _stage_rank(topo, topo.pp_rank + 1), group=topo.pp_group)


def recv_from_previous(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                       topo: Topology) -> torch.Tensor:
    """Receive the hidden state of the previous stage (blocking)."""
    h = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(h, _stage_rank(topo, topo.pp_rank - 1), group=topo.pp_group)
    return h


def broadcast_from_last(t: torch.Tensor, topo: Topology) -> torch.Tensor:
    """``t`` as the last stage holds it, on every stage of this rank's pipeline (in place)."""
    if topo.grid.pp > 1:
        dist.broadcast(t, _stage_rank(topo, topo.grid.pp - 1), group=topo.pp_group)
    return t


__all__ = ["StageKVCache", "broadcast_from_last", "recv_from_previous", "send_to_next"]
