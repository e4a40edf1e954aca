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

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from megallama.checkpoint.atomic import (
    CheckpointError,
    Group,
    agree,
    checkpoint_writer,
    file_sha256,
    fsync_file,
    is_distributed,
    latest_checkpoint,
    save_checkpoint_dir,
    verify_file,
    write_text_atomic,
)
from megallama.config import ConfigError, ModelConfig
from megallama.model.layout import VOCAB_PADDED, ShardSpec, shard_spec
from megallama.parallel.layers import TensorParallel
from megallama.parallel.topology import Topology

if TYPE_CHECKING:
    from megallama.model.llama import Transformer

FORMAT = "megallama-weights"
FORMAT_VERSION = 1
INDEX_NAME = "model.index.json"
# Config fields that do not describe trained weights: not compared on load.
_IGNORED_CONFIG_FIELDS = frozenset({"init_std"})

Layers = Sequence[tuple[str, nn.Module]]
Box = list[tuple[int, int]]  # [start, stop) per dimension


def shard_file_name(pp_rank: int, tp_rank: int) -> str:
    """The shard written by DP rank 0 of pipeline stage ``pp_rank``, TP rank ``tp_rank``."""
    return f"model-pp{pp_rank:02d}-tp{tp_rank:02d}.safetensors"


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


def dtype_name(dtype: torch.dtype) -> str:
    """The index's name of a dtype ("bfloat16", "float32", ...)."""
    return str(dtype).removeprefix("torch.")


# ---- save ----------------------------------------------------------------------------------------
def _local_shard(params: list[tuple[str, nn.Parameter]], tp: TensorParallel, cfg: ModelConfig,
                 where: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The slices this (DP-rank-0) rank provides: tensors to store and their index entries."""
    tensors, entries = {}, {}
    for name, p in params:
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


def _check_pieces(name: str, entry: dict[str, Any], where: Path | str) -> None:
    """The pieces of a tensor must tile its split dimension exactly (one piece if replicated)."""
    dim, pieces, shape = entry["split_dim"], entry["pieces"], entry["shape"]
    if dim is None:
        ok = len(pieces) == 1 and pieces[0]["offset"] == 0 and pieces[0]["length"] == shape[0]
    else:
        end = 0
        for piece in pieces:
            ok = piece["offset"] == end and piece["length"] > 0
            end += piece["length"]
            if not ok:
                break
        ok = bool(pieces) and end == shape[dim] and ok
    if not ok:
        spans = [(x["file"], x["offset"], x["length"]) for x in pieces]
        raise CheckpointError(f"{where}: {name}: pieces {spans} do not tile its shape {shape} "
                              f"along dim {dim} (a layer saved twice or by no stage?)")


def build_index(metas: list[Any], cfg: ModelConfig, topo: Topology,
                 extra: dict[str, Any] | None, where: Path) -> dict[str, Any]:
    """The index of a checkpoint from every writer's file metadata (also used by the resharder,
    which writes files of a layout it does not run)."""
    files: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    for meta in metas:
        if meta is None:
            continue
        files[meta["file"]] = {"size": meta["size"], "sha256": meta["sha256"]}
        for name, e in meta["tensors"].items():
            entry = tensors.setdefault(name, {"shape": e["shape"], "dtype": e["dtype"],
                                              "split_dim": e["split_dim"], "pieces": []})
            if [entry[k] for k in ("shape", "dtype", "split_dim")] != [e["shape"], e["dtype"],
                                                                      e["split_dim"]]:
                raise CheckpointError(f"{where}: {name}: shards disagree on shape/dtype/split dim")
            entry["pieces"].append({"file": meta["file"], "offset": e["offset"],
                                    "length": e["length"]})
    for name, entry in tensors.items():
        entry["pieces"].sort(key=lambda x: x["offset"])
        _check_pieces(name, entry, where)
    grid = topo.grid
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model_config": cfg.to_dict(),
            "saved_layout": {"tp": grid.tp, "pp": grid.pp, "dp": grid.dp},
            "extra": extra or {}, "files": files, "tensors": tensors}


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
                path = ckpt_dir / fname
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                save_file(tensors, path, metadata={"format": "pt", "writer": FORMAT})
                del tensors
                fsync_file(path)
                meta = {"file": fname, "size": path.stat().st_size, "sha256": file_sha256(path),
                        "tensors": entries}
    except Exception as e:  # reported to rank 0 so that every rank raises
        error = e

    def decide(outcomes: list[tuple[Any, str | None]]) -> None:
        failed = [(r, msg) for r, (_, msg) in enumerate(outcomes) if msg is not None]
        if failed:
            rank, msg = failed[0]
            raise CheckpointError(f"saving weights to {ckpt_dir}: rank {rank}: {msg}")
        index = build_index([m for m, _ in outcomes], model_cfg, topo, extra, ckpt_dir)
        write_text_atomic(ckpt_dir / INDEX_NAME, json.dumps(index, indent=1) + "\n")

    try:
        agree((meta, None if error is None else f"{type(error).__name__}: {error}"), decide)
    except CheckpointError:
        if error is not None:
            raise error from None
        raise


# ---- read ----------------------------------------------------------------------------------------
def read_index(ckpt_dir: Path) -> dict[str, Any]:
    """The parsed and validated ``model.index.json`` of a weights checkpoint."""
    path = Path(ckpt_dir) / INDEX_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint index not found (not a weights checkpoint, or "
                              "an incomplete one)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: checkpoint index is not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} index")
    if index.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {index.get('format_version')} is not "
                              f"supported (this reader knows {FORMAT_VERSION})")
    try:
        if not isinstance(index["model_config"], dict):
            raise TypeError("model_config is not an object")
        for fname, rec in index["files"].items():
            if not (isinstance(rec["size"], int) and isinstance(rec["sha256"], str)):
                raise TypeError(f"files[{fname!r}] needs an integer size and a sha256 string")
        for name, entry in index["tensors"].items():
            _check_pieces(name, entry, path)
            for piece in entry["pieces"]:
                if piece["file"] not in index["files"]:
                    raise CheckpointError(f"{path}: {name}: file {piece['file']} not in 'files'")
            if not isinstance(getattr(torch, entry["dtype"], None), torch.dtype):
                raise CheckpointError(f"{path}: {name}: unknown dtype {entry['dtype']!r}")
    except (KeyError, TypeError, AttributeError) as e:
        what = f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path}: malformed checkpoint index ({what})") from None
    return index


class _Reader:
    """Reads boxes of global tensors from the shards, verifying each shard once before use."""

    def __init__(self, ckpt_dir: Path, stack: ExitStack) -> None:
        self.dir = Path(ckpt_dir)
        self.index = read_index(self.dir)
        self.index_path = self.dir / INDEX_NAME
        self.tensors: dict[str, Any] = self.index["tensors"]
        self._stack, self._open = stack, {}

    def _file(self, fname: str) -> Any:
        if fname not in self._open:
            path = self.dir / fname
            rec = self.index["files"][fname]
            verify_file(path, rec["size"], rec["sha256"], listed_in=self.index_path)
            try:
                self._open[fname] = self._stack.enter_context(safe_open(path, framework="pt"))
            except Exception as e:  # SafetensorError is not importable portably
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        return self._open[fname]

    def read(self, name: str, box: Box | None = None) -> torch.Tensor:
        """``tensor[box]`` of global tensor ``name`` (the whole tensor when ``box`` is None), in the
        stored dtype, assembled from the overlapping pieces only."""
        entry = self.tensors[name]
        shape, dim = entry["shape"], entry["split_dim"]
        box = box or [(0, n) for n in shape]
        out = torch.empty([b - a for a, b in box], dtype=getattr(torch, entry["dtype"]))
        for piece in entry["pieces"]:
            pbox = [(0, n) for n in shape]
            if dim is not None:
                pbox[dim] = (piece["offset"], piece["offset"] + piece["length"])
            cut = [(max(a, pa), min(b, pb)) for (a, b), (pa, pb) in zip(box, pbox, strict=True)]
            if any(a >= b for a, b in cut):
                continue
            f = self._file(piece["file"])
            path = self.dir / piece["file"]
            try:
                view = f.get_slice(name)
            except Exception:
                raise CheckpointError(f"{path}: tensor {name} is missing from the shard") from None
            want = [pb - pa for pa, pb in pbox]
            if list(view.get_shape()) != want:
                raise CheckpointError(f"{path}: {name} has shape {list(view.get_shape())}, the "
                                      f"index says {want}")
            src = tuple(slice(a - pa, b - pa) for (a, b), (pa, _) in zip(cut, pbox, strict=True))
            dst = tuple(slice(a - ba, b - ba) for (a, b), (ba, _) in zip(cut, box, strict=True))
            out[dst] = view[src]
        return out


def _config_diff(saved: dict[str, Any], cfg: ModelConfig) -> list[str]:
    ours = cfg.to_dict()
    return [f"{k}: checkpoint {saved.get(k, '<absent>')!r} != model {v!r}"
            for k, v in ours.items() if k not in _IGNORED_CONFIG_FIELDS and saved.get(k) != v]


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
            reader = _Reader(ckpt_dir, stack)
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


def _saved_config(saved: dict[str, Any], reader: _Reader) -> ModelConfig:
    """The checkpoint's own model config (what lays out its tensors when the caller gives none)."""
    try:
        return ModelConfig(**saved)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{reader.index_path}: model_config: {e}") from None


