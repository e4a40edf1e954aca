"""Model weights in a layout-independent sharded format: safetensors shards + ``model.index.json``.

Each (pipeline stage, TP slice) writes one shard holding its slices of the parameters under their
global (Meta) names, with the vocabulary padding cut off. The index records, for every tensor, its
global shape and which contiguous range along its split dimension each shard holds, so a loader at
any other TP/PP layout reads exactly the ranges it needs (safetensors' lazy slices) -- and tools can
stream full tensors without this package. The format is specified in docs/CHECKPOINTS.md.

Which slice of which global tensor a rank holds comes from ``model.layout.shard_spec`` (the rule
the model is built by and the resharder writes by); a parameter whose shape or TP attributes
disagree with it is refused rather than written or loaded in the wrong place.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from megallama.checkpoint.atomic import (
    CheckpointError,
    Group,
    agree,
    checkpoint_writer,
    commit_index,
    is_distributed,
    latest_checkpoint,
    save_checkpoint_dir,
    write_shard_file,
)
from megallama.checkpoint.shard_index import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    ShardReader,
    build_index,
    check_shard_headers,
    dtype_name,
    iter_full_tensors,
    read_full_tensor,
    read_index,
    shard_file_name,
)
from megallama.config import ConfigError, ModelConfig
from megallama.model.layout import VOCAB_PADDED, ShardSpec, shard_spec, shard_specs
from megallama.parallel.layers import TensorParallel
from megallama.parallel.topology import Topology

if TYPE_CHECKING:
    from megallama.model.llama import Transformer

# Config fields that do not describe trained weights: not compared on load.
_IGNORED_CONFIG_FIELDS = frozenset({"init_std"})

Layers = Sequence[tuple[str, nn.Module]]


def named_layers(model: Transformer) -> list[tuple[str, nn.Module]]:
    """The (global prefix, module) list of a whole single-stage :class:`Transformer`: what a
    pipeline stage passes for its own layers, here for all of them."""
    return model.named_layers()


def _named_params(layers: Layers) -> list[tuple[str, nn.Parameter]]:
    out, seen = [], set()
    for prefix, module in layers:
        for local, p in module.named_parameters():
            name = f"{prefix}.{local}"
            if name in seen:
                raise CheckpointError(f"{name}: given twice in the layer list")
            seen.add(name)
            out.append((name, p))
    return out


def _spec(name: str, tp: TensorParallel, cfg: ModelConfig, where: Path | str) -> ShardSpec:
    """The layout's :class:`ShardSpec` of parameter ``name`` at this TP size."""
    try:
        return shard_spec(cfg, name, tp.size)
    except KeyError as e:  # str() of a KeyError quotes it
        raise CheckpointError(f"{where}: {e.args[0]}") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: {name}: {e}") from None


def _check_tags(name: str, p: nn.Parameter, spec: ShardSpec, where: Path | str) -> None:
    """The ``partition_dim`` / ``tp_replicas`` tags the parameter's layer gave it (which DeepSpeed
    and the optimizer read) must say what the layout says."""
    tags = (getattr(p, "partition_dim", None), getattr(p, "tp_replicas", 1))
    if tags != (spec.split_dim, spec.replicas):
        raise CheckpointError(f"{where}: {name}: parameter tagged (partition_dim, tp_replicas) "
                              f"= {tags}, the layout says ({spec.split_dim}, {spec.replicas})")


def _model_shape(p: nn.Parameter, spec: ShardSpec) -> list[int]:
    """The global shape the model's parameter stands for, as an error message reports it: the
    layout's when the local slice fits it, else the local shape times the slices (padding rows
    included)."""
    if tuple(p.shape) == spec.local_shape():
        return list(spec.shape)
    shape = list(p.shape)
    if spec.split_dim is not None and len(shape) > spec.split_dim:
        shape[spec.split_dim] *= spec.parts
    return shape


