"""torch.save's zip format, read and written without holding a whole file in memory: the
mechanics under Meta's consolidated ``.pth`` shards (:mod:`megallama.interop.meta`).

Reading: :func:`load_mmap` is ``torch.load(mmap=True, weights_only=True)`` with one-line errors
and a check that every storage record holds the bytes its tensors need (a scan of the pickle that
imports and runs nothing); :func:`release_pages` drops the mapped pages a copied tensor touched.
Writing: :class:`TorchZipStream` writes the pickle first (placeholder objects that pickle exactly
as torch.save pickles a tensor), then each tensor's record as it arrives; the output loads with
plain ``torch.load`` and has the layout torch.save produces.
"""

from __future__ import annotations

import collections
import ctypes
import io
import mmap
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from megallama.checkpoint.atomic import CheckpointError

# the weight dtypes Meta's shards hold, and torch's pickled storage class of each
STORAGE_TYPES = {torch.float32: "FloatStorage", torch.bfloat16: "BFloat16Storage",
                 torch.float16: "HalfStorage"}


# ---- dropping mapped pages -----------------------------------------------------------------------
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def release_pages(t: torch.Tensor) -> None:
    """Drop the resident pages of a tensor that lives in a private, read-only file mapping (whole
    pages inside it only). A later read would fault them back in from the file. No-op off Linux."""
    if _libc is None:
        return
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    lo, hi = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if hi > lo:
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


class _Anything:
    """Stands in for every object of a pickle being scanned: it can be called, filled and built,
    and nothing it stands for is ever imported or run."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> _Anything:
        return _Anything()

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _StorageScan(pickle.Unpickler):
    """Collects the storages a torch pickle declares: (key, element type name, element count)."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.storages: list[tuple[str, str, int]] = []

    def find_class(self, module: str, name: str) -> Any:
        return _Anything(name)

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            self.storages.append((str(pid[2]), getattr(pid[1], "name", ""), int(pid[4])))
        return _Anything()


_STORAGE_BYTES = {"FloatStorage": 4, "BFloat16Storage": 2, "HalfStorage": 2, "DoubleStorage": 8,
                  "UntypedStorage": 1, "ByteStorage": 1, "CharStorage": 1, "ShortStorage": 2,
                  "IntStorage": 4, "LongStorage": 8, "BoolStorage": 1}


def check_storage_records(path: Path) -> None:
    """Every storage the pickle declares must have all its bytes in the zip record that holds it.

    ``torch.load(mmap=True)`` maps records by the sizes the pickle declares and skips the record
    size check plain ``torch.load`` makes, so a short record would yield tensors built from the
    bytes that follow it: checked here from the zip directory and a scan of the pickle (which
    imports and runs nothing)."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl")), None)
            if pkl is None:
                raise CheckpointError(f"{path}: not a torch zip checkpoint (no data.pkl)")
            scan = _StorageScan(io.BytesIO(z.read(pkl)))
            scan.load()
            prefix = pkl[: -len("data.pkl")]
            sizes = {info.filename: info.file_size for info in z.infolist()}
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from None
    for key, kind, numel in scan.storages:
        need = numel * _STORAGE_BYTES.get(kind, 1)
        have = sizes.get(f"{prefix}data/{key}")
        if have is None or have < need:
            raise CheckpointError(f"{path}: storage {key} holds {have or 0} bytes, its tensors "
                                  f"need {need} ({numel} x {kind}): the file is truncated or "
                                  "damaged")


def load_mmap(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(path, mmap=True, weights_only=True)`` with one-line errors; a pickle that
    references code (a GLOBAL outside torch's allow-list) is refused, and every storage record is
    checked to hold the bytes its tensors need (:func:`check_storage_records`)."""
    check_storage_records(path)
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"(?:unsupported|Unsupported global:) (GLOBAL [\w.]+)", str(e))
        lines = [x for x in str(e).splitlines() if x.strip()]
        what = m.group(1) if m else (lines[1] if len(lines) > 1 else lines[0] if lines else "")
        raise CheckpointError(f"{path}: refused to unpickle, it references code ({what}); "
                              "only plain tensor checkpoints are read") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint "
                              f"({str(e).splitlines()[0]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a dict of tensors")
    return sd


# ---- writer --------------------------------------------------------------------------------------
class _StorageRef:
    """Stands for a storage in the pickle (persistent id), like torch.save's storages."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles exactly as a contiguous CPU tensor does under torch.save."""

    def __init__(self, storage: _StorageRef, shape: list[int]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        args = (self.storage, 0, tuple(self.shape), tuple(reversed(stride)), False,
                collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> tuple[Any, ...] | None:
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, STORAGE_TYPES[obj.dtype]), obj.key, "cpu",
                    obj.numel)
        return None


class TorchZipStream:
    """One torch.save-format file written record by record: the pickle first, then each tensor's
    data as it arrives, in key order (the order torch.save and its mmap loader use)."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, list[int]]]) -> None:
        self.path, self._plan, self._next = Path(path), plan, 0
        refs = {name: _TensorRef(_StorageRef(str(i), dt, torch.Size(shape).numel()), shape)
                for i, (name, dt, shape) in enumerate(plan)}
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(refs)
        self._w = torch._C.PyTorchFileWriter(str(self.path), True, 64)
        for rec, data in (("data.pkl", buf.getvalue()), (".format_version", b"1"),
                          (".storage_alignment", b"64"), ("byteorder", sys.byteorder.encode())):
            self._w.write_record(rec, data, len(data))

    def write(self, name: str, t: torch.Tensor) -> None:
        want, dtype, shape = self._plan[self._next]
        if (name, t.dtype, list(t.shape)) != (want, dtype, shape):
            raise CheckpointError(f"{self.path}: got {name} {t.dtype} {list(t.shape)}, expected "
                                  f"{want} {dtype} {shape} next")
        nbytes = t.numel() * t.element_size()
        if not t.is_contiguous() or t.storage_offset() or t.untyped_storage().nbytes() != nbytes:
            t = t.clone(memory_format=torch.contiguous_format)  # a record is a whole storage
        self._w.write_record(f"data/{self._next}", t.untyped_storage(), nbytes)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._plan):
            raise CheckpointError(f"{self.path}: {len(self._plan) - self._next} planned tensors "
                                  "never written")
        self._w.write_end_of_file()
        del self._w