def _load_param(reader: _Reader, name: str, p: nn.Parameter, tp: TensorParallel,
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
        buf[tuple(slice(0, b - a) for a, b in box)] = part.to(p.dtype)
    with torch.no_grad():
        p.copy_(buf)


def read_full_tensor(ckpt_dir: Path, name: str) -> torch.Tensor:
    """One full, unpadded global tensor, in its stored dtype."""
    with ExitStack() as stack:
        reader = _Reader(ckpt_dir, stack)
        if name not in reader.tensors:
            raise CheckpointError(f"{reader.index_path}: no tensor named {name!r}")
        return reader.read(name)


def iter_full_tensors(ckpt_dir: Path, names: Iterable[str] | None = None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, full tensor) in model order, one tensor in memory at a time (for exporters)."""
    with ExitStack() as stack:
        reader = _Reader(ckpt_dir, stack)
        wanted = list(reader.tensors) if names is None else list(names)
        for name in wanted:
            if name not in reader.tensors:
                raise CheckpointError(f"{reader.index_path}: no tensor named {name!r}")
            yield name, reader.read(name)


__all__ = [  # the commit protocol is re-exported so a trainer needs one import
    "FORMAT", "FORMAT_VERSION", "INDEX_NAME", "VOCAB_PADDED", "CheckpointError", "build_index",
    "checkpoint_writer", "dtype_name",
    "iter_full_tensors", "latest_checkpoint", "load_model_weights", "named_layers",
    "read_full_tensor", "read_index", "save_checkpoint_dir", "save_model_weights",
    "shard_file_name",
]
