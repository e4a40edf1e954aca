"""What a checkpoint file is, from its safetensors header alone: when a file differs from its
record in an index, whether it is another complete file of the checkpoint put in its place (its
header names it, or its size is what its header implies) rather than a truncated one. Reads the
header only, no tensor data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _read_header(path: Path) -> tuple[int, dict[str, Any]] | None:
    """(header length, parsed JSON header), or None when the file does not start with one."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= (100 << 20):
                return None
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return (n, header) if isinstance(header, dict) else None


def what_file_holds(path: Path, size: int) -> str:
    """Why a file differs from its record: another file of the checkpoint put in its place (its
    header names it, or it is a complete safetensors file), or "" (truncated or incomplete)."""
    found = _read_header(path)
    if found is None:
        return ""
    n, header = found
    meta = header.get("__metadata__")
    named = meta.get("file") if isinstance(meta, dict) else None
    if named and named != path.name:
        return f"it holds the data of {named} (files swapped or renamed?)"
    try:
        ends = [int(r["data_offsets"][1]) for k, r in header.items() if k != "__metadata__"]
    except (KeyError, TypeError, ValueError, IndexError):
        return ""
    if 8 + n + max(ends, default=0) == size:
        return "it is a complete safetensors file, but not the one listed (swapped or replaced?)"
    return ""


__all__ = ["what_file_holds"]
