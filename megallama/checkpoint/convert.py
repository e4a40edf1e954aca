"""Streaming conversion between Meta consolidated, Hugging Face and megallama checkpoints.

Every format has a *source* that validates its input up front (key set and every shape against
the config, from headers or lazy maps only) and then yields ``(meta_name, full tensor, file)`` one
tensor at a time, in model order and Meta's layout, and a *sink* that consumes that stream. The
sinks plan their files from the config before the first tensor arrives, so no output file is ever
assembled in memory: peak memory is about one input tensor (plus the mapped pages being copied)
and its converted copy, whatever the model size. Output goes to a temporary sibling directory that
is renamed to the destination only when everything is written and fsynced.

The megallama sink writes exactly what ``save_model_weights`` writes from a tp x pp world: the same
shard names, the same per-(stage, TP rank) slices (``_placement``'s rules: vocabulary padding never
stored, a replicated KV slice stored by its first replica only), the same index built by the same
code. Its stage cuts are the trainer's (``balanced_cuts`` over ``layer_costs``); the loader reads
any layout, so they only decide which file holds which layer.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import torch

from megallama.checkpoint.atomic import CheckpointError, fsync_dir, fsync_file, write_text_atomic
from megallama.checkpoint.hf import HFSink, HFSource, SafetensorsStream, nbytes_of
from megallama.checkpoint.meta import MetaSink, MetaSource, check_mp, default_mp
from megallama.checkpoint.names import model_tensor_shapes, tp_split_dim
from megallama.checkpoint.weights import (
    FORMAT,
    INDEX_NAME,
    VOCAB_PADDED,
    build_index,
    dtype_name,
    read_full_tensor,
    read_index,
    shard_file_name,
)
from megallama.config import ConfigError, ModelConfig
from megallama.config.grid import Grid
from megallama.parallel.layers import padded_vocab_size

FORMATS = ("meta", "hf", "megallama")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Source(Protocol):
    """A validated input: its config, the dtype an output keeps by default, its size in bytes,
    and (Meta name, full tensor in Meta layout, file it came from) in model order."""

    config: ModelConfig
    declared_dtype: torch.dtype
    nbytes: int

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, str]]: ...


class Sink(Protocol):
    """An output planned from the config: takes every tensor once, in model order."""

    def write(self, name: str, t: torch.Tensor) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None: ...


# ---- megallama -----------------------------------------------------------------------------------
class MegallamaSource:
    """Streams full tensors out of a megallama weights checkpoint (any layout). Each tensor is read
    with the package's own reader, whose shards are opened per tensor and sha256-checked once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        index = read_index(self.path)
        try:
            self.config = ModelConfig(**index["model_config"])
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{self.path / INDEX_NAME}: model_config: {e}") from None
        tensors = index["tensors"]
        expected = model_tensor_shapes(self.config)
        for name, shape in expected:
            if name not in tensors:
                raise CheckpointError(f"{self.path / INDEX_NAME}: {name}: missing")
            if tensors[name]["shape"] != shape:
                raise CheckpointError(f"{self.path / INDEX_NAME}: {name}: shape "
                                      f"{tensors[name]['shape']}, model_config implies {shape}")
        extra = sorted(set(tensors) - {n for n, _ in expected})
        if extra:
            raise CheckpointError(f"{self.path / INDEX_NAME}: {extra[0]}: unexpected tensor")
        self.names = [n for n, _ in expected]
        self.dtypes = {n: getattr(torch, tensors[n]["dtype"]) for n in self.names}
        self.declared_dtype = self.dtypes[self.names[0]]
        self.nbytes = sum(nbytes_of(tensors[n]["shape"], self.dtypes[n]) for n in self.names)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        for name in self.names:
            yield name, read_full_tensor(self.path, name), str(self.path / INDEX_NAME)


def layer_names(cfg: ModelConfig) -> list[str]:
    """The model's ordered layer list, as ``layer_defs`` names it."""
    return ["tok_embeddings"] + [f"layers.{i}" for i in range(cfg.n_layers)] + ["norm", "output"]


def stage_cuts(cfg: ModelConfig, pp: int, seq_len: int | None = None) -> list[int]:
    """The trainer's pipeline stage boundaries over [embedding, blocks..., norm, head]."""
    from megallama.engine.pipeline import balanced_cuts, layer_costs  # imports deepspeed

    names = layer_names(cfg)
    costs = layer_costs(cfg, seq_len or cfg.max_seq_len, names)
    try:
        return balanced_cuts(costs, [n.startswith("layers.") for n in names], pp)
    except ValueError as e:
        raise CheckpointError(f"--pp {pp}: {e} (the model has {cfg.n_layers})") from None


def _layer_of(name: str) -> str:
    return ".".join(name.split(".")[:2]) if name.startswith("layers.") else name.split(".")[0]


