"""Optimizer state saved where it lives: every rank writes the pieces of the global tensors whose
state it owns (``optim.impl=distributed``: a 1/dp flat shard of each gradient bucket), with no
gather to any rank, in a layout-free format that any (tp, pp, dp) and any optimizer reads back.

A rank's shard is a flat range of its TP slice of a parameter, which is not a range along the
split dimension, so the weights format (pieces tile the split dimension,
:mod:`megallama.checkpoint.shard_index`) cannot hold it. Here a piece is any *box* of the global
tensor: a flat range of a 2-D slice is cut into at most three boxes (a partial row, whole rows, a
partial row), shifted to the slice's place in the global tensor, with vocabulary padding cut off.

``optim/<key>/`` then holds ``optim-ppXX-tpYY-dpZZ.safetensors`` (one per rank that owns state;
tensor ``<name>@<flat start>`` per box; the header's metadata records the file's name, the state
and every tensor's box) and ``pieces.index.json`` (:mod:`megallama.checkpoint.pieces_index`)::

    {"format": "megallama-optim-pieces", "format_version": 2, "state": "exp_avg",
     "saved_layout": {...}, "files": {file: {"size", "sha256"}},
     "tensors": {name: {"shape": [...], "dtype": "float32",
                        "pieces": [{"file", "key", "box": [[start, stop], ...]}]}}}

Rank 0 writes the index last, after checking that the boxes of every tensor tile it exactly; a
reader checks the index, then each file's size, sha256 and header records before first use.

Reading back: an optimizer that owns flat ranges of its parameters (``optim.impl=distributed``,
:class:`OwnedRangesAccess`) gets only those ranges, cut into boxes as at saving, and reads only
the pieces that overlap them (:func:`load_owned_state`): about 1/dp of the state per rank, and
only the files holding those pieces are opened (and checksummed). Any other optimizer gets each
parameter's whole TP slice (:func:`load_from_pieces`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from megallama.checkpoint.atomic import (
    CheckpointError,
    all_or_none,
    commit_index,
    write_shard_file,
)
from megallama.checkpoint.pieces_index import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    PieceReader,
    check_tiling,
    has_pieces,
)
from megallama.config import ModelConfig
from megallama.model.layout import ShardSpec, shard_spec
from megallama.parallel.layers import TensorParallel
from megallama.parallel.topology import Topology

Box = list[list[int]]  # [start, stop) per dimension
Layers = list[tuple[str, nn.Module]]


class OwnedStateAccess(Protocol):
    """The optimizer state this rank owns: (flat start in ``p``'s TP slice, fp32 values)."""

    def owned_pieces(self, p: nn.Parameter, key: str) -> list[tuple[int, torch.Tensor]]: ...


class OwnedRangesAccess(Protocol):
    """Setting only the state a rank owns: flat ``[start, stop)`` ranges of ``p``'s TP slice."""

    def owned_ranges(self, p: nn.Parameter) -> list[tuple[int, int]]: ...

    def set_owned_pieces(self, p: nn.Parameter, key: str,
                         pieces: list[tuple[int, torch.Tensor]]) -> None: ...

    def owned_state_loaded(self, key: str) -> None:
        """Every piece of ``key`` is set (collective over DP: e.g. gather the weights)."""


def flat_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[Box, int, int]]:
    """Elements ``[start, stop)`` of a row-major tensor of ``shape`` (1-D or 2-D) as boxes, each
    with its ``[lo, hi)`` within the range: a partial first row, whole rows, a partial last row."""
    if len(shape) == 1:
        return [([[start, stop]], 0, stop - start)] if stop > start else []
    if len(shape) != 2:
        raise CheckpointError(f"optimizer pieces of a {len(shape)}-D tensor are not supported")
    cols, out, at = shape[1], [], start
    while at < stop:
        row, col = divmod(at, cols)
        if col or stop - at < cols:  # a partial row
            end = min(stop, (row + 1) * cols)
            out.append(([[row, row + 1], [col, col + end - at]], at - start, end - start))
        else:  # whole rows
            end = at + (stop - at) // cols * cols
            out.append(([[row, end // cols], [0, cols]], at - start, end - start))
        at = end
    return out


def _global_box(spec: ShardSpec, tp_rank: int, box: Box) -> Box | None:
    """A box of this TP rank's slice as a box of the global tensor (padding rows cut off: the
    kept part starts where ``box`` does); None when it is all padding."""
    d = spec.split_dim
    if d is None:
        return box
    offset, length = spec.piece(tp_rank)
    a, b = box[d]
    b = min(b, length)
    if a >= b:
        return None
    out = [list(x) for x in box]
    out[d] = [offset + a, offset + b]
    return out


def _to_global(spec: ShardSpec, tp_rank: int, box: Box, data: torch.Tensor
               ) -> tuple[Box, torch.Tensor] | None:
    """A box of this TP rank's slice and its data as a box of the global tensor."""
    placed = _global_box(spec, tp_rank, box)
    if placed is None:
        return None
    d = spec.split_dim
    return placed, data if d is None else data.narrow(d, 0, placed[d][1] - placed[d][0])


def _local_pieces(layers: Layers, tp: TensorParallel, cfg: ModelConfig, access: OwnedStateAccess,
                  key: str) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The boxes this rank stores: tensors by safetensors key, index entries by global name."""
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for prefix, module in layers:
        for local, p in module.named_parameters():
            name = f"{prefix}.{local}"
            spec = shard_spec(cfg, name, tp.size)
            if not spec.is_first_holder(tp.rank) or getattr(p, "tied_copy", False):
                continue  # a TP replica or a tied embedding's copy: stored by another rank
            shape = spec.local_shape()
            for start, values in access.owned_pieces(p, key):
                flat = values.detach().float().reshape(-1)
                for box, lo, hi in flat_boxes(shape, start, start + flat.numel()):
                    dims = [b - a for a, b in box]
                    placed = _to_global(spec, tp.rank, box, flat[lo:hi].view(dims))
                    if placed is None:
                        continue
                    tkey = f"{name}@{start + lo}"
                    tensors[tkey] = placed[1].to("cpu", copy=True).contiguous()
                    entries.setdefault(name, {"shape": list(spec.shape), "dtype": "float32",
                                              "pieces": []})
                    entries[name]["pieces"].append({"key": tkey, "box": placed[0]})
    return tensors, entries


def _build_index(metas: list[Any], topo: Topology, where: Path, key: str) -> dict[str, Any]:
    files: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    for meta in metas:
        if meta is None:
            continue
        files[meta["file"]] = {"size": meta["size"], "sha256": meta["sha256"]}
        for name, e in meta["tensors"].items():
            entry = tensors.setdefault(name, {"shape": e["shape"], "dtype": e["dtype"],
                                              "pieces": []})
            entry["pieces"] += [{"file": meta["file"], **x} for x in e["pieces"]]
    for name, entry in tensors.items():
        check_tiling(name, entry, where)
    g = topo.grid
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "state": key,
            "saved_layout": {"tp": g.tp, "pp": g.pp, "dp": g.dp}, "files": files,
            "tensors": tensors}


def save_owned_state(layers: Layers, tp: TensorParallel, topo: Topology, key_dir: Path,
                     cfg: ModelConfig, access: OwnedStateAccess, key: str) -> None:
    """Write this rank's pieces of ``key`` and (rank 0) the index. Collective over the world; if
    any rank fails, every rank raises."""
    key_dir = Path(key_dir)
    meta, error = None, None
    try:
        tensors, entries = _local_pieces(layers, tp, cfg, access, key)
        if tensors:
            fname = f"optim-pp{topo.pp_rank:02d}-tp{topo.tp_rank:02d}-dp{topo.dp_rank:02d}" \
                    ".safetensors"
            boxes = {x["key"]: x["box"] for e in entries.values() for x in e["pieces"]}
            records = {"file": fname, "state": key, "boxes": json.dumps(boxes)}
            meta = write_shard_file(tensors, key_dir / fname, FORMAT, entries, records)
    except Exception as e:  # reported through agree() so that every rank raises
        error = e
    commit_index(meta, error, key_dir / INDEX_NAME, str(key_dir),
                 lambda metas: _build_index(metas, topo, key_dir, key))


def load_from_pieces(layers: Layers, tp: TensorParallel, key_dir: Path, cfg: ModelConfig,
                     set_value: Callable[[nn.Parameter, str, torch.Tensor], None],
                     state: str | None = None) -> None:
    """For every parameter of ``layers``: its TP slice of the saved ``state`` (padding rows zero),
    passed to ``set_value(p, name, slice)``, which may refuse it by raising. Collective: if any
    rank fails, every rank raises."""
    error = None
    with ExitStack() as stack:
        try:
            reader = PieceReader(key_dir, stack, state)
            for prefix, module in layers:
                for local, p in module.named_parameters():
                    name = f"{prefix}.{local}"
                    set_value(p, name, _read_slice(reader, name, cfg, tp))
        except Exception as e:  # reported through all_or_none() so that every rank raises
            error = e
    all_or_none(error, f"loading {key_dir}")


def load_owned_state(layers: Layers, tp: TensorParallel, key_dir: Path, cfg: ModelConfig,
                     access: OwnedRangesAccess, key: str,
                     check: Callable[[str, torch.Tensor, torch.Tensor], None]) -> None:
    """For every parameter of ``layers``: only the flat ranges of its TP slice that ``access``
    owns, read from the pieces that overlap them; ``check(name, weights, values)`` sees each
    range's values beside the same range of the parameter's weights (and may refuse them by
    raising) before ``access.set_owned_pieces``. Collective: if any rank fails, every rank
    raises; then ``access.owned_state_loaded(key)``."""
    error = None
    with ExitStack() as stack:
        try:
            reader = PieceReader(key_dir, stack, key)
            for prefix, module in layers:
                for local, p in module.named_parameters():
                    name = f"{prefix}.{local}"
                    spec = _checked_spec(reader, name, cfg, tp)
                    pieces = [(start, _read_range(reader, name, spec, tp.rank, start, stop))
                              for start, stop in access.owned_ranges(p)]
                    flat = p.detach().reshape(-1)
                    for start, values in pieces:
                        check(name, flat[start:start + values.numel()], values)
                    access.set_owned_pieces(p, key, pieces)
        except Exception as e:  # reported through all_or_none() so that every rank raises
            error = e
    all_or_none(error, f"loading {key_dir}")
    access.owned_state_loaded(key)


def _read_range(reader: PieceReader, name: str, spec: ShardSpec, tp_rank: int, start: int,
                stop: int) -> torch.Tensor:
    """Elements ``[start, stop)`` of this TP rank's (padded) slice of ``name``, flat, fp32
    (padding zero), read box by box."""
    out = torch.zeros(stop - start, dtype=torch.float32)
    for box, lo, hi in flat_boxes(spec.local_shape(), start, stop):
        placed = _global_box(spec, tp_rank, box)
        if placed is not None:
            view = out[lo:hi].view([b - a for a, b in box])
            view[tuple(slice(0, b - a) for a, b in placed)] = reader.read(name, placed)
    return out


def _checked_spec(reader: PieceReader, name: str, cfg: ModelConfig, tp: TensorParallel
                  ) -> ShardSpec:
    """``name``'s shard spec, once the index is known to hold it with the model's shape."""
    if name not in reader.tensors:
        raise CheckpointError(f"{reader.index_path}: no state for {name}")
    spec = shard_spec(cfg, name, tp.size)
    if list(spec.shape) != reader.tensors[name]["shape"]:
        raise CheckpointError(f"{reader.index_path}: {name}: shape "
                              f"{reader.tensors[name]['shape']} != model {list(spec.shape)}")
    return spec


def _read_slice(reader: PieceReader, name: str, cfg: ModelConfig, tp: TensorParallel
                ) -> torch.Tensor:
    spec = _checked_spec(reader, name, cfg, tp)
    buf = torch.zeros(spec.local_shape(), dtype=torch.float32)
    offset, length = spec.piece(tp.rank)
    if length > 0:
        box = [[0, n] for n in spec.shape]
        if spec.split_dim is not None:
            box[spec.split_dim] = [offset, offset + length]
        buf[tuple(slice(0, b - a) for a, b in box)] = reader.read(name, box)
    return buf


__all__ = ["FORMAT", "FORMAT_VERSION", "INDEX_NAME", "OwnedRangesAccess", "OwnedStateAccess",
           "flat_boxes", "has_pieces", "load_from_pieces", "load_owned_state", "save_owned_state"]
