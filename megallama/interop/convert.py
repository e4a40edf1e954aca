"""Streaming conversion between Meta consolidated, Hugging Face and megallama checkpoints.

Every format has a *source* that validates its input up front (key set and every shape against
the config, from headers or lazy maps only) and then yields ``(meta_name, full tensor, file)`` one
tensor at a time, in model order and Meta's layout, and a *sink* that consumes that stream. The
sinks plan their files from the config before the first tensor arrives, so no output file is ever
assembled in memory: peak memory is about one input tensor (plus the mapped pages being copied)
and its converted copy, whatever the model size. Output goes to a temporary sibling directory that
is renamed to the destination only when everything is written and fsynced.

The megallama sink writes exactly what ``save_model_weights`` writes from a tp x pp world: the same
shard names, the same per-(stage, TP rank) slices (both read them from ``model.layout.shard_spec``:
vocabulary padding never stored, a replicated KV slice stored by its first replica only), the same
index built by the same code. Its stage cuts are the trainer's (``model.layout.stage_cuts``); the
loader reads any layout, so they only decide which file holds which layer.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import torch

from megallama.checkpoint.atomic import CheckpointError, write_text_atomic
from megallama.checkpoint.lookup import find_checkpoint
from megallama.checkpoint.shard_index import check_shard_headers
from megallama.checkpoint.weights import (
    FORMAT,
    INDEX_NAME,
    build_index,
    dtype_name,
    read_full_tensor,
    read_index,
    shard_file_name,
)
from megallama.config import ConfigError, ModelConfig, check_tp_layout
from megallama.config.grid import Grid
from megallama.data.progress_bar import progress_bar
from megallama.data.tokenizer import Tokenizer, TokenizerError, check_vocab
from megallama.interop.hf import (
    HF_TOKENIZER_FILES,
    HFSink,
    HFSource,
    SafetensorsStream,
    nbytes_of,
)
from megallama.interop.meta import MetaSink, MetaSource, check_mp, default_mp
from megallama.interop.names import model_tensor_shapes
from megallama.interop.staging import publish, temporary_output
from megallama.model.layout import ShardSpec, layer_of, shard_specs, stage_of_layers

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
        if not (self.path / INDEX_NAME).is_file():  # a run or checkpoints/ directory: its latest
            try:
                self.path = find_checkpoint(self.path)
            except CheckpointError:
                pass  # reading the index below names the missing file
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
        check_shard_headers(self.path, index)  # sizes, shapes and dtypes before any output
        self.names = [n for n, _ in expected]
        self.dtypes = {n: getattr(torch, tensors[n]["dtype"]) for n in self.names}
        self.declared_dtype = self.dtypes[self.names[0]]
        self.nbytes = sum(nbytes_of(tensors[n]["shape"], self.dtypes[n]) for n in self.names)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        for name in self.names:
            yield name, read_full_tensor(self.path, name), str(self.path / INDEX_NAME)


def stored_pieces(spec: ShardSpec) -> list[tuple[int, int, int]]:
    """(tp rank, offset, length) of every stored piece of a global tensor: what the ranks that are
    first to hold a slice store, all-padding slices left out (as ``save_model_weights`` does)."""
    pieces = [(rank, *spec.piece(rank)) for rank in range(spec.tp) if spec.is_first_holder(rank)]
    return [(rank, offset, length) for rank, offset, length in pieces if length > 0]


class MegallamaSink:
    """Writes ``model-ppXX-tpYY.safetensors`` shards and ``model.index.json`` as a tp x pp world's
    ``save_model_weights`` would; all TP shards of the current stage are open at once."""

    def __init__(self, out: Path, cfg: ModelConfig, dtype: torch.dtype, tp: int, pp: int,
                 seq_len: int | None = None, extra: dict[str, Any] | None = None,
                 partition_method: str = "balanced") -> None:
        self.out, self.cfg, self.dtype, self.tp, self.pp = Path(out), cfg, dtype, tp, pp
        self.extra = extra or {}
        try:
            layer_stage = stage_of_layers(cfg, pp, seq_len, partition_method)
            specs = shard_specs(cfg, tp)
        except ConfigError as e:
            raise CheckpointError(f"{self.out}: --tp {tp} --pp {pp}: {e}") from None
        self.plans: dict[tuple[int, int], list[tuple[str, torch.dtype, list[int]]]] = {}
        self.entries: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
        self.routes: dict[str, list[tuple[tuple[int, int], int | None, int, int]]] = {}
        for spec in specs:
            name, shape, dim = spec.name, list(spec.shape), spec.split_dim
            stage = layer_stage[layer_of(name)]
            for rank, offset, length in stored_pieces(spec):
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
    """Resharding progress on stderr: a tqdm bar of bytes converted (done/total in MB or GB,
    percent, MB/s, elapsed, ETA) and the tensor being written; drawn only when enabled and
    stderr is a terminal. ``done`` counts the bytes either way: ``convert`` reports it."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done = total, 0
        self._bar = progress_bar(max(total, 1), enabled=enabled, file=sys.stderr,
                                 unit="B", unit_scale=True, unit_divisor=1000)

    def update(self, n: int, name: str) -> None:
        """Add ``n`` bytes written for tensor ``name``."""
        self.done += n
        if not self._bar.disable:
            self._bar.set_postfix_str(name[:40], refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        """Leave the bar where it stands on its own line; safe to call twice."""
        self._bar.close()


def check_layout(fmt: str, where: Path, cfg: ModelConfig, tp: int, pp: int,
                 mp: int | None) -> None:
    """Refuse an output layout that cannot split this model, before anything is written."""
    if fmt == "meta":
        check_mp(cfg, mp or default_mp(cfg), where)
        try:  # Meta's params.json has fields for Llama 3.1's RoPE scaling only
            cfg.to_meta_params()
        except ConfigError as e:
            raise CheckpointError(f"{where}: {e}; convert to hf or megallama instead") from None
    elif fmt == "megallama":
        try:
            check_tp_layout(cfg, tp)
        except ConfigError as e:
            raise CheckpointError(f"{where}: --tp {tp}: {e}") from None
        if not 1 <= pp <= cfg.n_layers:
            raise CheckpointError(f"{where}: --pp {pp}: need 1 <= pp <= n_layers={cfg.n_layers}")


def _cast(t: torch.Tensor, dtype: torch.dtype, name: str, where: str) -> torch.Tensor:
    """``t`` as ``dtype``, refusing finite values the narrower type cannot hold (bf16/fp32 weights
    beyond fp16's +-65504 would silently become inf)."""
    if t.is_floating_point() and dtype.is_floating_point:
        limit = torch.finfo(dtype).max
        finite = torch.isfinite(t)
        over = int((t.abs() > limit).logical_and(finite).sum())
        if over:
            raise CheckpointError(
                f"{where}: {name}: {over} value(s) beyond {dtype_name(dtype)}'s range "
                f"(+-{limit:g}; largest {float(t[finite].abs().max()):g}) would become inf; "
                "convert to bf16 or fp32 instead")
    return t.to(dtype)


def _stream(source: Source, sink: Sink, out_dtype: torch.dtype, *, cast_ok: bool,
            bar: Progress) -> int:
    """Copy every tensor of ``source`` into ``sink`` as ``out_dtype``; returns the count. Without
    ``cast_ok`` a cast that would change some value raises (naming the file and tensor)."""
    count = 0
    for name, t, where in source:
        if t.dtype != out_dtype:
            if not cast_ok and loses_information(t.dtype, out_dtype):
                raise CheckpointError(
                    f"{where}: {name}: stored as {dtype_name(t.dtype)}, the output is "
                    f"{dtype_name(out_dtype)}: the cast would lose information; pass --dtype "
                    "to accept it")
            t = _cast(t, out_dtype, name, where)
        sink.write(name, t)
        bar.update(t.numel() * t.element_size(), name)
        count += 1
        del t
    return count


def check_tokenizer(path: Path, cfg: ModelConfig, dst_fmt: str = "hf") -> None:
    """A ``--tokenizer`` shipped with an export must be a SentencePiece model (``tokenizer.model``
    itself or inside the given directory) whose vocabulary is the model's; only an hf output takes
    a directory of HF tokenizer files without one (copied as given)."""
    model = path / "tokenizer.model" if path.is_dir() else path
    if path.is_dir() and not model.is_file():
        if dst_fmt != "hf":
            raise CheckpointError(f"--tokenizer {path}: no tokenizer.model in this directory (a "
                                  f"{dst_fmt} output ships the SentencePiece model)")
        if not any((path / n).is_file() for n in HF_TOKENIZER_FILES):
            raise CheckpointError(f"--tokenizer {path}: no tokenizer files "
                                  f"({', '.join(HF_TOKENIZER_FILES)})")
        return
    if not model.is_file():
        raise CheckpointError(f"--tokenizer {path}: not found")
    try:
        check_vocab(Tokenizer(model).vocab_size, cfg.vocab_size, model)
    except TokenizerError as e:
        raise CheckpointError(f"--tokenizer {model}: {e}") from None


def open_sink(fmt: str, out: Path, source: Source, dtype: torch.dtype, opts: dict[str, Any],
              src_spec: str) -> Sink:
    """The writer of format ``fmt`` into ``out``; ``opts`` are :func:`convert`'s options."""
    cfg, tokenizer = source.config, opts["tokenizer"]
    if fmt == "meta":
        return MetaSink(out, cfg, dtype, opts["mp"] or default_mp(cfg), tokenizer)
    if fmt == "hf":
        return HFSink(out, cfg, dtype, opts["max_shard_size"], tokenizer)
    return MegallamaSink(out, cfg, dtype, opts["tp"], opts["pp"], opts["seq_len"],
                         {"converted_from": src_spec}, opts["partition_method"])


def convert(src: str, dst: str, *, tp: int = 1, pp: int = 1, mp: int | None = None,
            dtype: str | None = None, max_shard_size: int = 5 * 10**9,
            tokenizer: Path | None = None, seq_len: int | None = None,
            partition_method: str = "balanced", progress: bool = True) -> dict[str, Any]:
    """Convert checkpoint ``src`` (``FORMAT:PATH``) to ``dst``; returns a small report
    (bytes, seconds, tensors). ``dtype`` (bf16/fp16/fp32) casts every tensor; without it the output
    keeps the source's dtype and a tensor that would lose information raises. Raises
    :class:`CheckpointError` with a one-line message naming the file and key; on any failure
    nothing is left at or beside ``dst``."""
    src_fmt, src_path = parse_spec(src)
    dst_fmt, dst_path = parse_spec(dst)
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if dst_path.exists() or dst_path.is_symlink():
        raise CheckpointError(f"{dst_path}: already exists; choose a new destination")
    if tokenizer is not None and not Path(tokenizer).exists():
        raise CheckpointError(f"--tokenizer {tokenizer}: not found")
    t0 = time.monotonic()
    source = open_source(src_fmt, src_path)
    out_dtype = DTYPES[dtype] if dtype else source.declared_dtype
    check_layout(dst_fmt, dst_path, source.config, tp, pp, mp)
    if tokenizer is not None:
        check_tokenizer(Path(tokenizer), source.config, dst_fmt)
    opts = {"tp": tp, "pp": pp, "mp": mp, "max_shard_size": max_shard_size, "seq_len": seq_len,
            "tokenizer": tokenizer, "partition_method": partition_method}
    with temporary_output(dst_path) as tmp:
        bar = Progress(source.nbytes, progress)
        sink: Sink | None = None
        try:
            sink = open_sink(dst_fmt, tmp, source, out_dtype, opts, f"{src_fmt}:{src_path}")
            count = _stream(source, sink, out_dtype, cast_ok=dtype is not None, bar=bar)
            bar.close()
            sink.finish()
            if dst_fmt == "megallama" and tokenizer is not None:
                src_tok = Path(tokenizer)
                src_tok = src_tok / "tokenizer.model" if src_tok.is_dir() else src_tok
                shutil.copyfile(src_tok, tmp / "tokenizer.model")
            publish(tmp, dst_path)
        except BaseException:
            bar.close()
            if sink is not None:
                sink.abort()
            raise
    return {"src": src, "dst": dst, "tensors": count, "bytes": bar.done,
            "seconds": time.monotonic() - t0}