# ---- save ----------------------------------------------------------------------------------------
def _local_shard(params: list[tuple[str, nn.Parameter]], tp: TensorParallel, cfg: ModelConfig,
                 where: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The slices this (DP-rank-0) rank provides: tensors to store and their index entries."""
    tensors, entries = {}, {}
    for name, p in params:
        if getattr(p, "tied_copy", False):
            continue  # a tied embedding's last-stage copy: the first stage stores the one weight
        spec = _spec(name, tp, cfg, where)
        if tuple(p.shape) != spec.local_shape():
            raise CheckpointError(f"{where}: {name}: parameter shape {list(p.shape)} is not the "
                                  f"slice {list(spec.local_shape())} the model config implies at "
                                  f"tp={tp.size}")
        _check_tags(name, p, spec, where)
        if not spec.is_first_holder(tp.rank):
            continue  # replicated tensors come from TP rank 0, KV slices from their first replica
        offset, length = spec.piece(tp.rank)
        if length == 0:
            continue  # the whole slice is vocabulary padding
        dim = spec.split_dim
        t = p.detach() if dim is None else p.detach().narrow(dim, 0, length)
        tensors[name] = t.to("cpu", copy=True).contiguous()  # own storage: params may share one
        entries[name] = {"shape": list(spec.shape), "dtype": dtype_name(p.dtype), "split_dim": dim,
                         "offset": offset, "length": length}
    return tensors, entries


def save_model_weights(layers: Layers, tp: TensorParallel, topo: Topology, ckpt_dir: Path,
                       model_cfg: ModelConfig, extra: dict[str, Any] | None = None) -> None:
    """Write this rank's parameter slices and (rank 0) ``model.index.json`` into ``ckpt_dir``.

    Collective over the world. DP rank 0 of each (pp, tp) position writes
    ``model-ppXX-tpYY.safetensors`` (fsynced) with the slices it is first to hold; rank 0 gathers
    every writer's metadata, checks that the pieces tile every tensor and writes the index last, so
    an index present means the weights are complete. ``extra`` (JSON-serialisable) is stored in
    the index. If any rank fails, every rank raises.
    """
    ckpt_dir = Path(ckpt_dir)
    meta, error = None, None
    try:
        if tp.size != topo.grid.tp or tp.rank != topo.tp_rank:
            raise CheckpointError(f"TensorParallel (rank {tp.rank} of {tp.size}) does not match "
                                  f"the topology (tp rank {topo.tp_rank} of {topo.grid.tp})")
        if topo.dp_rank == 0:
            params = _named_params(layers)
            tensors, entries = _local_shard(params, tp, model_cfg, ckpt_dir)
            if tensors:
                fname = shard_file_name(topo.pp_rank, topo.tp_rank)
                meta = write_shard_file(tensors, ckpt_dir / fname, FORMAT, entries)
                del tensors
    except Exception as e:  # reported to rank 0 so that every rank raises
        error = e
    commit_index(meta, error, ckpt_dir / INDEX_NAME, f"weights to {ckpt_dir}",
                 lambda metas: build_index(metas, model_cfg, topo, extra, ckpt_dir))


# ---- read ----------------------------------------------------------------------------------------
def _config_diff(saved: dict[str, Any], cfg: ModelConfig) -> list[str]:
    """Fields where the checkpoint's model config and ``cfg`` differ. A field the checkpoint does
    not record was added to ModelConfig after it was written: it holds the field's default."""
    ours, default = cfg.to_dict(), ModelConfig().to_dict()
    return [f"{k}: checkpoint {saved.get(k, default.get(k))!r} != model {v!r}"
            for k, v in ours.items()
            if k not in _IGNORED_CONFIG_FIELDS and saved.get(k, default.get(k)) != v]


def load_model_weights(layers: Layers, tp: TensorParallel, ckpt_dir: Path,
                       model_cfg: ModelConfig | None = None, strict: bool = True, *,
                       group: Group = None) -> None:
    """Load the parameters of ``layers`` (this rank's stage) from a checkpoint of any layout.

    Each parameter reads only the range of the global tensor its TP slice covers; vocabulary padding
    rows are set to zero. Each shard is size- and sha256-checked before first use. ``model_cfg``,
    if given, must equal the checkpoint's config (``init_std`` aside); without it the vocabulary
    size comes from the index and global shapes are still checked. ``strict``: every parameter
    must be in the checkpoint and every checkpoint tensor must be loaded by some rank.

    With torch.distributed initialised this is collective over ``group`` (the world): ranks agree
    on the outcome, so all raise :class:`CheckpointError` if any fails.
    """
    ckpt_dir = Path(ckpt_dir)
    error: Exception | None = None
    names: list[str] = []
    stored: set[str] = set()
    with ExitStack() as stack:
        try:
            reader = ShardReader(ckpt_dir, stack)
            stored = set(reader.tensors)
            saved_cfg = reader.index["model_config"]
            if model_cfg is not None and (diff := _config_diff(saved_cfg, model_cfg)):
                raise CheckpointError(f"{reader.index_path}: model config differs from the "
                                      f"checkpoint's: {'; '.join(diff)}")
            cfg = model_cfg if model_cfg is not None else _saved_config(saved_cfg, reader)
            params = _named_params(layers)
            names = [n for n, _ in params]
            missing = [n for n in names if n not in stored]
            if strict and missing:
                raise CheckpointError(f"{reader.index_path}: {len(missing)} model tensor(s) "
                                      f"missing from the checkpoint: {', '.join(missing[:5])}")
            for name, p in params:
                if name in stored:
                    _load_param(reader, name, p, tp, cfg)
        except Exception as e:  # reported to rank 0 so that every rank raises
            error = e
    local = (None if error is None else f"{type(error).__name__}: {error}", names)
    if not is_distributed() and error is not None:
        raise error

    def decide(outcomes: list[tuple[str | None, list[str]]]) -> None:
        failed = [(r, msg) for r, (msg, _) in enumerate(outcomes) if msg is not None]
        if failed:
            raise CheckpointError(f"loading {ckpt_dir}: rank {failed[0][0]}: {failed[0][1]}")
        loaded = {n for _, ns in outcomes for n in ns}
        unexpected = sorted(stored - loaded)
        if strict and unexpected:
            raise CheckpointError(f"{ckpt_dir / INDEX_NAME}: {len(unexpected)} checkpoint "
                                  f"tensor(s) not in the model: {', '.join(unexpected[:5])}")

    try:
        agree(local, decide, group)
    except CheckpointError:
        if error is not None:
            raise error from None
        raise


def model_shapes(cfg: ModelConfig) -> dict[str, list[int]]:
    """Every parameter of the model ``cfg`` describes: global name -> global (unpadded) shape."""
    return {spec.name: list(spec.shape) for spec in shard_specs(cfg, 1)}


def check_tensor_set(where: Path | str, shapes: dict[str, list[int]], cfg: ModelConfig) -> None:
    """A checkpoint's tensors (name -> shape) must be exactly the model's: none missing, none
    extra, each of the model's shape."""
    want = model_shapes(cfg)
    missing = [n for n in want if n not in shapes]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} model tensor(s) missing from the "
                              f"checkpoint: {', '.join(missing[:5])}")
    extra = [n for n in shapes if n not in want]
    if extra:
        raise CheckpointError(f"{where}: {len(extra)} checkpoint tensor(s) not in the model: "
                              f"{', '.join(extra[:5])}")
    for name, shape in want.items():
        if shapes[name] != shape:
            raise CheckpointError(f"{where}: {name}: checkpoint shape {shapes[name]} != model "
                                  f"shape {shape}; the checkpoint is for a different model config")


