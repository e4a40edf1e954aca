"""The index of optimizer state saved as pieces (``pieces.index.json``), checked like the weights
index: the boxes of every tensor tile it exactly, every file's size and sha256 are recorded and
checked before first use, and the index is checked against the files it lists.

Version 2 (written now) adds, beside version 1's records: the state the directory holds
(``"state": "exp_avg"``) and, in each file's safetensors metadata, the file's own name, that state
and the box of each of its tensors -- so a file put in another's place, an index whose boxes or
files were swapped, or two state directories swapped, are refused instead of loading wrong state.
Version 1 indexes still load (their files' records are checked where present). The format is
specified in docs/CHECKPOINTS.md; :mod:`megallama.checkpoint.optim_pieces` writes and loads it.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from megallama.checkpoint.atomic import CheckpointError, read_json_object, verify_file
from megallama.checkpoint.shard_index import Listed, check_files, check_stored

FORMAT, FORMAT_VERSION, INDEX_NAME = "megallama-optim-pieces", 2, "pieces.index.json"
READABLE_VERSIONS = (1, 2)
Box = list[list[int]]  # [start, stop) per dimension


def has_pieces(key_dir: Path) -> bool:
    """Whether ``key_dir`` holds state in the pieces format (its index is there)."""
    return (Path(key_dir) / INDEX_NAME).is_file()


def _spans_tile(spans: list[tuple[int, int]], cols: int) -> str:
    """"" when the sorted ``spans`` tile ``[0, cols)`` exactly, else what is wrong."""
    at = 0
    for a, b in sorted(spans):
        if a != at:
            return f"overlap at {a}" if a < at else f"leave [{at}, {a}) uncovered"
        at = b
    return "" if at == cols else f"leave [{at}, {cols}) uncovered"


def _boxes(name: str, entry: dict[str, Any], where: Path | str
           ) -> tuple[int, int, list[tuple[tuple[int, int], tuple[int, int]]]]:
    """(rows, cols, boxes as ((r0, r1), (c0, c1))) of a 1-D or 2-D tensor's pieces, each checked
    to lie inside the tensor."""
    shape = entry["shape"]
    if not (isinstance(shape, list) and len(shape) in (1, 2)
            and all(isinstance(n, int) and n > 0 for n in shape)):
        raise CheckpointError(f"{where}: {name}: shape {shape} is not a 1-D or 2-D shape")
    out = []
    for piece in entry["pieces"]:
        box = piece["box"]
        if not (isinstance(box, list) and len(box) == len(shape) and all(
                isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r)
                and 0 <= r[0] < r[1] <= n for r, n in zip(box, shape, strict=False))):
            raise CheckpointError(f"{where}: {name}: piece box {box} outside its shape {shape}")
        out.append(((0, 1), tuple(box[0])) if len(shape) == 1 else (tuple(box[0]), tuple(box[1])))
    rows, cols = (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])
    return rows, cols, out  # type: ignore[return-value]


def check_tiling(name: str, entry: dict[str, Any], where: Path | str) -> None:
    """The boxes of a tensor's pieces must tile it exactly: no overlap, no gap. A sweep over the
    rows where boxes start or end: within each band the boxes' column spans tile the row."""
    rows, cols, boxes = _boxes(name, entry, where)
    cuts = sorted({0, rows} | {r for (r0, r1), _ in boxes for r in (r0, r1)})
    boxes.sort()
    active: list[tuple[tuple[int, int], tuple[int, int]]] = []
    i = 0
    for y, nxt in zip(cuts, cuts[1:], strict=False):
        active = [b for b in active if b[0][1] > y]
        while i < len(boxes) and boxes[i][0][0] == y:
            active.append(boxes[i])
            i += 1
        if wrong := _spans_tile([b[1] for b in active], cols):
            band = f"rows [{y}, {nxt}): " if len(entry["shape"]) == 2 else ""
            raise CheckpointError(f"{where}: {name}: the pieces' boxes do not tile its shape "
                                  f"{entry['shape']}: {band}they {wrong} (a piece missing or "
                                  "saved twice, or an edited index)")


