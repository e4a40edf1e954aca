"""Meta's consolidated checkpoints (``consolidated.NN.pth`` + ``params.json``), streamed.

The K files are fairscale model-parallel shards: every file holds every tensor's K-th slice along
the dimension fairscale splits it (see :func:`megallama.interop.names.meta_split_dim`; the
embedding is split along the hidden dimension), norms whole, plus ``rope.freqs``.

Reading maps all K files with ``torch.load(mmap=True, weights_only=True)`` -- weights_only refuses a
pickle that would run code -- concatenates one tensor's slices into fresh memory and then drops the
mapped pages it touched (``madvise(MADV_DONTNEED)``; they are clean private file pages, so this only
evicts them from the process), so resident memory stays near one tensor instead of growing to the
file size. Writing uses torch's own zip writer record by record: the pickle describing every tensor
is built from the config first (placeholder objects that pickle exactly as torch.save pickles a
tensor), then each incoming tensor's K slices are appended to the K files as they arrive. The
output loads with plain ``torch.load`` (mmap or not) and has the layout torch.save produces.
"""

from __future__ import annotations

import collections
import ctypes
import io
import json
import mmap
import pickle
import re
import shutil
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megallama.checkpoint.atomic import CheckpointError
from megallama.config import ConfigError, ModelConfig
from megallama.interop.hf import check_rope_scaling
from megallama.interop.names import meta_split_dim, model_tensor_shapes

ROPE_FREQS = "rope.freqs"
_FILE_RE = re.compile(r"consolidated\.(\d+)\.pth")
# Meta's published model-parallel sizes, by model width: 7B/8B 1, 13B 2, 70B 8, 405B 8.
_DEFAULT_MP = {4096: 1, 5120: 2, 8192: 8, 16384: 8}
# Meta's Llama 3 code loads a checkpoint strictly and has no rope.freqs buffer: no rope.freqs is
# written for its models, those of the tiktoken vocabulary or its rope_theta.
LLAMA3_VOCAB, LLAMA3_THETA = 128256, 500000.0
_STORAGE_TYPES = {torch.float32: "FloatStorage", torch.bfloat16: "BFloat16Storage",
                  torch.float16: "HalfStorage"}


def default_mp(cfg: ModelConfig) -> int:
    """Meta's model-parallel size for this model width (1 for sizes Meta never published)."""
    return _DEFAULT_MP.get(cfg.dim, 1)


def check_mp(cfg: ModelConfig, mp: int, where: Path | str) -> None:
    """K shards must divide the query heads, the KV heads and every split width."""
    if mp < 1 or cfg.n_heads % mp or cfg.n_kv_heads % mp:
        raise CheckpointError(f"{where}: {mp} model-parallel shards do not divide n_heads="
                              f"{cfg.n_heads} and n_kv_heads={cfg.n_kv_heads}")
    for name, shape in model_tensor_shapes(cfg):
        dim = meta_split_dim(name)
        if dim is not None and shape[dim] % mp:
            raise CheckpointError(f"{where}: {name}: dim {dim} of {shape} is not divisible by "
                                  f"{mp} model-parallel shards")


def rope_freqs(cfg: ModelConfig, dtype: torch.dtype) -> torch.Tensor:
    """Meta's ``rope.freqs`` buffer: 1 / theta^(2i / head_dim), i < head_dim / 2."""
    hd = cfg.head_dim
    return (1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))).to(dtype)


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


def check_weight_dtype(path: Path, name: str, dtype: torch.dtype, first: torch.dtype) -> None:
    """A weight slice must be float32, bfloat16 or float16 (what every reader and writer handles;
    an integer or float64 tensor is not Llama weights) and of the dtype its first slice has."""
    def show(d: torch.dtype) -> str:
        return str(d).removeprefix("torch.")

    if dtype not in _STORAGE_TYPES:
        raise CheckpointError(f"{path}: {name}: dtype {show(dtype)} is not "
                              "float32/bfloat16/float16 (not Llama weights)")
    if dtype != first:
        raise CheckpointError(f"{path}: {name}: dtype {show(dtype)}, while the earlier shards "
                              f"store it as {show(first)}")