def megallama_pieces(name: str, shape: list[int], cfg: ModelConfig,
                     tp: int) -> list[tuple[int, int | None, int, int]]:
    """(tp rank, split dim, offset, length) of every stored piece of a global tensor at ``tp``:
    what the ranks that are first to hold a slice store (weights.py's ``_placement`` rules)."""
    dim = tp_split_dim(name)  # set whatever tp is: at tp=1 a single piece along it
    if dim is None:
        return [(0, None, 0, shape[0])]
    replicas = max(1, tp // cfg.n_kv_heads) if name.endswith(("wk.weight", "wv.weight")) else 1
    parts = tp // replicas
    full = padded_vocab_size(shape[0], tp) if name in VOCAB_PADDED else shape[dim]
    local = full // parts
    out = []
    for index in range(parts):
        offset = index * local
        length = min(local, shape[dim] - offset)
        if length > 0:  # a slice that is all vocabulary padding is not stored
            out.append((index * replicas, dim, offset, length))
    return out


class MegallamaSink:
    """Writes ``model-ppXX-tpYY.safetensors`` shards and ``model.index.json`` as a tp x pp world's
    ``save_model_weights`` would; all TP shards of the current stage are open at once."""

    def __init__(self, out: Path, cfg: ModelConfig, dtype: torch.dtype, tp: int, pp: int,
                 seq_len: int | None = None, extra: dict[str, Any] | None = None) -> None:
        self.out, self.cfg, self.dtype, self.tp, self.pp = Path(out), cfg, dtype, tp, pp
        self.extra = extra or {}
        cuts = stage_cuts(cfg, pp, seq_len)
        layer_stage = {}
        names = layer_names(cfg)
        for stage in range(pp):
            for i in range(cuts[stage], cuts[stage + 1]):
                layer_stage[names[i]] = stage
        self.plans: dict[tuple[int, int], list[tuple[str, torch.dtype, list[int]]]] = {}
        self.entries: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
        self.routes: dict[str, list[tuple[tuple[int, int], int | None, int, int]]] = {}
        for name, shape in model_tensor_shapes(cfg):
            stage = layer_stage[_layer_of(name)]
            for rank, dim, offset, length in megallama_pieces(name, shape, cfg, tp):
                key = (stage, rank)
                local = list(shape)
                local[0 if dim is None else dim] = length
                self.plans.setdefault(key, []).append((name, dtype, local))
                self.entries.setdefault(key, {})[name] = {
                    "shape": shape, "dtype": dtype_name(dtype), "split_dim": dim,
                    "offset": offset, "length": length}
                self.routes.setdefault(name, []).append((key, dim, offset, length))
        self._open: dict[tuple[int, int], SafetensorsStream] = {}
        self._metas: list[dict[str, Any]] = []

    def _stream(self, key: tuple[int, int]) -> SafetensorsStream:
        if key not in self._open:
            for old in [k for k in self._open if k[0] != key[0]]:  # a stage is done: close it
                self._close(old)
            path = self.out / shard_file_name(*key)
            self._open[key] = SafetensorsStream(path, self.plans[key],
                                                {"format": "pt", "writer": FORMAT}, sha256=True)
        return self._open[key]

    def _close(self, key: tuple[int, int]) -> None:
        size, sha = self._open.pop(key).close()
        self._metas.append({"file": shard_file_name(*key), "size": size, "sha256": sha,
                            "tensors": self.entries[key]})

    def write(self, name: str, t: torch.Tensor) -> None:
        for key, dim, offset, length in self.routes[name]:
            piece = t if dim is None else t.narrow(dim, offset, length)
            self._stream(key).write(name, piece)

    def finish(self) -> None:
        for key in list(self._open):
            self._close(key)
        topo = SimpleNamespace(grid=Grid(tp=self.tp, pp=self.pp, dp=1))
        index = build_index(self._metas, self.cfg, topo, self.extra, self.out)  # type: ignore
        write_text_atomic(self.out / INDEX_NAME, json.dumps(index, indent=1) + "\n")

    def abort(self) -> None:
        for stream in self._open.values():
            stream.abort()


# ---- conversion ----------------------------------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, Path]:
    """``FORMAT:PATH`` -> (format, path)."""
    fmt, sep, path = spec.partition(":")
    if not sep or fmt not in FORMATS or not path:
        raise CheckpointError(f"{spec!r}: expected FORMAT:PATH with FORMAT one of "
                              f"{', '.join(FORMATS)}")
    return fmt, Path(path)


def open_source(fmt: str, path: Path) -> Source:
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    return {"meta": MetaSource, "hf": HFSource, "megallama": MegallamaSource}[fmt](path)


def loses_information(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether casting ``src`` values to ``dst`` can change some of them (range or precision)."""
    a, b = torch.finfo(src), torch.finfo(dst)
    return b.eps > a.eps or b.max < a.max or b.smallest_normal > a.smallest_normal


class Progress:
    """A one-line progress bar with bytes/s on stderr (redrawn at most every 0.5 s)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.start = self._last = time.monotonic()

    def update(self, n: int, name: str) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.5 or self.done >= self.total):
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            frac = self.done / max(self.total, 1)
            bar = "#" * int(frac * 30)
            unit, div = ("GB", 1e9) if self.total >= 1e9 else ("MB", 1e6)
            sys.stderr.write(f"\r[{bar:<30}] {self.done / div:7.2f}/{self.total / div:.2f} {unit} "
                             f"{rate / 1e6:8.1f} MB/s  {name[:40]:<40}")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def check_layout(fmt: str, where: Path, cfg: ModelConfig, tp: int, pp: int,
                 mp: int | None) -> None:
    """Refuse an output layout that cannot split this model, before anything is written."""
    from megallama.config import check_tp_layout

    if fmt == "meta":
        check_mp(cfg, mp or default_mp(cfg), where)
        if cfg.rope_scaling is not None:  # Meta's params.json has no field for it
            raise CheckpointError(f"{where}: rope_scaling {cfg.rope_scaling} cannot be expressed "
                                  "in Meta's params.json; convert to hf or megallama instead")
    elif fmt == "megallama":
        try:
            check_tp_layout(cfg, tp)
        except ConfigError as e:
            raise CheckpointError(f"{where}: --tp {tp}: {e}") from None
        if not 1 <= pp <= cfg.n_layers:
            raise CheckpointError(f"{where}: --pp {pp}: need 1 <= pp <= n_layers={cfg.n_layers}")


def convert(src: str, dst: str, *, tp: int = 1, pp: int = 1, mp: int | None = None,
            dtype: str | None = None, max_shard_size: int = 5 * 10**9,
            tokenizer: Path | None = None, seq_len: int | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Convert checkpoint ``src`` (``FORMAT:PATH``) to ``dst``; returns a small report
    (bytes, seconds, tensors). ``dtype`` (bf16/fp16/fp32) casts every tensor; without it the output
    keeps the source's dtype and a tensor that would lose information raises. Raises
    :class:`CheckpointError` with a one-line message naming the file and key."""
    src_fmt, src_path = parse_spec(src)
    dst_fmt, dst_path = parse_spec(dst)
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if dst_path.exists():
        raise CheckpointError(f"{dst_path}: already exists; choose a new destination")
    if tokenizer is not None and not Path(tokenizer).exists():
        raise CheckpointError(f"{tokenizer}: tokenizer not found")
    t0 = time.monotonic()
    source = open_source(src_fmt, src_path)
    cfg = source.config
    out_dtype = DTYPES[dtype] if dtype else source.declared_dtype
    check_layout(dst_fmt, dst_path, cfg, tp, pp, mp)
    tmp = dst_path.with_name(f".{dst_path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sink: Sink | None = None
    try:
        if dst_fmt == "meta":
            sink = MetaSink(tmp, cfg, out_dtype, mp or default_mp(cfg), tokenizer)
        elif dst_fmt == "hf":
            sink = HFSink(tmp, cfg, out_dtype, max_shard_size, tokenizer)
        else:
            extra = {"converted_from": f"{src_fmt}:{src_path}"}
            sink = MegallamaSink(tmp, cfg, out_dtype, tp, pp, seq_len, extra)
        bar = Progress(source.nbytes, progress)
        count = 0
        for name, t, where in source:
            if t.dtype != out_dtype:
                if dtype is None and loses_information(t.dtype, out_dtype):
                    raise CheckpointError(
                        f"{where}: {name}: stored as {dtype_name(t.dtype)}, the output is "
                        f"{dtype_name(out_dtype)}: the cast would lose information; pass --dtype "
                        "to accept it")
                t = t.to(out_dtype)
            sink.write(name, t)
            bar.update(t.numel() * t.element_size(), name)
            count += 1
            del t
        sink.finish()
        if dst_fmt == "megallama" and tokenizer is not None:
            src_tok = Path(tokenizer)
            src_tok = src_tok / "tokenizer.model" if src_tok.is_dir() else src_tok
            shutil.copyfile(src_tok, tmp / "tokenizer.model")
        for p in tmp.iterdir():
            fsync_file(p)
        fsync_dir(tmp)
        os.rename(tmp, dst_path)
        fsync_dir(dst_path.parent)
    except BaseException:
        if sink is not None:
            sink.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"src": src, "dst": dst, "tensors": count, "bytes": bar.done,
            "seconds": time.monotonic() - t0}