def read_pieces_index(key_dir: Path, state: str | None = None) -> dict[str, Any]:
    """The parsed and validated ``pieces.index.json`` of ``key_dir``: format and version, the
    state it holds (``state``, when the index records one), every tensor's boxes tiling it, every
    piece's file recorded in ``files`` (size and sha256 required from version 2)."""
    path = Path(key_dir) / INDEX_NAME
    index = read_json_object(path, "optimizer pieces index", "optimizer pieces index not found "
                             "(deleted, or an incomplete checkpoint)")
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} index")
    version = index.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: format_version {version} is not supported (this reader "
                              f"knows {', '.join(map(str, READABLE_VERSIONS))})")
    if state is not None and index.get("state", state) != state:
        raise CheckpointError(f"{path}: holds the {index['state']} state, not {state} (optimizer "
                              "state directories swapped or renamed?)")
    try:
        _check_entries(index, path, version)
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: malformed optimizer pieces index "
                              f"({type(e).__name__}: {e})") from None
    return index


def _check_entries(index: dict[str, Any], path: Path, version: int) -> None:
    files = index.setdefault("files", {}) if version == 1 else index["files"]
    for fname, rec in files.items():
        if Path(fname).name != fname or fname in (".", ".."):
            raise CheckpointError(f"{path}: file {fname!r} is not a file name beside the index")
        if version > 1 and not (isinstance(rec["size"], int) and isinstance(rec["sha256"], str)):
            raise TypeError(f"files[{fname!r}] needs an integer size and a sha256 string")
    for name, entry in index["tensors"].items():
        if entry["dtype"] != "float32":
            raise CheckpointError(f"{path}: {name}: dtype {entry['dtype']!r}, optimizer state "
                                  "is float32")
        check_tiling(name, entry, path)
        for piece in entry["pieces"]:
            if not isinstance(piece["key"], str):
                raise TypeError(f"{name}: a piece's key is not a string")
            if piece["key"].rpartition("@")[0] != name:
                raise CheckpointError(f"{path}: {name}: piece {piece['key']} is another "
                                      "tensor's (an edited index: pieces swapped?)")
            if piece["file"] not in files:
                if version > 1:
                    raise CheckpointError(f"{path}: {name}: file {piece['file']} not in 'files'")
                files[piece["file"]] = {}  # version 1 without a record: nothing to check


def _header_boxes(meta: dict[str, str], path: Path) -> dict[str, Box] | None:
    """The boxes a version-2 file records for its tensors (None for a version-1 file)."""
    if "boxes" not in meta:
        return None
    try:
        return json.loads(meta["boxes"])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its header's box records are not valid JSON") from None


def _check_against_header(meta: dict[str, str], path: Path, index_path: Path, state: str | None,
                          pieces: list[tuple[str, Box]]) -> None:
    """A version-2 file's own records (state, boxes) must be what the index says of it."""
    if state is not None and meta.get("state", state) != state:
        raise CheckpointError(f"{path}: holds {meta['state']} state, not {state} (files or "
                              "directories swapped?)")
    boxes = _header_boxes(meta, path)
    if boxes is None:
        return
    for key, box in pieces:
        _check_box(boxes, key, box, path, index_path)


def _check_box(recorded: dict[str, Box], key: str, box: Box, path: Path, index_path: Path) -> None:
    if recorded.get(key) != box:
        raise CheckpointError(f"{index_path}: piece {key} in {path.name}: box {box}, but the "
                              f"file records {recorded.get(key)} (an edited index: boxes or "
                              "files swapped?)")