def check_weights(ckpt_dir: Path, model_cfg: ModelConfig, state: str | None = None
                  ) -> dict[str, Any]:
    """What can be checked of a weights-format directory without reading tensors, for a run of
    ``model_cfg`` (the checks :func:`load_model_weights` makes, before any collective): the
    index, the model config, the tensors' names and shapes, every shard's size and header.
    ``state``: the optimizer state an ``optim/<state>`` directory must say it holds. Returns the
    index. Checksums are checked when the shards are read."""
    ckpt_dir = Path(ckpt_dir)
    index = read_index(ckpt_dir)
    path = ckpt_dir / INDEX_NAME
    if diff := _config_diff(index["model_config"], model_cfg):
        raise CheckpointError(f"{path}: model config differs from the checkpoint's: "
                              f"{'; '.join(diff)}")
    extra = index.get("extra")
    saved_state = extra.get("state", state) if state and isinstance(extra, dict) else state
    if saved_state != state:
        raise CheckpointError(f"{path}: holds the {saved_state} state, not {state} (optimizer "
                              "state directories swapped or renamed?)")
    check_tensor_set(path, {n: e["shape"] for n, e in index["tensors"].items()}, model_cfg)
    check_shard_headers(ckpt_dir, index)
    return index


def _saved_config(saved: dict[str, Any], reader: ShardReader) -> ModelConfig:
    """The checkpoint's own model config (what lays out its tensors when the caller gives none)."""
    try:
        return ModelConfig(**saved)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{reader.index_path}: model_config: {e}") from None


def _load_param(reader: ShardReader, name: str, p: nn.Parameter, tp: TensorParallel,
                cfg: ModelConfig) -> None:
    entry = reader.tensors[name]
    spec = _spec(name, tp, cfg, reader.index_path)
    if tuple(p.shape) != spec.local_shape() or list(spec.shape) != entry["shape"]:
        raise CheckpointError(f"{reader.index_path}: {name}: checkpoint shape {entry['shape']} "
                              f"!= model shape {_model_shape(p, spec)}; the checkpoint is for a "
                              "different model config")
    _check_tags(name, p, spec, reader.index_path)
    buf = torch.zeros(p.shape, dtype=p.dtype)  # rows past the vocabulary stay zero
    offset, length = spec.piece(tp.rank)
    if length > 0:
        box = [(0, n) for n in spec.shape]
        if spec.split_dim is not None:
            box[spec.split_dim] = (offset, offset + length)
        part = reader.read(name, box)
        if not torch.isfinite(part).all():
            bad = int((~torch.isfinite(part)).sum())
            raise CheckpointError(f"{reader.index_path}: {name}: {bad} non-finite value(s); the "
                                  "checkpoint is damaged")
        buf[tuple(slice(0, b - a) for a, b in box)] = part.to(p.dtype)
    with torch.no_grad():
        p.copy_(buf)


__all__ = [  # the commit protocol is re-exported so a trainer needs one import
    "FORMAT", "FORMAT_VERSION", "INDEX_NAME", "VOCAB_PADDED", "CheckpointError", "build_index",
    "check_tensor_set", "check_weights", "checkpoint_writer", "dtype_name", "model_shapes",
    "iter_full_tensors", "latest_checkpoint", "load_model_weights", "named_layers",
    "read_full_tensor", "read_index", "save_checkpoint_dir", "save_model_weights",
    "shard_file_name",
]
