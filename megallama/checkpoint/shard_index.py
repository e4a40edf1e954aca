"""The index of a megallama weights checkpoint (``model.index.json``) and reading global tensors,
or boxes of them, out of its safetensors shards.

The index records, for every tensor, its global shape, dtype, split dimension and the contiguous
range along it that each shard file holds, with each file's size and sha256; a reader verifies a
shard before its first use and assembles any box from the pieces that overlap it (safetensors'
lazy slices), so a loader at any layout reads only what it needs. The format is specified in
docs/CHECKPOINTS.md; :mod:`megallama.checkpoint.weights` writes and loads it for a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from megallama.checkpoint.atomic import (
    CheckpointError,
    read_json_object,
    size_mismatch,
    verify_file,
)
from megallama.config import ModelConfig
from megallama.config.grid import Grid

FORMAT = "megallama-weights"
FORMAT_VERSION = 1
INDEX_NAME = "model.index.json"
Box = list[tuple[int, int]]  # [start, stop) per dimension
# the dtypes weights are stored in: the index's name -> the safetensors header's
WEIGHT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class _HasGrid(Protocol):
    grid: Grid


def shard_file_name(pp_rank: int, tp_rank: int) -> str:
    """The shard written by DP rank 0 of pipeline stage ``pp_rank``, TP rank ``tp_rank``."""
    return f"model-pp{pp_rank:02d}-tp{tp_rank:02d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    """The index's name of a dtype ("bfloat16", "float32", ...)."""
    return str(dtype).removeprefix("torch.")


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


def build_index(metas: list[Any], cfg: ModelConfig, topo: _HasGrid,
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


def read_index(ckpt_dir: Path) -> dict[str, Any]:
    """The parsed and validated ``model.index.json`` of a weights checkpoint."""
    path = Path(ckpt_dir) / INDEX_NAME
    index = read_json_object(path, "checkpoint index", "checkpoint index not found (not a "
                             "weights checkpoint, or an incomplete one)")
    if index.get("format") != FORMAT:
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
            if Path(fname).name != fname or fname in (".", ".."):
                raise CheckpointError(f"{path}: file {fname!r} is not a file name beside the "
                                      "index")
        for name, entry in index["tensors"].items():
            _check_pieces(name, entry, path)
            for piece in entry["pieces"]:
                if piece["file"] not in index["files"]:
                    raise CheckpointError(f"{path}: {name}: file {piece['file']} not in 'files'")
            if entry["dtype"] not in WEIGHT_DTYPES:
                raise CheckpointError(f"{path}: {name}: dtype {entry['dtype']!r} is not one of "
                                      f"{', '.join(WEIGHT_DTYPES)} (not model weights)")
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        what = f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path}: malformed checkpoint index ({what})") from None
    return index


def check_stored(path: Path, name: str, view: Any, shape: list[int], dtype: str) -> None:
    """A shard's tensor (a safetensors slice) must have the shape and dtype the index gives its
    piece: an int8 tensor read into a bfloat16 buffer would be converted silently."""
    if list(view.get_shape()) != shape:
        raise CheckpointError(f"{path}: {name} has shape {list(view.get_shape())}, the index "
                              f"says {shape}")
    if view.get_dtype() != WEIGHT_DTYPES[dtype]:
        raise CheckpointError(f"{path}: {name} is stored as {view.get_dtype()}, the index says "
                              f"{dtype} ({WEIGHT_DTYPES[dtype]})")


Listed = dict[str, list[tuple[str, list[int], str]]]  # file -> (tensor key, shape, dtype)


def check_shard_headers(ckpt_dir: Path, index: dict[str, Any]) -> None:
    """Every shard the index lists has the recorded size and holds each of its pieces with the
    recorded shape and dtype -- sizes and headers only, so a damaged checkpoint is refused before
    anything is read from it (contents are sha256-checked when a shard is first read)."""
    listed: Listed = {f: [] for f in index["files"]}
    for name, entry in index["tensors"].items():
        for piece in entry["pieces"]:
            shape = list(entry["shape"])
            if entry["split_dim"] is not None:
                shape[entry["split_dim"]] = piece["length"]
            listed[piece["file"]].append((name, shape, entry["dtype"]))
    check_files(ckpt_dir, index["files"], listed, INDEX_NAME)


def check_files(ckpt_dir: Path, files: dict[str, Any], listed: Listed, index_name: str
                ) -> dict[str, dict[str, str]]:
    """Sizes and headers of the files an index lists (``files``: name -> its record, whose
    ``size`` is checked when present; ``listed``: the tensors each must hold, with shape and
    dtype); returns each file's header metadata. Reads headers only. A file whose header names
    another file is reported as swapped, not as damaged."""
    out = {}
    for fname, tensors in listed.items():
        path = Path(ckpt_dir) / fname
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{path}: checkpoint shard is missing (listed in "
                                  f"{index_name})") from None
        expected = files[fname].get("size")
        if expected is not None and size != expected:
            raise size_mismatch(path, size, expected, index_name)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("file", fname) != fname:
                    raise CheckpointError(f"{path}: holds the data of {meta['file']} (files "
                                          "swapped or renamed?)")
                stored = set(f.keys())
                for name, shape, dtype in tensors:
                    if name not in stored:
                        raise CheckpointError(f"{path}: tensor {name} is missing from the shard")
                    check_stored(path, name, f.get_slice(name), shape, dtype)
        except CheckpointError:
            raise
        except Exception as e:  # SafetensorError (a damaged header) / OSError
            raise CheckpointError(f"{path}: not a readable safetensors file "
                                  f"({str(e).splitlines()[0]})") from None
        out[fname] = meta
    return out


class ShardReader:
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
            check_stored(path, name, view, [pb - pa for pa, pb in pbox], entry["dtype"])
            src = tuple(slice(a - pa, b - pa) for (a, b), (pa, _) in zip(cut, pbox, strict=True))
            dst = tuple(slice(a - ba, b - ba) for (a, b), (ba, _) in zip(cut, box, strict=True))
            out[dst] = view[src]
        return out


def read_full_tensor(ckpt_dir: Path, name: str) -> torch.Tensor:
    """One full, unpadded global tensor, in its stored dtype."""
    with ExitStack() as stack:
        reader = ShardReader(ckpt_dir, stack)
        if name not in reader.tensors:
            raise CheckpointError(f"{reader.index_path}: no tensor named {name!r}")
        return reader.read(name)


def iter_full_tensors(ckpt_dir: Path, names: Iterable[str] | None = None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, full tensor) in model order, one tensor in memory at a time (for exporters)."""
    with ExitStack() as stack:
        reader = ShardReader(ckpt_dir, stack)
        wanted = list(reader.tensors) if names is None else list(names)
        for name in wanted:
            if name not in reader.tensors:
                raise CheckpointError(f"{reader.index_path}: no tensor named {name!r}")
            yield name, reader.read(name)