def _listed(index: dict[str, Any]) -> tuple[Listed, dict[str, list[tuple[str, Box]]]]:
    listed: Listed = {f: [] for f in index["files"]}
    boxes: dict[str, list[tuple[str, Box]]] = {f: [] for f in index["files"]}
    for entry in index["tensors"].values():
        for piece in entry["pieces"]:
            dims = [b - a for a, b in piece["box"]]
            listed[piece["file"]].append((piece["key"], dims, "float32"))
            boxes[piece["file"]].append((piece["key"], piece["box"]))
    return listed, boxes


def check_piece_files(key_dir: Path, index: dict[str, Any], state: str | None = None) -> None:
    """The files against the index, reading headers only: each exists with its recorded size,
    holds every piece the index places in it with the box's shape, as float32, and (version 2)
    records the same name, state and boxes. Checksums are checked when a file is first read."""
    key_dir = Path(key_dir)
    listed, boxes = _listed(index)
    metas = check_files(key_dir, index["files"], listed, str(key_dir / INDEX_NAME))
    for fname, meta in metas.items():
        _check_against_header(meta, key_dir / fname, key_dir / INDEX_NAME, state, boxes[fname])


class PieceReader:
    """Reads boxes of global tensors from a pieces directory, each file verified (size, sha256,
    header records) before its first use."""

    def __init__(self, key_dir: Path, stack: ExitStack, state: str | None = None) -> None:
        self.dir, self._stack, self._open = Path(key_dir), stack, {}
        self.index_path, self.state = self.dir / INDEX_NAME, state
        self.index = read_pieces_index(self.dir, state)
        self.tensors: dict[str, Any] = self.index["tensors"]
        self._boxes: dict[str, dict[str, Box] | None] = {}

    def _file(self, fname: str) -> Any:
        if fname not in self._open:
            rec, path = self.index["files"][fname], self.dir / fname
            verify_file(path, rec.get("size"), rec.get("sha256"), listed_in=self.index_path)
            try:
                f = self._stack.enter_context(safe_open(path, framework="pt"))
            except Exception as e:  # SafetensorError is not importable portably
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
            meta = f.metadata() or {}
            if meta.get("file", fname) != fname:
                raise CheckpointError(f"{path}: holds the data of {meta['file']} (files swapped "
                                      "or renamed?)")
            _check_against_header(meta, path, self.index_path, self.state, [])
            self._open[fname], self._boxes[fname] = f, _header_boxes(meta, path)
        return self._open[fname]

    def _view(self, piece: dict[str, Any]) -> Any:
        f, path = self._file(piece["file"]), self.dir / piece["file"]
        recorded = self._boxes[piece["file"]]
        if recorded is not None:
            _check_box(recorded, piece["key"], piece["box"], path, self.index_path)
        try:
            view = f.get_slice(piece["key"])
        except Exception:
            raise CheckpointError(f"{path}: tensor {piece['key']} is missing from the "
                                  "file") from None
        check_stored(path, piece["key"], view, [b - a for a, b in piece["box"]], "float32")
        return view

    def read(self, name: str, box: Box) -> torch.Tensor:
        """``tensor[box]`` of global tensor ``name`` as fp32, from the overlapping pieces."""
        out = torch.zeros([b - a for a, b in box], dtype=torch.float32)
        for piece in self.tensors[name]["pieces"]:
            pbox = piece["box"]
            cut = [(max(a, pa), min(b, pb)) for (a, b), (pa, pb) in zip(box, pbox, strict=True)]
            if any(a >= b for a, b in cut):
                continue
            view = self._view(piece)
            src = tuple(slice(a - pa, b - pa) for (a, b), (pa, _) in zip(cut, pbox, strict=True))
            dst = tuple(slice(a - ba, b - ba) for (a, b), (ba, _) in zip(cut, box, strict=True))
            out[dst] = view[src]
        return out


__all__ = ["FORMAT", "FORMAT_VERSION", "INDEX_NAME", "READABLE_VERSIONS", "PieceReader",
           "check_piece_files", "check_tiling", "has_pieces", "read_pieces_index"]
