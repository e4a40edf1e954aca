"""The checkpoint side of :class:`megallama.optim.distributed_adamw.DistributedAdamW`: reading
and setting the master weights and Adam moments of a DP-sharded optimizer, either as full tensors
(collective over DP: a bucket's shards all-gathered) or as the pieces each rank owns (no
communication: what checkpoints write and what a resume reads back, see
:mod:`megallama.checkpoint.optim_pieces`). Every accessor first waits for the parameter
all-gathers still in flight (the weights hold half of a bf16 master)."""

from __future__ import annotations

import torch
from torch import nn

from megallama.optim.adamw_kernel import join_fp32, split_fp32
from megallama.optim.grad_buckets import Bucket, gather_flat


class ShardStateAccess:
    """Checkpoint access of a DP-sharded optimizer (``OptimizerStateAccess`` and the owned-pieces
    interfaces of megallama.checkpoint), mixed into DistributedAdamW, which provides the
    attributes below."""

    buckets: list[Bucket]
    shards: list[dict[str, torch.Tensor]]
    where: dict[nn.Parameter, tuple[int, int]]
    _gathered: tuple[tuple[int, str], torch.Tensor] | None

    def wait_param_gathers(self) -> None:
        raise NotImplementedError

    def _shard_value(self, b: int, key: str) -> torch.Tensor:
        """This rank's shard of ``key`` of bucket ``b``, as fp32."""
        self.wait_param_gathers()
        state = self.shards[b]
        if key != "fp32":
            return state[key]
        weight = self.buckets[b].weight_shard()
        lo = state.get("master_lo")
        return weight.float() if lo is None else join_fp32(weight, lo)

    def owned_pieces(self, p: nn.Parameter, key: str) -> list[tuple[int, torch.Tensor]]:
        """The state of ``p`` this rank owns, with no communication: (first element in ``p``
        flattened, fp32 values) per piece of ``p`` in this rank's shard (what a checkpoint
        writes, :mod:`megallama.checkpoint.optim_pieces`)."""
        self.wait_param_gathers()
        b, i = self.where[p]
        bucket, state = self.buckets[b], self.shards[b]
        out = []
        for seg in bucket.segments:
            if seg.index != i:
                continue
            cut = slice(seg.shard_start, seg.shard_start + seg.length)
            if key != "fp32":
                value = state[key][cut]
            elif "master_lo" in state:
                value = join_fp32(bucket.weight_shard()[cut], state["master_lo"][cut])
            else:
                value = bucket.weight_shard()[cut].float()
            out.append((seg.start, value))
        return out

    def full_state(self, p: nn.Parameter, key: str) -> torch.Tensor:
        """``fp32`` (master weight), ``exp_avg`` or ``exp_avg_sq`` of ``p`` as a full fp32 tensor.
        Collective over DP (every DP rank asks for the same parameters in the same order): the
        bucket's shards are all-gathered once and kept until another bucket or key is asked."""
        b, i = self.where[p]
        bucket = self.buckets[b]
        if self._gathered is None or self._gathered[0] != (b, key):
            shard = self._shard_value(b, key).contiguous()
            full = torch.empty(bucket.shard_size * bucket.dp, dtype=torch.float32,
                               device=shard.device)
            if bucket.dp > 1:
                gather_flat(full, shard, bucket.group)
            else:
                full.copy_(shard)
            self._gathered = ((b, key), full)
        o = bucket.offsets[i]
        return self._gathered[1][o:o + p.numel()].view(p.shape)

    @torch.no_grad()
    def set_full_state(self, p: nn.Parameter, key: str, value: torch.Tensor) -> None:
        """Set ``key`` of ``p`` from its full value: each rank keeps the part its shard holds (no
        communication); ``fp32`` also sets the (replicated) weight itself."""
        self.wait_param_gathers()
        b, i = self.where[p]
        bucket, state = self.buckets[b], self.shards[b]
        flat = value.to(p.device, torch.float32).reshape(-1)
        lo_full = None
        if key == "fp32":
            if "master_lo" in state:
                hi, lo_full = split_fp32(flat)
                p.data.copy_(hi.view(p.shape))
            else:
                p.data.copy_(flat.view(p.shape))
        for seg in bucket.segments:
            if seg.index != i:
                continue
            src = slice(seg.start, seg.start + seg.length)
            dst = slice(seg.shard_start, seg.shard_start + seg.length)
            if key != "fp32":
                state[key][dst].copy_(flat[src])
            elif lo_full is not None:
                state["master_lo"][dst].copy_(lo_full[src])
        self._gathered = None

    def owned_ranges(self, p: nn.Parameter) -> list[tuple[int, int]]:
        """The flat ``[start, stop)`` ranges of ``p`` whose state this rank owns (what a resume
        reads, :func:`megallama.checkpoint.optim_pieces.load_owned_state`)."""
        b, i = self.where[p]
        return [(seg.start, seg.start + seg.length) for seg in self.buckets[b].segments
                if seg.index == i]

    @torch.no_grad()
    def set_owned_pieces(self, p: nn.Parameter, key: str,
                         pieces: list[tuple[int, torch.Tensor]]) -> None:
        """Set ``key`` of the ranges :meth:`owned_ranges` gave, from (start, flat fp32 values);
        ``fp32`` sets the master and this rank's shard of the weights (the rest of the weights
        arrive by :meth:`owned_state_loaded`'s all-gather). No communication."""
        self.wait_param_gathers()
        b, i = self.where[p]
        bucket, state = self.buckets[b], self.shards[b]
        at = {seg.start: seg for seg in bucket.segments if seg.index == i}
        for start, values in pieces:
            seg = at[start]
            dst = slice(seg.shard_start, seg.shard_start + seg.length)
            flat = values.to(p.device, torch.float32).reshape(-1)
            if key != "fp32":
                state[key][dst].copy_(flat)
            elif "master_lo" in state:
                hi, lo = split_fp32(flat)
                bucket.weight_shard()[dst].copy_(hi)
                state["master_lo"][dst].copy_(lo)
            else:
                bucket.weight_shard()[dst].copy_(flat)
        self._gathered = None

    @torch.no_grad()
    def owned_state_loaded(self, key: str) -> None:
        """After every owned piece of ``key`` is set: for ``fp32``, all-gather each bucket's
        weights over DP (collective), so every rank's weights are the masters' upper halves, as
        :meth:`set_full_state` leaves them."""
        if key != "fp32":
            return
        works = [bucket.all_gather() for bucket in self.buckets]
        for work in works:
            if work is not None:
                work.wait()