# ---- reader --------------------------------------------------------------------------------------
class MetaSource:
    """Streams (name, full tensor, file) out of a consolidated checkpoint after validating
    params.json, the shard count, the key sets and every slice shape."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        params_path = self.path / "params.json"
        if not params_path.is_file():
            raise CheckpointError(f"{params_path}: not found (Meta checkpoints ship one)")
        found = sorted((int(m.group(1)), p) for p in self.path.iterdir()
                       if (m := _FILE_RE.fullmatch(p.name)))
        if not found:
            raise CheckpointError(f"{self.path}: no consolidated.NN.pth files")
        if [i for i, _ in found] != list(range(len(found))):
            raise CheckpointError(f"{self.path}: shard numbers {[i for i, _ in found]} are not "
                                  f"00..{len(found) - 1:02d}: a shard is missing")
        self.files = [p for _, p in found]
        self.mp = len(self.files)
        self.shards = [load_mmap(p) for p in self.files]
        try:
            params = json.loads(params_path.read_text(encoding="utf-8"))
            if not isinstance(params, dict):
                raise ConfigError(f"expected a JSON object, got {type(params).__name__}")
            check_rope_scaling(params.get("rope_scaling"))
            self.config = ModelConfig.from_meta_params(params, vocab_size=self._vocab(params))
        except (json.JSONDecodeError, UnicodeDecodeError, ConfigError, TypeError) as e:
            raise CheckpointError(f"{params_path}: {e}") from None
        check_mp(self.config, self.mp, self.files[0])
        self.expected = model_tensor_shapes(self.config)
        self.names = [n for n, _ in self.expected]
        # tied (tie_word_embeddings in params.json): Meta's code still loads an output.weight,
        # which must then be the embedding; it is checked, not converted
        self.extra = {"output.weight"} if self.config.tie_embeddings else set()
        self._validate()
        first = self.shards[0]["tok_embeddings.weight"].dtype
        self.declared_dtype = first
        self.nbytes = sum(first.itemsize * torch.Size(s).numel() for _, s in self.expected)

    def _vocab(self, params: dict[str, Any]) -> Any:
        """params.json's vocab_size, or for Meta's -1 (or none) the embedding's row count: the
        tokenizer's size. A value of the wrong type is returned as is for ModelConfig to refuse."""
        vocab = params.get("vocab_size", -1)
        if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int)
                                  or vocab > 0):
            return vocab
        emb = self.shards[0].get("tok_embeddings.weight")
        if emb is None or emb.dim() != 2:
            raise ConfigError(f"vocab_size {vocab} and {self.files[0].name} has no 2-D "
                              "tok_embeddings.weight to take the vocabulary size from")
        return int(emb.shape[0])

    def _validate(self) -> None:
        want = set(self.names)
        dtypes: dict[str, torch.dtype] = {}
        for path, sd in zip(self.files, self.shards, strict=True):
            for key, t in sd.items():
                if key not in want and key != ROPE_FREQS and key not in self.extra:
                    raise CheckpointError(f"{path}: {key}: unexpected tensor (not a parameter of "
                                          "the params.json model)")
                if key in want:
                    check_weight_dtype(path, key, t.dtype, dtypes.setdefault(key, t.dtype))
            for name, shape in self.expected:
                if name not in sd:
                    raise CheckpointError(f"{path}: {name}: missing")
                dim = meta_split_dim(name)
                piece = list(shape)
                if dim is not None:
                    piece[dim] //= self.mp
                if list(sd[name].shape) != piece:
                    total = list(sd[name].shape)
                    if dim is not None:
                        total[dim] *= self.mp
                    hint = (f"; {self.mp} shards of it would make {total}" if dim is not None
                            else "")
                    raise CheckpointError(f"{path}: {name}: shape {list(sd[name].shape)}, expected "
                                          f"{piece} (params.json implies {shape} split over "
                                          f"{self.mp} shards{hint})")

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        for name in self.names:
            pieces = [sd[name] for sd in self.shards]
            dim = meta_split_dim(name)
            if dim is None:
                full = pieces[0].clone()
                for path, p in zip(self.files[1:], pieces[1:], strict=True):
                    if not torch.equal(p, full):
                        raise CheckpointError(f"{path}: {name}: replicated tensor differs from "
                                              f"{self.files[0].name}'s")
            else:
                full = torch.cat(pieces, dim=dim)
            for p in pieces:
                release_pages(p)
            del pieces
            if name == "tok_embeddings.weight" and self.extra:
                self._check_tied(full)
            yield name, full, str(self.files[0] if dim is None else self.path)

    def _check_tied(self, embedding: torch.Tensor) -> None:
        """A tied model's stored ``output.weight`` (if any) must equal the embedding."""
        if not all("output.weight" in sd for sd in self.shards):
            return
        head = torch.cat([sd["output.weight"] for sd in self.shards], dim=meta_split_dim(
            "output.weight"))
        if not torch.equal(head, embedding):
            raise CheckpointError(f"{self.path}: output.weight differs from tok_embeddings.weight "
                                  "but params.json says tie_word_embeddings; remove that field "
                                  "to convert an untied model")

    def close(self) -> None:
        self.shards = []


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
            return ("storage", getattr(torch, _STORAGE_TYPES[obj.dtype]), obj.key, "cpu",
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


class MetaSink:
    """Writes ``consolidated.00.pth`` ... ``consolidated.{K-1}.pth`` (every tensor's K-th slices,
    norms and ``rope.freqs`` whole in each), ``params.json`` and, if given, ``tokenizer.model``.
    All K files are open at once, so memory stays at one tensor and its slices."""

    def __init__(self, out: Path, cfg: ModelConfig, dtype: torch.dtype, mp: int,
                 tokenizer: Path | None = None) -> None:
        self.out, self.cfg, self.dtype, self.mp = Path(out), cfg, dtype, mp
        check_mp(cfg, mp, self.out)
        plans: list[list[tuple[str, torch.dtype, list[int]]]] = [[] for _ in range(mp)]
        shapes = model_tensor_shapes(cfg)
        if cfg.tie_embeddings:  # Meta's code needs output.weight: the embedding, written twice
            shapes.insert(1, ("output.weight", shapes[0][1]))
        self.rope_freqs = cfg.vocab_size != LLAMA3_VOCAB and cfg.rope_theta != LLAMA3_THETA
        for name, shape in shapes + [(ROPE_FREQS, [cfg.head_dim // 2])] * self.rope_freqs:
            dim = meta_split_dim(name)
            piece = list(shape)
            if dim is not None:
                piece[dim] //= mp
            for plan in plans:
                plan.append((name, dtype, piece))
        self.files = [TorchZipStream(self.out / f"consolidated.{k:02d}.pth", plans[k])
                      for k in range(mp)]
        self.tokenizer = tokenizer

    def write(self, name: str, t: torch.Tensor) -> None:
        dim = meta_split_dim(name)
        pieces = [t] * self.mp if dim is None else t.chunk(self.mp, dim=dim)
        for f, piece in zip(self.files, pieces, strict=True):
            f.write(name, piece)
        if name == "tok_embeddings.weight" and self.cfg.tie_embeddings:
            self.write("output.weight", t)

    def finish(self) -> None:
        freqs = rope_freqs(self.cfg, self.dtype)
        for f in self.files:
            if self.rope_freqs:
                f.write(ROPE_FREQS, freqs)
            f.close()
        params = self.cfg.to_meta_params()
        (self.out / "params.json").write_text(json.dumps(params) + "\n")
        if self.tokenizer is not None:
            src = Path(self.tokenizer)
            src = src / "tokenizer.model" if src.is_dir() else src
            if not src.is_file():
                raise CheckpointError(f"{src}: tokenizer.model not found")
            shutil.copyfile(src, self.out / "tokenizer.model")

    def abort(self) -> None:
        self.files = []
